"""The shipped model on scenes it was not drawn from: a ray-cast renderer of its own.

    .venv/bin/python benchmarks/unseen_renderer.py [--model DIR] [--num-scenes 300] [--out out/unseen_renderer]

The model is trained on two renderers, flat 2D drawings (``synthetic.scenes``) and
3D solids splatted into a z-buffer (``synthetic.solids``);
``nextchat_ros.synthetic.raycast`` renders the same kinds, colours and sizes by a
code path that shares nothing with them (perspective, shaded solids, cast shadows,
textures, camera effects; exact masks). ``nextchat evaluate --dataset raycast``
gives the full metric set on it; this script puts the three renderers side by side
on the same questions per scene and writes a contact sheet.

The questions come from the project's own question code
(``synthetic.samples.make_sample``) and are asked the way the node asks them, so
the only difference from ``nextchat evaluate``'s held-out figures is the drawing.
It prints REC Acc@0.5 (all expressions and per kind of expression), mask mIoU,
yes/no accuracy / precision / recall and region-caption accuracy on the ray-cast
scenes beside the same number of held-out scenes of each renderer training draws
(the 2D painter and the 3D solids), and writes a contact sheet of ray-cast scenes
to --out.

No training run uses the ray-cast renderer: it is held out, for measuring only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from nextchat_ros.commands.ground import add_model_arguments, predictor_from_args
from nextchat_ros.synthetic.evaluate import score_samples
from nextchat_ros.synthetic.raycast import render_raycast
from nextchat_ros.synthetic.samples import SyntheticTabletop, make_sample
from nextchat_ros.synthetic.scenes import Scene

TASKS = ("rec", "pope", "region_caption")
SEED_OFFSET = 9_100_000  # its own seeds; the renderer is what is new, not only the seed


def contact_sheet(scenes: list[Scene], path: Path, columns: int = 4) -> None:
    h, w = scenes[0].image.shape[:2]
    rows = (len(scenes) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, scene in enumerate(scenes):
        sheet.paste(Image.fromarray(scene.image), ((k % columns) * w, (k // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def questions(scenes, rng) -> list:
    out = []
    for scene in scenes:
        for task in TASKS:
            sample = make_sample(scene, task, rng)
            if sample is not None:
                out.append((scene, sample))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)  # --model, --device, --backend, ... as every command takes them
    parser.add_argument("--num-scenes", type=int, default=300, help="scenes per renderer, one question per task each")
    parser.add_argument("--out", type=Path, default=Path("out/unseen_renderer"), help="contact sheet and figures")
    args = parser.parse_args(argv)

    predictor = predictor_from_args(args)
    raycast = [render_raycast(SEED_OFFSET + k) for k in tqdm(range(args.num_scenes), desc="render", unit="scene")]
    contact_sheet(raycast[:12], args.out / "raycast_scenes.png")
    figures = {"raycast (unseen)": score_samples(predictor, questions(raycast, np.random.default_rng(1)), "raycast")}
    for name in ("tabletop", "solids"):  # the renderers training draws, on held-out seeds
        stream = SyntheticTabletop("heldout", renderer=name)
        seen = [stream.scene_samples(k, 1)[0] for k in range(args.num_scenes)]
        figures[f"{name} (trained on; held-out seeds)"] = score_samples(
            predictor, questions(seen, np.random.default_rng(1)), name)
    keys = [k for k in next(iter(figures.values())) if isinstance(next(iter(figures.values()))[k], float)
            and k.split("_")[0] in ("rec", "mask", "pope", "region")]
    names = list(figures)
    print(f"{'metric':<44}" + "".join(f"{n:>36}" for n in names))
    for key in keys:
        print(f"{key:<44}" + "".join(f"{figures[n].get(key, float('nan')):>36.3f}" for n in names))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"contact sheet: {args.out / 'raycast_scenes.png'}; figures: {args.out / 'figures.json'}")


if __name__ == "__main__":
    main()
