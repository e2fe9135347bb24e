"""What the behaviour benchmarks share: their command line (the model options every
`nextchat` command takes, and --json)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from nextchat_ros.commands.ground import add_model_arguments


def model_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)  # --model, --device, --backend, ... as every command takes them
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


RENDERERS = ("tabletop", "solids", "raycast")


def draw_scene(renderer: str, seed: int):
    """A held-out scene of ``renderer`` (tabletop: the 2D painter, no photo background;
    solids: the 3D training renderer, a seed its training pool does not hold; raycast:
    the renderer no training run sees), 320x240."""
    if renderer == "raycast":
        from nextchat_ros.synthetic.raycast import render_raycast

        return render_raycast(seed, height=240, width=320)
    if renderer == "solids":
        from nextchat_ros.synthetic.solids import render_solids

        return render_solids(seed, height=240, width=320)
    from nextchat_ros.synthetic.scenes import render_scene

    return render_scene(seed, height=240, width=320, photo_probability=0.0)


def write_json(path: str | None, figures: dict) -> None:
    """``--json``: the figures, as a file."""
    if path:
        with open(path, "w") as out:
            json.dump(figures, out, indent=2)


def median_ms(fn, args=(), repeats: int = 10, sync=lambda: None, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in ms over ``repeats`` calls, after ``warmup``;
    ``sync`` (e.g. torch.cuda.synchronize) ends each call so device work is counted."""
    for _ in range(warmup):
        fn(*args)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_info(device, preset: str, dtype: str) -> dict:
    """What a timing was measured on: the machine, the device, torch, the preset and dtype."""
    import torch

    return {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__, "preset": preset, "dtype": dtype}
