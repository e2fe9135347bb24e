"""Scores of a replay, and the report a person reads: metrics.json, report.md,
an IoU histogram, a latency CDF and grids of the best and worst answers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..scoring import Prediction, Scoreboard
from ..service import Status
from .replay import QueryRecord, ReplayResult

HEADLINE = ["rec_acc@0.5", "rec_mean_iou", "mask_miou", "mask_ciou", "pope_accuracy", "pope_f1",
            "region_caption_attribute_accuracy", "answer_exact_match"]
# The figure each task's row of the per-task table shows.
TASK_METRIC = {"rec": "rec_acc@0.5", "instruction": "instruction_acc@0.5", "pope": "pope_accuracy",
               "region_caption": "region_caption_attribute_accuracy", "count": "count_accuracy",
               "color_vqa": "color_vqa_accuracy", "multi": "multi_recall@0.5",
               "grounded_caption": "grounded_caption_recall@0.5"}


def percentiles(values) -> dict[str, float]:
    values = np.asarray([v for v in values if v is not None], float)
    if not len(values):
        return {}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "max": float(values.max())}


def score(result: ReplayResult) -> dict:
    """Metrics of one replay. Queries without a result, or with an error status,
    score as empty answers: the figures are what a robot would have got."""
    board = Scoreboard()
    statuses = Counter()
    for r in result.records:
        statuses["NO_RESULT" if r.status is None else Status(r.status).name] += 1
        if r.truth is not None:
            pred = r.prediction if r.status == 0 and r.prediction is not None else Prediction("")
            r.score = board.add(r.truth, pred)
    answered = [r for r in result.records if r.status is not None]
    metrics = {
        "mode": result.mode,
        "bag": result.bag,
        "queries": len(result.records),
        "answered": len(answered),
        "dropped": len(result.records) - len(answered),
        "refused_overloaded": statuses.get("OVERLOADED", 0),
        "status_counts": dict(sorted(statuses.items())),
        "frames": result.frames,
        "wall_s": result.wall_s,
        "throughput_qps": len(answered) / result.wall_s if result.wall_s else 0.0,
        "latency_ms": percentiles(r.latency_ms for r in answered),
        "with_truth": sum(r.truth is not None for r in result.records),
    }
    for stage in ("queue_ms", "image_encode_ms", "llm_ms", "mask_ms"):
        metrics[f"{stage[:-3]}_latency_ms"] = percentiles(r.stage_ms.get(stage) for r in answered)
    if metrics["with_truth"]:
        metrics["scores"] = board.summary()
    if result.error:
        metrics["error"] = result.error
    if result.output_bag:
        metrics["output_bag"] = result.output_bag
    return metrics


def query_row(r: QueryRecord) -> dict:
    """One query's outcome as a JSON object (queries_<mode>.jsonl)."""
    pred = r.prediction
    return {"id": r.key, "task": r.truth.task if r.truth else None, "query": r.text,
            "status": None if r.status is None else Status(r.status).name, "error": r.error,
            "answer": pred.text if pred else None,
            "boxes": [[round(float(v), 3) for v in b] for b in pred.boxes] if pred else [],
            "truth_boxes": [list(map(float, b)) for b in r.truth.boxes] if r.truth else [],
            "latency_ms": r.latency_ms, "score": r.score}


def compare(live: dict, offline: dict) -> dict:
    """Live minus offline: what transport and the node's threads add, and whether
    both paths scored the same."""
    out = {}
    for key in ("p50", "p95", "p99", "mean"):
        if key in live.get("latency_ms", {}) and key in offline.get("latency_ms", {}):
            out[f"latency_{key}_ms"] = live["latency_ms"][key] - offline["latency_ms"][key]
    a, b = live.get("scores", {}), offline.get("scores", {})
    out["score_differences"] = {k: a[k] - b[k] for k in a if isinstance(a.get(k), float) and k in b
                                and abs(a[k] - b[k]) > 1e-9}
    return out


# --- images ----------------------------------------------------------------------------

def _frame_rgb(record: QueryRecord):
    from ..ros_images import image_msg_to_rgb
    from .io import deserialize

    if record.frame is None:
        return None
    try:
        return image_msg_to_rgb(deserialize(record.frame, "sensor_msgs/msg/Image"))
    except Exception:  # an unusable frame simply has no overlay
        return None


def _overlay(record: QueryRecord) -> np.ndarray | None:
    from types import SimpleNamespace

    from PIL import Image, ImageDraw

    from ..overlay import draw_overlay

    image = _frame_rgb(record)
    if image is None:
        return None
    pred = record.prediction or Prediction("")
    objects = [SimpleNamespace(phrase=f"#{k}", box=b, score=1.0,
                               mask=pred.masks[k] if pred.masks and k < len(pred.masks) else None)
               for k, b in enumerate(pred.boxes)]
    canvas = Image.fromarray(draw_overlay(image, objects, regions=record.regions or None))
    draw = ImageDraw.Draw(canvas)
    for box in (record.truth.boxes if record.truth else []):  # ground truth: thin green
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=1)
    return np.asarray(canvas)


def _caption(record: QueryRecord) -> list[str]:
    figure = ", ".join(f"{k} {v:.2f}" for k, v in record.score.items())
    status = "no result" if record.status is None else Status(record.status).name
    answer = record.prediction.text if record.prediction else record.error
    return [f"{record.key} [{record.truth.task if record.truth else '?'}] {status} {figure}",
            f"Q: {record.text}"[:70], f"A: {answer}"[:70]]


def overlay_grid(records: list[QueryRecord], path: Path, title: str, columns: int = 3, tile: int = 320) -> bool:
    from PIL import Image, ImageDraw, ImageFont

    tiles = []
    for r in records:
        image = _overlay(r)
        if image is None:
            continue
        img = Image.fromarray(image)
        img = img.resize((tile, max(1, round(img.height * tile / img.width))))
        tiles.append((img, _caption(r)))
    if not tiles:
        return False
    font = ImageFont.load_default()
    text_h, title_h = 40, 20
    cell_h = max(t.height for t, _ in tiles) + text_h
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, title_h + rows * cell_h), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(255, 255, 255), font=font)
    for k, (img, lines) in enumerate(tiles):
        x, y = (k % columns) * tile, title_h + (k // columns) * cell_h
        sheet.paste(img, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + img.height + 1 + 12 * j), line, fill=(230, 230, 230), font=font)
    sheet.save(path)
    return True


def _plots(runs: dict[str, tuple[ReplayResult, dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, (result, _) in runs.items():
        ious = [r.score["iou"] for r in result.records if "iou" in r.score]
        if ious:
            ax.hist(ious, bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{mode} (n={len(ious)})")
    if ax.has_data():
        ax.axvline(0.5, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("box IoU with the truth (REC and instruction targets)")
        ax.set_ylabel("queries")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "iou_histogram.png", dpi=100)
        made.append("iou_histogram.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, (result, _) in runs.items():
        lat = np.sort([r.latency_ms for r in result.records if r.latency_ms is not None])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=mode)
    if ax.has_data():
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (live: query publish -> result receipt; offline: compute)")
        ax.set_ylabel("fraction of queries")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=100)
        made.append("latency_cdf.png")
    plt.close(fig)
    return made


def _rank_key(r: QueryRecord) -> float:
    if "iou" in r.score:
        return r.score["iou"]
    if "correct" in r.score:
        return r.score["correct"]
    return float("nan")


def write_report(out: str | Path, runs: dict[str, ReplayResult], examples: int = 6) -> dict:
    """Score each run (``{"live": ..., "offline": ...}``), write metrics.json,
    report.md, plots and overlay grids into ``out``; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scored = {mode: (result, score(result)) for mode, result in runs.items()}
    metrics = {mode: m for mode, (_, m) in scored.items()}
    if "live" in metrics and "offline" in metrics:
        metrics["live_minus_offline"] = compare(metrics["live"], metrics["offline"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for mode, result in runs.items():
        with open(out / f"queries_{mode}.jsonl", "w") as lines:
            for r in result.records:
                lines.write(json.dumps(query_row(r)) + "\n")
    plots = _plots(scored, out)
    primary = scored.get("live") or scored.get("offline")
    grids = []
    if primary is not None:
        records = primary[0].records
        ranked = [r for r in records if not np.isnan(_rank_key(r))]
        if ranked:
            ranked.sort(key=_rank_key)
            if overlay_grid(ranked[::-1][:examples], out / "best.png", "best answers (green: truth)"):
                grids.append("best.png")
            if overlay_grid(ranked[:examples], out / "worst.png", "worst answers (green: truth)"):
                grids.append("worst.png")
        elif overlay_grid([r for r in records if r.status == 0][:examples], out / "examples.png",
                          "answers (the bag has no ground truth)"):
            grids.append("examples.png")
    (out / "report.md").write_text(_markdown(metrics, plots, grids))
    return metrics


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(metrics: dict, plots: list[str], grids: list[str]) -> str:
    runs = [m for m in ("live", "offline") if m in metrics]
    first = metrics[runs[0]]
    lines = [f"# nextchat bag eval: {Path(first['bag']).name}", ""]
    for mode in runs:
        if "error" in metrics[mode]:
            lines += [f"**{mode} replay stopped early:** {metrics[mode]['error']} "
                      "(the figures below cover the queries before that point)", ""]
    lines += ["## Headline", "", "| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    rows = [("queries", "queries"), ("answered", "answered"), ("dropped (no result)", "dropped"),
            ("refused (OVERLOADED)", "refused_overloaded"), ("throughput, queries/s", "throughput_qps")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics[m][key]) for m in runs) + " |")
    for q in ("p50", "p95", "p99"):
        lines.append(f"| latency {q}, ms | " + " | ".join(_fmt(metrics[m]["latency_ms"].get(q, "-")) for m in runs)
                     + " |")
    for key in HEADLINE:
        if any(key in metrics[m].get("scores", {}) for m in runs):
            lines.append(f"| {key} | " + " | ".join(_fmt(metrics[m].get("scores", {}).get(key, "-")) for m in runs)
                         + " |")
    lines.append("")
    if "live_minus_offline" in metrics:
        diff = metrics["live_minus_offline"]
        lines += ["Transport overhead (live minus offline latency): "
                  + ", ".join(f"{k.removeprefix('latency_').removesuffix('_ms')} {v:+.1f} ms"
                              for k, v in diff.items() if k.startswith("latency_")) + ".",
                  "Score differences between live and offline: "
                  + (", ".join(f"{k} {v:+.4f}" for k, v in diff["score_differences"].items()) or "none") + ".", ""]
    statuses = sorted({s for m in runs for s in metrics[m]["status_counts"]})
    lines += ["## Result status", "", "| status | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for s in statuses:
        lines.append(f"| {s} | " + " | ".join(str(metrics[m]["status_counts"].get(s, 0)) for m in runs) + " |")
    lines.append("")
    scores = metrics[runs[0]].get("scores")
    if scores:
        lines += ["## Per task", "", "| task | queries | metric | " + " | ".join(runs) + " |",
                  "|---|---|---|" + "---|" * len(runs)]
        for task, n in scores["task_counts"].items():
            key = TASK_METRIC.get(task)
            values = [_fmt(metrics[m].get("scores", {}).get(key, "-")) if key else "-" for m in runs]
            lines.append(f"| {task} | {n} | {key or '-'} | " + " | ".join(values) + " |")
        lines += ["", "All metrics: `metrics.json`.", ""]
    else:
        lines += ["The bag carries no ground truth: latency and throughput only.", ""]
    stages = [("queue", "queue_latency_ms"), ("image encode", "image_encode_latency_ms"),
              ("LLM", "llm_latency_ms"), ("mask", "mask_latency_ms")]
    lines += ["## Where the time goes (p50, ms, as the node measured it)", "",
              "| stage | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for label, key in stages:
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics[m][key].get("p50", "-")) for m in runs) + " |")
    lines.append("")
    for image in plots + grids:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)
