"""``nextchat ground``: answer one query about one image file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import QueryError
from ..options import BACKENDS, DECODERS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_SCORE, LLM_PRECISIONS, PRECISIONS

HELP = "answer one query about an image: text, boxes and masks"
DESCRIPTION = """\
Answer a question or instruction about an image with the NExT-Chat model and
ground every object the answer mentions as a box and a mask.

examples:
  nextchat ground --image table.png --query "where is the red cube?" --mode ground
  nextchat ground --image table.png --query "describe [0]." --region 40,60,120,150 --overlay out.png
  nextchat ground --image table.png --query "what is on the table?" --json
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``predictor.load_predictor``, for every command that loads a model."""
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (config.json, model.safetensors, tokenizer.json); "
                             "default: the shipped tiny model")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="where the vision and mask parts run (default: torch; the LLM always runs in torch)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="`nextchat export` output for onnxruntime / tensorrt (default: MODEL/export)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="what the model runs in (default fp32): every part but the box heads and SAM's "
                             "prompt encoder, which stay fp32; the LLM too unless --llm-precision says otherwise. "
                             "onnxruntime / tensorrt run the export's graphs of it (fp16 needs `nextchat export "
                             "--fp16`; default: the export's own graphs, the torch parts in fp32)")
    parser.add_argument("--rebuild-engines", action="store_true",
                        help="tensorrt: rebuild an engine built for another TensorRT / GPU / model from its ONNX graph")
    parser.add_argument("--llm-precision", choices=LLM_PRECISIONS, default="auto",
                        help="the LLM's weights: auto (--precision's, default) | fp32 | fp16 | bf16 | "
                             "int8 / int4 (weight-only, torchao)")
    parser.add_argument("--decoder", choices=DECODERS, default="engine",
                        help="engine: the static-cache decode engine (default); eager: transformers' own "
                             "forward, the reference the engine is checked against")


def predictor_from_args(args: argparse.Namespace):
    from ..predictor import load_predictor

    return load_predictor(args.model, args.backend, args.export_dir, args.device, args.precision,
                          rebuild_engines=args.rebuild_engines, llm_precision=args.llm_precision,
                          decoder=args.decoder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", type=Path, required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--query", required=True, help="question or instruction; refer to regions as [0], [1], ...")
    parser.add_argument("--region", action="append", default=[], metavar="X1,Y1,X2,Y2",
                        help="a user region in pixels, referred to as [k] in the query (repeatable)")
    parser.add_argument("--mode", choices=["generate", "ground"], default="generate",
                        help="generate: free answer (default); ground: one box for the query, one forward")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help="drop objects the model thinks less likely there (its P(yes) to 'is there a ... in the "
                             f"image?'; default {DEFAULT_MIN_SCORE}; 0 keeps every object)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--overlay", type=Path, default=None, help="write an overlay PNG of boxes and masks here")


def parse_region(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise QueryError(f"--region '{text}' is not four numbers x1,y1,x2,y2") from None
    if len(values) != 4:
        raise QueryError(f"--region '{text}' must have four numbers x1,y1,x2,y2")
    return values


def answer_to_dict(answer, image_path=None) -> dict:
    return {
        "image": str(image_path) if image_path else None,
        "answer": answer.text,
        "mode": answer.mode,
        "truncated": answer.truncated,
        "objects": [
            {"phrase": o.phrase, "box_xyxy": [round(float(v), 2) for v in o.box], "score": round(o.score, 4),
             "mask_area": int(o.mask.sum()) if o.mask is not None else None, "mask_score": round(o.mask_score, 4)}
            for o in answer.objects
        ],
        "timings_ms": {k: round(v, 2) for k, v in answer.timings_ms.items()},
    }


def run(args: argparse.Namespace) -> int:
    from ..overlay import draw_overlay, load_rgb, save_png

    regions = [parse_region(r) for r in args.region]
    image = load_rgb(args.image)
    predictor = predictor_from_args(args)
    timings = predictor.set_image(image)
    answer = predictor.ask(args.query, regions=regions or None, mode=args.mode, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, min_score=args.min_score)
    answer.timings_ms.update(timings)
    if args.overlay:
        args.overlay.parent.mkdir(parents=True, exist_ok=True)
        save_png(draw_overlay(image, answer.objects, regions), args.overlay)
    if args.json:
        json.dump(answer_to_dict(answer, args.image), sys.stdout, indent=2)
        print()
    else:
        print(answer.text)
        for k, o in enumerate(answer.objects):
            x1, y1, x2, y2 = o.box
            print(f"  [{k}] {o.phrase!r}: box ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}) score {o.score:.2f}"
                  f" mask {int(o.mask.sum()) if o.mask is not None else 0} px (IoU pred {o.mask_score:.2f})")
        if args.overlay:
            print(f"overlay: {args.overlay}")
    return 0
