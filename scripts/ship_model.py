"""Copy a trained model into nextchat_ros/assets/models/tiny/ with its model card.

    .venv/bin/python scripts/ship_model.py --run out/train/tiny

Reads the run's report.json (stages, wall time, held-out metrics) and writes
README.md (the model card) beside config.json, model.safetensors and tokenizer.json.
The metrics can instead come from a later `nextchat evaluate --num-samples 1000 --json`
of the same weights (--metrics), when the predictor changed after training, and
--sections adds hand-written sections (figures of other commands) to the card.

Each quality bar is a metric of one task, and the mixed evaluation asks only part
of its 1000 questions of that task (e.g. ~180 yes/no questions). With
--task-metrics (one `nextchat evaluate --task T --num-samples 1000 --json` file per
task) the card judges each bar on 1000 questions of its own task and keeps the
mixed table beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

from nextchat_ros.model.build import DEFAULT_MODEL_DIR

BARS = {"rec_acc@0.5": 0.90, "mask_miou": 0.80, "pope_accuracy": 0.90, "region_caption_attribute_accuracy": 0.85}
# The task whose questions each bar's metric is measured on.
BAR_TASKS = {"rec_acc@0.5": "rec", "mask_miou": "rec", "pope_accuracy": "pope",
             "region_caption_attribute_accuracy": "region_caption"}


def single_task(metrics: dict, path: Path) -> str:
    """The task of a `nextchat evaluate --task T --json` file (refuses a mixed one)."""
    counts = {task: n for task, n in metrics.get("task_counts", {}).items() if n}
    if len(counts) != 1:
        raise SystemExit(f"{path}: not a single-task evaluation (task counts {counts})")
    return next(iter(counts))


def verdict(key: str, value: float) -> str:
    bar = BARS[key]
    return f">= {bar}: {'met' if value >= bar else f'MISSED by {bar - value:.3f}'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("out/train/tiny"))
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--note", default="", help="a paragraph for the card (how the run went)")
    parser.add_argument("--sections", type=Path, default=None, metavar="FILE",
                        help="a markdown file of hand-written sections (figures measured by other commands), "
                             "placed after the quality bars")
    parser.add_argument("--metrics", type=Path, default=None,
                        help="held-out metrics from `nextchat evaluate --json` of these weights, instead of the "
                             "run's report.json (e.g. after a change to the predictor)")
    parser.add_argument("--task-metrics", type=Path, nargs="+", default=[], metavar="FILE",
                        help="`nextchat evaluate --task T --num-samples 1000 --json` files of these weights, one "
                             "per task: the bars are then judged on them (each on questions of its own task)")
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    if args.metrics is not None:
        report["heldout_metrics"] = json.loads(args.metrics.read_text())
    by_task = {}
    for path in args.task_metrics:
        task_metrics = json.loads(path.read_text())
        by_task[single_task(task_metrics, path)] = task_metrics
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(args.run / "final" / name, args.out / name)
    metrics = report.get("heldout_metrics", {})
    mixed_heading = f"## Held-out metrics ({metrics.get('num_samples', 0)} samples, `nextchat evaluate`)"
    size_mb = sum((args.out / n).stat().st_size for n in ("config.json", "model.safetensors", "tokenizer.json")) / 1e6
    lines = [
        "# nextchat_ros tiny model (shipped default)",
        "",
        "The `tiny` preset trained from scratch on procedurally generated tabletop scenes",
        "(`training/`), for robots' grounding queries. Not a general-purpose model.",
        "",
        "| | |", "|---|---|",
        f"| command | `nextchat train --config {report['config']}` |",
        "| seeds | init seed 0, data = pure function of the sample index (train seeds from 0, "
        "held-out seeds from 1e9) |",
        "| stages | " + ", ".join(f"{s['name']} ({s['steps']} steps x {s['batch_size']}"
                                  + (f" rows x {s['turns_per_image']} samples" if s.get("turns_per_image", 1) > 1
                                     else "") + ")" for s in report["stages"]) + " |",
        f"| wall time | {report['total_seconds'] / 60:.1f} min in all; "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["train_seconds"].items()) + " |",
        f"| machine | {platform.machine()}, {report['torch_threads']} CPU threads, torch {torch.__version__}, "
        f"device {report['device']} |",
        f"| size | {size_mb:.1f} MB (config.json, model.safetensors, tokenizer.json) |",
        "",
        mixed_heading,
        "",
        "| metric | value | bar |", "|---|---|---|",
    ]
    # bar -> (value, number of questions of its task) from the per-task evaluations
    own_task = {key: (by_task[task][key], by_task[task]["task_counts"][task]) for key, task in BAR_TASKS.items()
                if task in by_task and key in by_task[task]}
    for key, value in metrics.items():
        if isinstance(value, float):
            if key in own_task:
                mark = f"bar {BARS[key]}: judged on its own task, above"
            else:
                mark = verdict(key, value) if key in BARS else ""
            lines.append(f"| {key} | {value:.3f} | {mark} |")
    if own_task:
        lines[lines.index(mixed_heading):0] = [
            "## Quality bars, each on held-out questions of its own task (`nextchat evaluate --task T`)",
            "",
            "| metric | task | questions | value | bar |", "|---|---|---|---|---|",
            *(f"| {key} | {BAR_TASKS[key]} | {n} | {value:.3f} | {verdict(key, value)} |"
              for key, (value, n) in own_task.items()),
            "",
        ]
    # each bar's value: its own task's evaluation where given, else the mixed one's
    judged = {key: own_task[key][0] if key in own_task else metrics[key] for key in BARS
              if key in own_task or key in metrics}
    missed = [key for key, value in judged.items() if value < BARS[key]]
    status = (f"**Status: below the quality bars ({', '.join(missed)}).** Where a bar is missed, this model's "
              "answers are not reliable; it ships so that every part of the pipeline runs with a trained "
              "model, and as the baseline to beat." if missed else "Status: meets every quality bar.")
    if args.sections is not None:
        at = lines.index(mixed_heading)
        lines[at:at] = [args.sections.read_text().strip(), ""]
    lines[4:4] = ["", status, ""]
    if args.note:
        lines[7:7] = [args.note, ""]
    lines += ["", f"task counts: {metrics.get('task_counts')}", ""]
    for task, task_metrics in by_task.items():
        lines += [f"### `nextchat evaluate --task {task} --num-samples {task_metrics.get('num_samples')}`", "",
                  "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.3f} |" for k, v in task_metrics.items() if isinstance(v, float)), ""]
    (args.out / "README.md").write_text("\n".join(lines))
    print(f"shipped {args.out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
