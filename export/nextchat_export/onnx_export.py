"""ONNX export of VisionPart, SamEncoderPart and MaskPart, with parity checks.

Uses torch's TorchScript-based exporter (``dynamo=False``): it exports all three
parts with their dynamic axes (segment-anything's MaskDecoder, with a dynamic
number of objects, does not go through torch.export). Weights are embedded in
each .onnx file where it fits protobuf's 2 GB; a larger graph (SAM ViT-H's encoder
in fp32) keeps its weights in one ``<graph>.onnx.data`` file beside it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from nextchat_ros.backends import MANIFEST, model_fingerprint
from nextchat_ros.model.parts import MaskPart, SamEncoderPart, VisionPart
from nextchat_ros.model.sam import preprocess_image as sam_preprocess
from nextchat_ros.model.vision import preprocess_image as vision_preprocess
from nextchat_ros.synthetic.scenes import render_scene

FP32_TOLERANCE = 1e-4
# Weights above this go to an external data file (protobuf serialises at most 2 GiB,
# and the graph's nodes need some of it).
PROTOBUF_LIMIT = 2**31 - 2**27
# fp16 keeps ~3 significant digits per operation and the errors add up over a
# transformer's layers, so we compare relative to the output's scale:
# max |onnx - torch| <= FP16_RELATIVE_TOLERANCE * max |torch|.
FP16_RELATIVE_TOLERANCE = 2e-2


def parts_model(config, seed: int = 0):
    """A model of ``config``'s shapes with random (seeded) weights for exporting its
    parts: vision tower + projector, SAM, the heads. The LLM is in none of the
    exported graphs, so it is built as small as it goes (one decoder layer with a
    narrow MLP, the tiny tokenizer's vocabulary: 1.6 GB less than the full preset's
    at its width); its width, which sets the trigger hidden state the mask graph
    takes, is the preset's. For checking the export at a preset's shapes (latency
    and memory do not depend on the values)."""
    import copy

    from nextchat_ros.model import build_model
    from nextchat_ros.model.config import SpecialTokens

    config = copy.deepcopy(config)
    config.llm.num_hidden_layers = 1
    config.llm.intermediate_size = 64
    config.llm.vocab_size = 0  # the tokenizer's
    config.tokens = SpecialTokens()  # the tiny tokenizer's names: no token is in an exported graph
    return build_model(config, seed=seed).eval()


def part_specs(model) -> dict:
    """name -> (module, example inputs, input names, output names, dynamic axes)."""
    c = model.config
    s, ss, e = c.vision.image_size, c.sam.image_size, c.sam.embedding_size
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.7]])
    return {
        "vision": (VisionPart(model), (torch.randn(1, 3, s, s),), ["pixel_values"], ["image_embeds"],
                   {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
        "sam_encoder": (SamEncoderPart(model), (torch.randn(1, 3, ss, ss),), ["pixels"], ["image_embedding"],
                        {"pixels": {0: "batch"}, "image_embedding": {0: "batch"}}),
        "mask": (MaskPart(model), (torch.randn(1, c.sam.prompt_embed_dim, e, e), boxes,
                                   torch.randn(2, c.llm.hidden_size)),
                 ["image_embedding", "boxes", "trigger_hidden"], ["low_res_masks", "iou_predictions"],
                 {"boxes": {0: "objects"}, "trigger_hidden": {0: "objects"}, "low_res_masks": {0: "objects"},
                  "iou_predictions": {0: "objects"}}),
    }


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def parity_inputs(model, part: str, seed: int = 0) -> list[tuple[str, tuple]]:
    """(label, inputs) pairs: random inputs at other dynamic sizes, and a real scene."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    scene = render_scene(seed + 11)
    image = torch.from_numpy(scene.image.copy())
    if part == "vision":
        s = c.vision.image_size
        return [("random batch 3", (torch.randn(3, 3, s, s, generator=g),)),
                ("real scene", (vision_preprocess(image, c.vision)[None],))]
    if part == "sam_encoder":
        ss = c.sam.image_size
        return [("random batch 2", (torch.randn(2, 3, ss, ss, generator=g),)),
                ("real scene", (sam_preprocess(image, c.sam)[None],))]
    with torch.no_grad():
        embedding = SamEncoderPart(model)(sam_preprocess(image, c.sam)[None])
    e = c.sam.embedding_size
    h, w = scene.image.shape[:2]
    side = max(h, w)
    real_boxes = torch.tensor([[(o.box[0] + (side - w) // 2) / side, (o.box[1] + (side - h) // 2) / side,
                                (o.box[2] + (side - w) // 2) / side, (o.box[3] + (side - h) // 2) / side]
                               for o in scene.objects], dtype=torch.float32)
    xy = torch.rand(5, 2, generator=g) * 0.5
    return [("random 5 objects", (torch.randn(1, c.sam.prompt_embed_dim, e, e, generator=g),
                                  torch.cat([xy, xy + 0.3], 1), torch.randn(5, c.llm.hidden_size, generator=g))),
            ("real scene", (embedding, real_boxes, torch.randn(len(real_boxes), c.llm.hidden_size, generator=g)))]


def check_parity(model, part: str, path: Path, fp16: bool = False) -> list[dict]:
    module, _, input_names, _, _ = part_specs(model)[part]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for label, inputs in parity_inputs(model, part):
        with torch.no_grad():
            ref = module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        out = session.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})
        diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(out, ref))
        scale = max(float(np.abs(r.numpy()).max()) for r in ref)
        limit = FP16_RELATIVE_TOLERANCE * max(scale, 1e-6) if fp16 else FP32_TOLERANCE
        rows.append({"part": part, "precision": "fp16" if fp16 else "fp32", "inputs": label,
                     "max_abs_diff": diff, "output_scale": scale, "tolerance": limit, "passed": diff <= limit})
    return rows


def polygraphy_lint(path: Path) -> dict:
    beside = Path(sys.executable).parent / "polygraphy"  # the venv's, even when it is not on PATH
    exe = str(beside) if beside.is_file() else shutil.which("polygraphy")
    if exe is None:
        return {"file": path.name, "lint": "skipped: polygraphy not installed"}
    if _data_file(path).is_file():
        # polygraphy asks the loaded graph for its size as one message: over 2 GB, that raises.
        return {"file": path.name, "lint": "not run: polygraphy cannot load a graph over protobuf's 2 GB "
                "(onnx.checker by path and the parity run check it)"}
    run = subprocess.run([exe, "check", "lint", str(path)], capture_output=True, text=True, timeout=600)
    text = run.stdout + run.stderr
    return {"file": path.name, "lint": "passed" if run.returncode == 0 else "failed", "returncode": run.returncode,
            "log_tail": text[-1500:]}


def _data_file(path: Path) -> Path:
    """Where this module writes the weights of a graph too large to hold them."""
    return path.parent / f"{path.name}.data"


def _external_files(path: Path) -> set[str]:
    """The files beside ``path`` that hold its weights (none when they are inside it)."""
    graph = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in graph.graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def _gather_external_data(path: Path) -> None:
    """torch writes a graph over 2 GB with every weight in a file of its own beside
    it (hundreds for SAM ViT-H); move them into one ``<graph>.onnx.data``."""
    files = _external_files(path)
    if not files:
        return
    graph = onnx.load(str(path))
    onnx.save(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=_data_file(path).name)
    for name in files - {_data_file(path).name}:
        (path.parent / name).unlink()


def to_fp16(src: Path, dst: Path) -> None:
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # By path: the converter then infers shapes from the file, which works for a graph
    # over protobuf's 2 GB (SAM ViT-H in fp32); given the loaded model it serialises it.
    graph = convert_float_to_float16(str(src), keep_io_types=True)
    # The converter appends its input casts at the end of the node list; ONNX
    # requires topological order (polygraphy lint and TensorRT check it).
    graph = gs.export_onnx(gs.import_onnx(graph).toposort())
    large = sum(t.ByteSize() for t in graph.graph.initializer) > PROTOBUF_LIMIT
    onnx.save(graph, str(dst), save_as_external_data=large, location=_data_file(dst).name)


def export_onnx(model, out_dir: str | Path, opset: int = 17, fp16: bool = False, lint: bool = True,
                progress: bool = True) -> dict:
    """Export the three parts, check parity and lint; write manifest.json and the
    parity report (parity.json, parity.md). Returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()
    specs = part_specs(model)
    manifest = {"format": 1, "opset": opset, "exporter": f"torch {torch.__version__} (dynamo=False)",
                "model_fingerprint": model_fingerprint(model), "default_precision": "fp32", "parts": {}}
    report, lints = [], []
    steps = [(name, precision) for name in specs for precision in (["fp32", "fp16"] if fp16 else ["fp32"])]
    for name, precision in tqdm(steps, desc="export", disable=not progress, unit="graph"):
        module, inputs, input_names, output_names, dynamic = specs[name]
        path = out_dir / f"{name}.onnx"
        if precision == "fp32":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, inputs, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic, opset_version=opset, dynamo=False)
            _gather_external_data(path)
            # By path: a graph over 2 GB (SAM ViT-H in fp32) keeps its weights as external data.
            onnx.checker.check_model(str(path))
            graph = onnx.load(str(path), load_external_data=False)
            manifest["parts"][name] = {
                "file": path.name, "inputs": input_names, "outputs": output_names,
                "input_shapes": {i.name: _shape(i) for i in graph.graph.input},
                "output_shapes": {o.name: _shape(o) for o in graph.graph.output},
            }
            report += check_parity(model, name, path)
        else:
            half = out_dir / f"{name}.fp16.onnx"
            to_fp16(path, half)
            manifest["parts"][name].setdefault("files", {})["fp16"] = half.name
            report += check_parity(model, name, half, fp16=True)
            path = half
        if lint:
            lints.append(polygraphy_lint(path))
    manifest["parity"] = {"all_passed": all(r["passed"] for r in report), "fp32_tolerance": FP32_TOLERANCE,
                          "fp16_relative_tolerance": FP16_RELATIVE_TOLERANCE}
    manifest["lint"] = lints
    (out_dir / "parity.json").write_text(json.dumps({"parity": report, "lint": lints}, indent=2))
    lines = ["# Parity report: ONNX Runtime (CPU) vs PyTorch", "",
             f"fp32: max |onnx - torch| <= {FP32_TOLERANCE}; fp16: <= {FP16_RELATIVE_TOLERANCE} x max |torch|", "",
             "| part | precision | inputs | max abs diff | tolerance | passed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['precision']} | {r['inputs']} | {r['max_abs_diff']:.2e} | {r['tolerance']:.2e} "
              f"| {'yes' if r['passed'] else 'NO'} |" for r in report]
    lines += ["", "| file | polygraphy lint |", "|---|---|"] + [f"| {x['file']} | {x['lint']} |" for x in lints]
    (out_dir / "parity.md").write_text("\n".join(lines) + "\n")
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
