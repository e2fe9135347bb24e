"""TensorRT engines from the exported ONNX graphs, through TensorRT's Python API.

Each engine gets a sidecar JSON (TensorRT version, GPU, precision, shapes) that
``nextchat_ros.backends`` checks before loading: an engine runs only on the
TensorRT version and GPU it was built for. On a Jetson the same engines can be
built with trtexec (see the README).
"""

from __future__ import annotations

import json
from pathlib import Path

from nextchat_ros.backends import MANIFEST, BackendError, read_manifest

# Optimization-profile ranges of the dynamic axes: (min, opt, max).
DYNAMIC_RANGES = {"batch": (1, 1, 4), "objects": (1, 4, 16)}


def build_engines(export_dir: str | Path, fp16: bool = True, workspace_gb: float = 2.0,
                  timing_cache: str | Path | None = None) -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed here; build the engines on the target with trtexec "
                           "(README: 'TensorRT on a Jetson') or install TensorRT's Python package") from None
    import torch

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cache_path = Path(timing_cache) if timing_cache else export_dir / "timing.cache"
    for part, entry in manifest["parts"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        onnx_path = export_dir / entry["file"]
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        shapes = {}
        for name, dims in entry["input_shapes"].items():
            ranges = [[d] * 3 if isinstance(d, int) else list(DYNAMIC_RANGES[d]) for d in dims]
            low, opt, high = ([r[i] for r in ranges] for i in range(3))
            profile.set_shape(name, low, opt, high)
            shapes[name] = {"min": low, "opt": opt, "max": high}
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build an engine from {onnx_path}")
        engine = export_dir / f"{part}.engine"
        engine.write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        sidecar = {"tensorrt": trt.__version__, "gpu": gpu, "precision": "fp16" if fp16 else "fp32",
                   "onnx": entry["file"], "profile_shapes": shapes, "model_fingerprint": manifest["model_fingerprint"]}
        Path(str(engine) + ".json").write_text(json.dumps(sidecar, indent=2))
        entry["engine"] = engine.name
    (export_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def trtexec_commands(export_dir: str | Path, fp16: bool = True) -> list[str]:
    """The equivalent trtexec command lines (for a Jetson, where engines must be built on the device)."""
    manifest = read_manifest(export_dir)
    commands = []
    for part, entry in manifest["parts"].items():
        shapes = {}
        for name, dims in entry["input_shapes"].items():
            ranges = [[d] * 3 if isinstance(d, int) else list(DYNAMIC_RANGES[d]) for d in dims]
            shapes[name] = ["x".join(str(r[i]) for r in ranges) for i in range(3)]
        spec = [",".join(f"{n}:{v[i]}" for n, v in shapes.items()) for i in range(3)]
        commands.append(f"trtexec --onnx={entry['file']} --saveEngine={part}.engine"
                        f"{' --fp16' if fp16 else ''} --minShapes={spec[0]} --optShapes={spec[1]} "
                        f"--maxShapes={spec[2]} --memPoolSize=workspace:2048 --timingCacheFile=timing.cache")
    return commands
