"""TensorRT engines from the exported ONNX graphs, through TensorRT's Python API.

An engine runs only on the TensorRT version and GPU it was built for, and only
for the model it was exported from: each engine has a sidecar JSON saying so,
which ``backends.TensorRTBackend`` checks before loading. Building lives here, in
the core, so the node can rebuild a stale engine from the ONNX graph beside it
(``rebuild_engines``); ``nextchat export --tensorrt`` builds them all. On a Jetson
the same engines can also be built with trtexec (export/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BackendError

# Optimization-profile ranges of the dynamic axes: (min, opt, max).
DYNAMIC_RANGES = {"batch": (1, 1, 4), "objects": (1, 4, 16)}


def stale_engine_reason(sidecar: dict, environment: dict, fingerprint: str | None = None) -> str | None:
    """Why an engine described by ``sidecar`` cannot run here, or None when it can."""
    for key in ("tensorrt", "gpu"):
        if sidecar.get(key) != environment.get(key):
            return f"was built for {key} {sidecar.get(key)!r}, this machine has {environment.get(key)!r}"
    if fingerprint is not None and sidecar.get("model_fingerprint") not in (None, fingerprint):
        return "was built from another model's export"
    return None


def profile_shapes(entry: dict) -> dict:
    """{input: {min, opt, max}} of one exported part (its manifest entry)."""
    shapes = {}
    for name, dims in entry["input_shapes"].items():
        ranges = [[d] * 3 if isinstance(d, int) else list(DYNAMIC_RANGES[d]) for d in dims]
        shapes[name] = {key: [r[i] for r in ranges] for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed (import tensorrt failed); build the engines on the target "
                          "with trtexec (export/README.md) or install TensorRT's Python package") from None
    return trt


def build_engine(export_dir: str | Path, part: str, entry: dict, fingerprint: str, fp16: bool = True,
                 workspace_gb: float = 2.0, timing_cache: str | Path | None = None) -> dict:
    """Build ``part``'s engine from its ONNX graph into ``export_dir`` with its sidecar;
    sets ``entry["engine"]`` and returns the sidecar."""
    trt = import_tensorrt()
    import torch

    export_dir = Path(export_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else export_dir / "timing.cache"
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
    shapes = profile_shapes(entry)
    for name, shape in shapes.items():
        profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path}")
    engine = export_dir / f"{part}.engine"
    engine.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else "none", "precision": "fp16" if fp16 else "fp32", "onnx": entry["file"],
               "profile_shapes": shapes, "model_fingerprint": fingerprint}
    Path(str(engine) + ".json").write_text(json.dumps(sidecar, indent=2))
    entry["engine"] = engine.name
    return sidecar
