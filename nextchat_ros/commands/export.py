"""``nextchat export``: ONNX graphs (and TensorRT engines) of the vision and mask parts."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export the vision and mask parts to ONNX (parity-checked) and TensorRT engines"
DESCRIPTION = """\
Export the vision tower + projector, SAM's image encoder, and the mask decoder
(segmentation prompt MLP + SAM prompt encoder + mask decoder, any number of
objects) to ONNX; check each graph against PyTorch with ONNX Runtime on random
and real inputs (parity.md / parity.json) and lint it with polygraphy; write
manifest.json. With --tensorrt, also build TensorRT engines (needs TensorRT and
a GPU) and print the equivalent trtexec commands for a Jetson.

Use the export with:  nextchat ground --backend onnxruntime --export-dir DIR ...
                      ros2 launch nextchat_ros grounding.launch.py backend:=onnxruntime export_dir:=DIR

--preset full exports a model of the released shapes (CLIP ViT-L/14-336, SAM
ViT-H at 1024 px, Vicuna-7B's width for the mask graph's trigger input) with
random weights: a check that the released shapes export, pass parity and give
TensorRT profiles, not a model to run. --trtexec prints the trtexec commands for
a Jetson (engines must be built on the device) without needing TensorRT here.

examples:
  nextchat export --model nextchat_ros/assets/models/tiny --out out/export --fp16
  nextchat export --preset full --out out/export_full --fp16 --trtexec
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    source.add_argument("--preset", default=None,
                        help="export a preset's shapes with random weights instead of a trained model (e.g. full)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --preset's random weights")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (fp32 inputs/outputs)")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (GPU + TensorRT)")
    parser.add_argument("--trtexec", action="store_true",
                        help="print the trtexec commands for a Jetson (no TensorRT needed here)")
    parser.add_argument("--no-lint", action="store_true", help="skip polygraphy lint")


def run(args: argparse.Namespace) -> int:
    from ..model.config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        raise SystemExit(f"nextchat export: unknown preset '{args.preset}'; choose one of {sorted(PRESETS)}")
    from nextchat_export.onnx_export import export_onnx, parts_model

    from ..model.build import DEFAULT_MODEL_DIR
    from ..model.checkpoint import load_pretrained
    from ..model.config import get_preset

    if args.preset is not None:
        model = parts_model(get_preset(args.preset), seed=args.seed)
    else:
        model = load_pretrained(args.model or DEFAULT_MODEL_DIR)
    manifest = export_onnx(model, args.out, opset=args.opset, fp16=args.fp16, lint=not args.no_lint)
    print((args.out / "parity.md").read_text())
    from nextchat_export.tensorrt_build import build_engines, trtexec_commands

    if args.tensorrt:
        build_engines(args.out, fp16=args.fp16)
        print("TensorRT engines built; equivalent trtexec commands (run in the export directory):")
    if args.tensorrt or args.trtexec:
        print("\n".join(trtexec_commands(args.out, fp16=args.fp16)))
    print(f"wrote {args.out} ({len(manifest['parts'])} parts)")
    return 0 if manifest["parity"]["all_passed"] else 1
