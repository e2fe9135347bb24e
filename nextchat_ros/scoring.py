"""Scoring answers against ground truth, the same way everywhere.

``nextchat evaluate`` (predictor answers on held-out scenes) and ``nextchat bag
eval`` (results the node published, or the offline run of the same queries)
both turn each answer into a :class:`Prediction` (its text and its
``records.GroundedObject`` list), each truth into a :class:`Truth`, and add them to a
:class:`Scoreboard`, so a figure means the same thing whichever path produced it.

Metrics: REC Acc@0.5 and mean IoU (also per kind of referring expression where
the truth names it: ``info["expression_type"]``), mask mIoU and cIoU (REC samples), POPE-style
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

from .images import box_iou
from .records import GroundedObject
from .synthetic.scenes import COLORS, KINDS

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
    """One answer: its text and the objects it grounds, in answer order."""

    text: str
    objects: list[GroundedObject] = field(default_factory=list)

    @property
    def boxes(self) -> list:
        return [o.box for o in self.objects]  # pixel xyxy

    @property
    def masks(self) -> list | None:
        masks = [o.mask for o in self.objects]
        return masks if masks and all(m is not None for m in masks) else None

    @property
    def decoder_boxes(self) -> list | None:
        """The box decoder's own boxes where ``boxes`` are the masks' tight boxes: REC is
        then also scored on these. None where the objects came from messages."""
        boxes = [o.decoder_box for o in self.objects]
        return boxes if all(b is not None for b in boxes) else None


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
        # task -> scorer(truth, prediction) -> this answer's own figures
        self._scorers = {"rec": self._rec, "pope": self._pope, "region_caption": self._region_caption,
                         "count": self._count, "color_vqa": self._color_vqa, "instruction": self._instruction,
                         "multi": self._grounded_objects, "grounded_caption": self._grounded_objects}

    def add(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        """Score one answer; returns this answer's own figures (e.g. ``iou``). A task
        without a scorer of its own (free text: reg, vqa) is scored by its words only."""
        self.counts[truth.task] += 1
        if truth.answer and truth.task in EXACT_ANSWER_TASKS:
            self.values["answer_exact_match"].append(words(pred.text) == words(truth.answer))
        scorer = self._scorers.get(truth.task)
        return scorer(truth, pred) if scorer is not None else {}

    def _rec(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        acc = self.values
        iou = first_box_iou(pred.boxes, truth.boxes)
        own = {"iou": iou}
        acc["rec_acc@0.5"].append(iou >= 0.5)
        acc["rec_mean_iou"].append(iou)
        if truth.info.get("expression_type"):
            self.rec_by_expression[truth.info["expression_type"]].append(iou >= 0.5)
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
        return own

    def _pope(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        yes, truth_yes = said_yes(pred.text), truth.info.get("label", "") == "yes"
        self.pope[("tp" if yes else "fn") if truth_yes else ("fp" if yes else "tn")] += 1
        self.values["pope_accuracy"].append(yes == truth_yes)
        if not truth_yes and truth.info.get("strategy"):
            self.values[f"pope_{truth.info['strategy']}_accuracy"].append(not yes)
        return {"correct": float(yes == truth_yes)}

    def _region_caption(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        said = words(pred.text)
        color_ok = [w for w in said if w in COLORS][:1] == [truth.info.get("color")]
        kind_ok = [w for w in said if w in KINDS][:1] == [truth.info.get("kind")]
        self.values["region_caption_attribute_accuracy"].append(color_ok and kind_ok)
        self.values["region_caption_color_accuracy"].append(color_ok)
        self.values["region_caption_kind_accuracy"].append(kind_ok)
        return {"correct": float(color_ok and kind_ok)}

    def _count(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        said = next((NUMBERS.index(w) for w in words(pred.text) if w in NUMBERS), None)
        correct = str(said) == truth.info.get("count")
        self.values["count_accuracy"].append(correct)
        return {"correct": float(correct)}

    def _color_vqa(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        correct = [w for w in words(pred.text) if w in COLORS][-1:] == [truth.info.get("color")]
        self.values["color_vqa_accuracy"].append(correct)
        return {"correct": float(correct)}

    def _instruction(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        iou = first_box_iou(pred.boxes, truth.boxes)
        self.values["instruction_acc@0.5"].append(iou >= 0.5)
        return {"iou": iou}

    def _grounded_objects(self, truth: Truth, pred: Prediction) -> dict[str, float]:
        """multi and grounded_caption: every true object found once, at IoU 0.5."""
        hits = greedy_matches(pred.boxes, truth.boxes)
        self.values[f"{truth.task}_recall@0.5"].append(hits / len(truth.boxes) if truth.boxes else 1.0)
        self.values[f"{truth.task}_precision@0.5"].append(hits / len(pred.boxes) if pred.boxes else 0.0)
        return {}

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
