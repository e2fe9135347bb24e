"""Where the vision and mask parts run: torch, ONNX Runtime or TensorRT.

The LLM always runs in torch. A backend runs the three parts of
``model/parts.py`` (VisionPart, SamEncoderPart, MaskPart); the ONNX and TensorRT
backends run graphs exported from exactly those modules (``nextchat export``),
described by ``manifest.json`` in the export directory. Loading checks every
file and says which one is missing, truncated or from another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .errors import BackendError
from .model.parts import MaskPart, SamEncoderPart, VisionPart
from .options import BACKENDS, EXPORT_PRECISIONS
from .tensorrt_engines import build_engine, import_tensorrt, stale_engine_reason

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PARTS = ("vision", "sam_encoder", "mask")


def model_fingerprint(model) -> str:
    """A hash of the parameters the exported parts depend on (vision, SAM, heads)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("vision_tower.", "projector.", "sam.", "seg_prompt_mlp.")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class TorchBackend:
    name = "torch"

    def __init__(self, model):
        self.vision_part, self.sam_part, self.mask_part = VisionPart(model), SamEncoderPart(model), MaskPart(model)

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_part(pixels)

    def sam_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.sam_part(pixels)

    def masks(self, embedding, boxes, hidden):
        return self.mask_part(embedding, boxes, hidden)


def check_export_precision(precision: str) -> None:
    if precision not in EXPORT_PRECISIONS:
        raise BackendError(f"exported graphs come in {' and '.join(EXPORT_PRECISIONS)}, not '{precision}' "
                           "(bf16 runs on the torch backend)")


def read_manifest(export_dir: str | Path) -> dict:
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not path.is_file():
        raise BackendError(f"no export manifest: {path} (run `nextchat export --model ... --out {export_dir}`)")
    try:
        manifest = json.loads(path.read_text())
        missing = [p for p in PARTS if p not in manifest["parts"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BackendError(f"{path} is not a valid export manifest: {exc}") from None
    if missing:
        raise BackendError(f"{path} lists no graph for {missing}")
    return manifest


def check_model(manifest: dict, model, export_dir: Path) -> None:
    expected = manifest.get("model_fingerprint")
    actual = model_fingerprint(model)
    if expected != actual:
        raise BackendError(f"{export_dir / MANIFEST} was exported from another model "
                           f"(fingerprint {str(expected)[:12]}, this model {actual[:12]}); export it again")


class _ExportedBackend:
    """Runs the parts through ``self._run(part, *tensors) -> [tensors]``."""

    def vision(self, pixels):
        return self._run("vision", pixels)[0]

    def sam_encoder(self, pixels):
        return self._run("sam_encoder", pixels)[0]

    def masks(self, embedding, boxes, hidden):
        low, iou = self._run("mask", embedding, boxes, hidden)
        return low, iou


class OnnxRuntimeBackend(_ExportedBackend):
    name = "onnxruntime"

    def __init__(self, model, export_dir: str | Path, threads: int = 0, precision: str | None = None,
                 allow_spinning: bool = False):
        """allow_spinning: ONNX Runtime's busy-waiting worker threads are faster alone
        but steal the cores the LLM (torch) needs right after; off by default."""
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        check_model(manifest, model, self.export_dir)
        self.device, self.dtype = model.device, model.dtype
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        variant = precision or manifest.get("default_precision", "fp32")
        check_export_precision(variant)
        self.precision = variant
        self.sessions = {}
        for part in PARTS:
            entry = manifest["parts"][part]
            file = entry["file"] if variant == "fp32" else entry.get("files", {}).get(variant)
            if file is None:
                raise BackendError(f"{self.export_dir / MANIFEST} has no {variant} graph for {part} "
                                   f"(export with `nextchat export --{variant}`)")
            path = self.export_dir / file
            if not path.is_file():
                raise BackendError(f"ONNX graph missing: {path}")
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / ... types
                raise BackendError(f"cannot load ONNX graph {path} (truncated or corrupt?): {exc}") from None
            names = [i.name for i in session.get_inputs()]
            if names != entry["inputs"]:
                raise BackendError(f"{path} has inputs {names}, the manifest says {entry['inputs']}")
            self.sessions[part] = session

    def _run(self, part: str, *arrays: torch.Tensor):
        session = self.sessions[part]
        feeds = {i.name: a.detach().to("cpu", torch.float32).numpy() for i, a in zip(session.get_inputs(), arrays)}
        outs = session.run(None, feeds)
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self.device, self.dtype) for o in outs]


def tensorrt_environment() -> dict:
    """What a TensorRT engine is tied to, on this machine (BackendError without TensorRT)."""
    trt = import_tensorrt()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"tensorrt": trt.__version__, "gpu": gpu}


def check_sidecar(sidecar: dict, environment: dict, path: Path, fingerprint: str | None = None) -> None:
    """An engine only runs where it was built (same TensorRT version, same GPU), for its model."""
    reason = stale_engine_reason(sidecar, environment, fingerprint)
    if reason is not None:
        raise BackendError(f"{path} {reason}; rebuild the engine here (rebuild_engines)")


class TensorRTBackend(_ExportedBackend):
    """Serialized TensorRT engines (``nextchat export --tensorrt``) run with CUDA buffers.

    ``rebuild``: an engine that is missing, or whose sidecar says it was built for
    another TensorRT, GPU or model, is built again here from the ONNX graph beside it
    (in the precision it had, or ``precision``) instead of refusing the export."""

    name = "tensorrt"

    def __init__(self, model, export_dir: str | Path, precision: str | None = None, rebuild: bool = False):
        """``precision``: when given, every engine must have been built in it (its sidecar says)."""
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA GPU")
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        check_model(manifest, model, self.export_dir)
        environment = tensorrt_environment()
        self.device, self.dtype = model.device, model.dtype
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts, self.rebuilt = {}, {}, []
        for part in PARTS:
            path, sidecar = self._engine_file(manifest, part, environment, precision, rebuild)
            if precision and sidecar.get("precision") != precision:
                raise BackendError(f"{path} was built in {sidecar.get('precision')}, not {precision}")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"cannot deserialize TensorRT engine {path} (truncated or corrupt?)")
            self.engines[part] = engine
            self.contexts[part] = engine.create_execution_context()
        if self.rebuilt:
            (self.export_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))

    def _engine_file(self, manifest: dict, part: str, environment: dict, precision: str | None,
                     rebuild: bool) -> tuple[Path, dict]:
        """``part``'s engine and sidecar, rebuilt first where allowed and needed."""
        entry = manifest["parts"][part]
        path = self.export_dir / entry.get("engine", f"{part}.engine")
        sidecar_path = path.with_suffix(path.suffix + ".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
        if sidecar is None or not path.is_file():
            reason = "is missing" if entry.get("engine") else "is not listed in the manifest"
        else:
            reason = stale_engine_reason(sidecar, environment, manifest.get("model_fingerprint"))
        if reason is None:
            return path, sidecar
        if not rebuild:
            if sidecar is None or not path.is_file():
                raise BackendError(f"TensorRT engine or its sidecar for {part} {reason}: {path}")
            check_sidecar(sidecar, environment, sidecar_path, manifest.get("model_fingerprint"))
        log.warning("rebuilding the TensorRT engine of %s from %s: the engine %s", part, entry["file"], reason)
        fp16 = (precision or (sidecar or {}).get("precision", "fp16")) == "fp16"
        sidecar = build_engine(self.export_dir, part, entry, manifest["model_fingerprint"], fp16=fp16)
        self.rebuilt.append(part)
        return self.export_dir / entry["engine"], sidecar

    def _run(self, part: str, *arrays: torch.Tensor):
        import tensorrt as trt

        engine, context = self.engines[part], self.contexts[part]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        keep = []
        for name, array in zip(inputs, arrays):
            buf = array.detach().to("cuda", torch.float32).contiguous()
            keep.append(buf)
            context.set_input_shape(name, tuple(buf.shape))
            context.set_tensor_address(name, buf.data_ptr())
        results = []
        for name in outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT execution of {part} failed")
        stream.synchronize()
        return [r.to(self.device, self.dtype) for r in results]


def load_backend(name: str, model, export_dir: str | Path | None = None, fallback: bool = True,
                 precision: str | None = None, rebuild_engines: bool = False):
    """The backend called ``name``. A TensorRT engine that cannot be used here is
    rebuilt from its ONNX graph when ``rebuild_engines`` is set; otherwise (or when
    that fails) it falls back to ONNX Runtime with a warning when ``fallback`` is set.
    ``precision``: which exported graphs to run (fp32 | fp16; default: the export's
    own); torch ignores it (the predictor casts the model)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; choose one of {BACKENDS}")
    if name != "torch" and precision is not None:
        check_export_precision(precision)
    if name == "torch":
        return TorchBackend(model)
    if export_dir is None:
        raise BackendError(f"the {name} backend needs an export directory (`nextchat export`)")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(model, export_dir, precision=precision)
    try:
        return TensorRTBackend(model, export_dir, precision=precision, rebuild=rebuild_engines)
    except BackendError as exc:
        if not fallback:
            raise
        log.warning("TensorRT backend unavailable (%s); falling back to ONNX Runtime", exc)
        backend = OnnxRuntimeBackend(model, export_dir, precision=precision)
        backend.fallback_reason = str(exc)
        return backend
