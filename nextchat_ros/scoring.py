"""Scoring answers against ground truth, the same way everywhere.

``nextchat evaluate`` (predictor answers on held-out scenes) and ``nextchat bag
eval`` (results the node published, or the offline run of the same queries)
both turn each answer into a :class:`Prediction`, each truth into a
:class:`Truth`, and add them to a :class:`Scoreboard`, so a figure means the
same thing whichever path produced it.

Metrics: REC Acc@0.5 and mean IoU (also per kind of referring expression where
the truth names it), mask mIoU and cIoU (REC samples), POPE-style
yes/no accuracy / precision / recall / F1 (and accuracy per negative strategy),
region-caption attribute accuracy (colour and kind both right, and each alone),
counting, colour-VQA and instruction target Acc@0.5, multi-object and grounded
caption recall / precision at IoU 0.5, exact answer match where a reference
answer exists, and per-task counts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .scenes import COLORS, KINDS, SIZES

# Every task of the synthetic tabletop data (training/nextchat_training/data.py),
# which the Scoreboard scores; here so that the runtime (`nextchat evaluate --task`)
# knows them without training/ installed.
TASKS = ("rec", "multi", "region_caption", "grounded_caption", "count", "pope", "instruction", "color_vqa")
NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]
# Tasks whose reference answer is fixed text worth comparing word for word.
EXACT_ANSWER_TASKS = ("count", "pope", "color_vqa", "region_caption", "vqa", "reg")


@dataclass
class Truth:
    """What is known to be right about one query. ``boxes`` are pixel xyxy of the
    objects the answer should ground (in order); ``masks`` bool images or None;
    ``info`` holds task-specific strings (label, color, kind, count, strategy)."""

    task: str
    answer: str = ""
    boxes: list = field(default_factory=list)
    masks: list | None = None
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class Prediction:
    text: str
    boxes: list = field(default_factory=list)  # pixel xyxy, in answer order
    masks: list | None = None  # bool images, one per box, or None
    # The box decoder's own boxes where ``boxes`` are the masks' tight boxes (the
    # predictor's GroundedObject.decoder_box): REC is then also scored on these.
    decoder_boxes: list | None = None


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def first_box_iou(pred_boxes, true_boxes) -> float:
    """IoU of the first predicted box with the first true one; 0 when either is missing."""
    return box_iou(pred_boxes[0], true_boxes[0]) if len(pred_boxes) and len(true_boxes) else 0.0


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def greedy_matches(pred_boxes, true_boxes, threshold: float = 0.5) -> int:
    """Greedy one-to-one matches at IoU >= threshold."""
    used, hits = set(), 0
    for t in true_boxes:
        best = max(((box_iou(p, t), j) for j, p in enumerate(pred_boxes) if j not in used), default=(0, None))
        if best[0] >= threshold:
            used.add(best[1])
            hits += 1
    return hits


def expression_type(expression: str) -> str:
    """The kind of a synthetic referring expression (``training/`` data's grammar),
    e.g. "ring left of the red cube" -> "relation", "green object" -> "color object",
    "smallest object" -> "smallest object", "leftmost cup" -> "leftmost kind"."""
    said = expression.split()
    if any(f" {r} the " in f" {expression} " for r in ("left of", "right of", "behind")):
        return "relation"
    if expression.startswith("object nearest to"):
        return "nearest to anchor"
    if said[0] in ("leftmost", "rightmost", "largest", "smallest", "nearest"):
        return f"{said[0]} " + ("object" if said[-1] == "object" else "kind")
    if said[-1] == "object":
        return "color object"
    if len(said) == 1:
        return "kind"
    return "size kind" if said[0] in SIZES else "color kind"


def said_yes(text: str) -> bool:
    return words(text)[:1] == ["yes"]


class Scoreboard:
    """Accumulates per-query scores; :meth:`summary` gives the metrics dict."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self.pope: dict[str, int] = defaultdict(int)
        self.rec_by_expression: dict[str, list[bool]] = defaultdict(list)
        self.inter_sum = 0
        self.union_sum = 0

    def add(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        """Score one answer; returns this answer's own figures (e.g. ``iou``)."""
        task = truth.task
        self.counts[task] += 1
        own: dict[str, float] = {}
        acc = self.values
        if truth.answer and task in EXACT_ANSWER_TASKS:
            acc["answer_exact_match"].append(words(pred.text) == words(truth.answer))
        if task == "rec":
            iou = first_box_iou(pred.boxes, truth.boxes)
            own["iou"] = iou
            acc["rec_acc@0.5"].append(iou >= 0.5)
            acc["rec_mean_iou"].append(iou)
            if truth.info.get("expression"):
                self.rec_by_expression[expression_type(truth.info["expression"])].append(iou >= 0.5)
            if pred.decoder_boxes is not None:
                decoder_iou = first_box_iou(pred.decoder_boxes, truth.boxes)
                acc["rec_decoder_acc@0.5"].append(decoder_iou >= 0.5)
                acc["rec_decoder_mean_iou"].append(decoder_iou)
            if truth.masks:
                true_mask = truth.masks[0]
                pred_mask = pred.masks[0] if pred.masks else np.zeros_like(true_mask)
                inter = int((pred_mask & true_mask).sum())
                union = int((pred_mask | true_mask).sum())
                own["mask_iou"] = inter / union if union else 1.0
                acc["mask_miou"].append(own["mask_iou"])
                self.inter_sum += inter
                self.union_sum += union
        elif task == "pope":
            yes, label = said_yes(pred.text), truth.info.get("label", "")
            truth_yes = label == "yes"
            self.pope[("tp" if yes else "fn") if truth_yes else ("fp" if yes else "tn")] += 1
            acc["pope_accuracy"].append(yes == truth_yes)
            own["correct"] = float(yes == truth_yes)
            if not truth_yes and truth.info.get("strategy"):
                acc[f"pope_{truth.info['strategy']}_accuracy"].append(not yes)
        elif task == "region_caption":
            said = words(pred.text)
            colors = [w for w in said if w in COLORS]
            kinds = [w for w in said if w in KINDS]
            color_ok = colors[:1] == [truth.info.get("color")]
            kind_ok = kinds[:1] == [truth.info.get("kind")]
            acc["region_caption_attribute_accuracy"].append(color_ok and kind_ok)
            acc["region_caption_color_accuracy"].append(color_ok)
            acc["region_caption_kind_accuracy"].append(kind_ok)
            own["correct"] = float(color_ok and kind_ok)
        elif task == "count":
            said = next((NUMBERS.index(w) for w in words(pred.text) if w in NUMBERS), None)
            own["correct"] = float(str(said) == truth.info.get("count"))
            acc["count_accuracy"].append(bool(own["correct"]))
        elif task == "color_vqa":
            colors = [w for w in words(pred.text) if w in COLORS]
            own["correct"] = float(colors[-1:] == [truth.info.get("color")])
            acc["color_vqa_accuracy"].append(bool(own["correct"]))
        elif task == "instruction":
            iou = first_box_iou(pred.boxes, truth.boxes)
            own["iou"] = iou
            acc["instruction_acc@0.5"].append(iou >= 0.5)
        elif task in ("multi", "grounded_caption"):
            hits = greedy_matches(pred.boxes, truth.boxes)
            acc[f"{task}_recall@0.5"].append(hits / len(truth.boxes) if truth.boxes else 1.0)
            acc[f"{task}_precision@0.5"].append(hits / len(pred.boxes) if pred.boxes else 0.0)
        return own

    def summary(self) -> dict:
        metrics = {k: float(np.mean(v)) for k, v in sorted(self.values.items())}
        if self.union_sum:
            metrics["mask_ciou"] = self.inter_sum / self.union_sum
        if self.pope:
            tp, fp, fn = self.pope["tp"], self.pope["fp"], self.pope["fn"]
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            metrics.update(pope_precision=precision, pope_recall=recall,
                           pope_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        if self.rec_by_expression:  # which referring expressions the boxes fail on
            by_count = sorted(self.rec_by_expression.items(), key=lambda kv: -len(kv[1]))
            metrics["rec_acc@0.5_by_expression"] = {k: round(float(np.mean(v)), 3) for k, v in by_count}
            metrics["rec_count_by_expression"] = {k: len(v) for k, v in by_count}
        metrics["num_samples"] = sum(self.counts.values())
        metrics["task_counts"] = dict(sorted(self.counts.items()))
        return metrics


def truth_info(truth: dict) -> dict[str, str]:
    """A synthetic sample's ``truth`` dict as strings (what a bag can carry)."""
    return {str(k): str(v) for k, v in truth.items()}
