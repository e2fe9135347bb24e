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


def plot_heatmaps(path: str, panels: list[list[dict]], cell: tuple[float, float] = (4.0, 3.6)) -> None:
    """Write a grid of heatmaps in [0, 1] to a PNG. ``panels``: rows of dicts with
    ``values`` (2D), ``xticks``, ``yticks``, ``title``, ``xlabel``, ``ylabel`` and,
    optionally, ``annotate`` (write each value in its cell) and ``rotate_x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = max(len(row) for row in panels)
    fig, axes = plt.subplots(len(panels), columns, figsize=(cell[0] * columns, cell[1] * len(panels)), squeeze=False)
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            ax, values = axes[i, j], np.asarray(panel["values"], dtype=float)
            ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
            if panel.get("annotate"):
                for (r, c), value in np.ndenumerate(values):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
            if panel.get("rotate_x"):
                ax.set_xticks(range(len(panel["xticks"])), panel["xticks"], rotation=45, ha="right")
            else:
                ax.set_xticks(range(len(panel["xticks"])), panel["xticks"])
            ax.set_yticks(range(len(panel["yticks"])), panel["yticks"])
            ax.set_title(panel["title"])
            ax.set_xlabel(panel["xlabel"])
            ax.set_ylabel(panel["ylabel"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
