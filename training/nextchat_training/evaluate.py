"""Held-out evaluation of a model on the synthetic tabletop tasks.

Metrics: REC Acc@0.5 and mean IoU (grounding fast path), mask mIoU and cIoU,
POPE-style yes/no accuracy / precision / recall / F1 (and per negative
strategy), region-caption attribute accuracy (colour and kind both right),
counting and colour-VQA accuracy, instruction target Acc@0.5, multi-object
grounding recall and precision at IoU 0.5, and per-task sample counts.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.scenes import COLORS, KINDS

from .data import NUMBERS, SyntheticTabletop

EVAL_TASK_WEIGHTS = {"rec": 3.0, "pope": 2.0, "region_caption": 2.0, "instruction": 1.0, "multi": 1.0,
                     "grounded_caption": 1.0, "count": 1.0, "color_vqa": 1.0}


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _match(pred_boxes, true_boxes, threshold=0.5) -> int:
    """Greedy one-to-one matches at IoU >= threshold."""
    used, hits = set(), 0
    for t in true_boxes:
        best = max(((box_iou(p, t), j) for j, p in enumerate(pred_boxes) if j not in used), default=(0, None))
        if best[0] >= threshold:
            used.add(best[1])
            hits += 1
    return hits


def evaluate(model, split: str = "heldout", num_samples: int = 1000, task_weights=None, height: int = 240,
             width: int = 320, progress: bool = True, start: int = 0) -> dict:
    predictor = NextChatPredictor(model)
    stream = SyntheticTabletop(split, task_weights or EVAL_TASK_WEIGHTS, height=height, width=width)
    acc = defaultdict(list)
    counts = defaultdict(int)
    inter_sum = union_sum = 0
    pope = defaultdict(int)
    examples = []
    for index in tqdm(range(start, start + num_samples), desc=f"evaluate {split}", disable=not progress,
                      unit="sample"):
        scene, sample = stream.item(index)
        counts[sample.task] += 1
        predictor.set_image(scene.image)
        if sample.task == "rec":
            answer = predictor.ask(sample.question, mode="ground")
            obj, truth = answer.objects[0], sample.answer_objects[0]
            iou = box_iou(obj.box, truth.box)
            acc["rec_acc@0.5"].append(iou >= 0.5)
            acc["rec_mean_iou"].append(iou)
            inter = int((obj.mask & truth.mask).sum())
            union = int((obj.mask | truth.mask).sum())
            acc["mask_miou"].append(inter / union if union else 1.0)
            inter_sum += inter
            union_sum += union
            examples.append({"task": "rec", "index": index, "iou": iou, "question": sample.question})
            continue
        regions = sample.regions or None
        answer = predictor.ask(sample.question, regions=regions, max_new_tokens=40)
        words = _words(answer.text)
        boxes = [o.box for o in answer.objects]
        if sample.task == "pope":
            said = "yes" if words[:1] == ["yes"] else "no"
            label = sample.truth["label"]
            pope[("tp" if said == "yes" else "fn") if label == "yes" else ("fp" if said == "yes" else "tn")] += 1
            acc["pope_accuracy"].append(said == label)
            if label == "no":
                acc[f"pope_{sample.truth['strategy']}_accuracy"].append(said == label)
        elif sample.task == "region_caption":
            colors = [w for w in words if w in COLORS]
            kinds = [w for w in words if w in KINDS]
            acc["region_caption_attribute_accuracy"].append(
                colors[:1] == [sample.truth["color"]] and kinds[:1] == [sample.truth["kind"]])
            acc["region_caption_color_accuracy"].append(colors[:1] == [sample.truth["color"]])
            acc["region_caption_kind_accuracy"].append(kinds[:1] == [sample.truth["kind"]])
        elif sample.task == "count":
            said = next((NUMBERS.index(w) for w in words if w in NUMBERS), None)
            acc["count_accuracy"].append(said == sample.truth["count"])
        elif sample.task == "color_vqa":
            colors = [w for w in words if w in COLORS]
            acc["color_vqa_accuracy"].append(colors[-1:] == [sample.truth["color"]])
        elif sample.task == "instruction":
            acc["instruction_acc@0.5"].append(bool(boxes) and box_iou(boxes[0], sample.answer_boxes[0]) >= 0.5)
        elif sample.task in ("multi", "grounded_caption"):
            hits = _match(boxes, sample.answer_boxes)
            acc[f"{sample.task}_recall@0.5"].append(hits / len(sample.answer_boxes))
            acc[f"{sample.task}_precision@0.5"].append(hits / len(boxes) if boxes else 0.0)
    metrics = {k: float(np.mean(v)) for k, v in sorted(acc.items())}
    if union_sum:
        metrics["mask_ciou"] = inter_sum / union_sum
    if pope:
        tp, fp, fn = pope["tp"], pope["fp"], pope["fn"]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        metrics.update(pope_precision=precision, pope_recall=recall,
                       pope_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    metrics["num_samples"] = num_samples
    metrics["task_counts"] = dict(sorted(counts.items()))
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines.append(f"{key:<40}" + ", ".join(f"{k}={v}" for k, v in value.items()))
        elif isinstance(value, float):
            lines.append(f"{key:<40}{value:.4f}")
        else:
            lines.append(f"{key:<40}{value}")
    return "\n".join(lines)
