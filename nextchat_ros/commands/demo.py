"""``nextchat demo``: the quick-start demo on generated tabletop scenes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "quick-start demo: generated scenes + one real photo, scripted questions, overlay PNGs"
DESCRIPTION = """\
Render a few procedural tabletop scenes (and one real photo), ask the shipped
model a scripted sequence of questions and instructions about each, print every
answer with its boxes, and write overlay PNGs and a JSON summary to --out.
"""

SCRIPT = [
    ("where is the {target}?", "ground"),
    ("pick up the {target}.", "generate"),
    ("is there a {absent} in the image?", "generate"),
    ("describe [0].", "generate"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .ground import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--scenes", type=int, default=3, help="number of generated scenes (default: 3)")
    parser.add_argument("--seed", type=int, default=20261126, help="first scene seed")


def _demo_model(model_dir: Path | None, out: Path) -> tuple[Path, bool]:
    """The model to use, and whether it is trained."""
    from ..model.build import DEFAULT_MODEL_DIR, build_model
    from ..model.checkpoint import save_pretrained

    if model_dir is not None:
        return model_dir, True
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return DEFAULT_MODEL_DIR, True
    # No shipped model in this checkout yet: a randomly initialised tiny model keeps
    # the whole pipeline runnable; its answers and boxes are meaningless.
    untrained = out / "untrained-tiny"
    if not (untrained / "model.safetensors").is_file():
        save_pretrained(build_model("tiny", seed=0), untrained)
    return untrained, False


def run(args: argparse.Namespace) -> int:
    from ..overlay import draw_overlay, save_png
    from ..scenes import COLORS, KINDS, real_photo, render_scene
    from .ground import answer_to_dict, load_predictor

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, trained = _demo_model(args.model, args.out)
    print(f"model: {model_dir}" + ("" if trained else "  (UNTRAINED random weights: no shipped model yet)"))
    predictor = load_predictor(model_dir, args.device)

    frames = []
    for i in range(args.scenes):
        scene = render_scene(args.seed + i, height=240, width=320)
        frames.append((f"scene{args.seed + i}", scene.image, scene.objects))
    photo = real_photo("coffee", 240, 320)
    if photo is not None:
        frames.append(("photo-coffee", photo, []))

    summary = []
    for name, image, objects in frames:
        t0 = time.perf_counter()
        predictor.set_image(image)
        encode_ms = (time.perf_counter() - t0) * 1e3
        present = {(o.color, o.kind) for o in objects}
        target = f"{objects[-1].color} {objects[-1].kind}" if objects else "cup"
        absent = next((f"{c} {k}" for c in COLORS for k in KINDS if (c, k) not in present), "red cube")
        h, w = image.shape[:2]
        region = [w * 0.3, h * 0.3, w * 0.7, h * 0.7] if not objects else list(objects[-1].box)
        print(f"\n== {name} ({w}x{h}, encoded in {encode_ms:.0f} ms) ==")
        for k, (template, mode) in enumerate(SCRIPT):
            query = template.format(target=target, absent=absent)
            regions = [region] if "[0]" in query else None
            answer = predictor.ask(query, regions=regions, mode=mode)
            print(f"Q: {query}\nA: {answer.text}   ({answer.timings_ms['ask_ms']:.0f} ms)")
            for j, o in enumerate(answer.objects):
                print(f"   [{j}] {o.phrase!r} box ({', '.join(f'{v:.0f}' for v in o.box)}) score {o.score:.2f}")
            overlay = args.out / f"{name}-q{k}.png"
            save_png(draw_overlay(image, answer.objects, regions), overlay)
            summary.append({"frame": name, "query": query, **answer_to_dict(answer), "overlay": str(overlay)})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {len(summary)} overlays and summary.json to {args.out}")
    return 0
