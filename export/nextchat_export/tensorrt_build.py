"""Every part's TensorRT engine from the exported ONNX graphs (``nextchat export
--tensorrt``), and the equivalent trtexec commands for a Jetson.

Building one engine, and its sidecar JSON (TensorRT version, GPU, precision,
shapes, model) that ``nextchat_ros.backends`` checks before loading, is the core's
(``nextchat_ros.tensorrt_engines``), so the node can rebuild a stale engine too.
"""

from __future__ import annotations

import json
from pathlib import Path

from nextchat_ros.backends import MANIFEST, read_manifest
from nextchat_ros.tensorrt_engines import build_engine, import_tensorrt, profile_shapes


def build_engines(export_dir: str | Path, fp16: bool = True, workspace_gb: float = 2.0,
                  timing_cache: str | Path | None = None) -> dict:
    import_tensorrt()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    for part, entry in manifest["parts"].items():
        build_engine(export_dir, part, entry, manifest["model_fingerprint"], fp16, workspace_gb, timing_cache)
    (export_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def trtexec_commands(export_dir: str | Path, fp16: bool = True) -> list[str]:
    """The equivalent trtexec command lines (for a Jetson, where engines must be built on the device)."""
    manifest = read_manifest(export_dir)
    commands = []
    for part, entry in manifest["parts"].items():
        shapes = profile_shapes(entry)
        spec = [",".join(f"{name}:{'x'.join(map(str, shape[key]))}" for name, shape in shapes.items())
                for key in ("min", "opt", "max")]
        commands.append(f"trtexec --onnx={entry['file']} --saveEngine={part}.engine"
                        f"{' --fp16' if fp16 else ''} --minShapes={spec[0]} --optShapes={spec[1]} "
                        f"--maxShapes={spec[2]} --memPoolSize=workspace:2048 --timingCacheFile=timing.cache")
    return commands
