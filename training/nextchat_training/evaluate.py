"""Held-out evaluation of a model on the synthetic tabletop tasks.

Metrics: REC Acc@0.5 and mean IoU (grounding fast path), mask mIoU and cIoU,
POPE-style yes/no accuracy / precision / recall / F1 (and per negative
strategy), region-caption attribute accuracy (colour and kind both right),
counting and colour-VQA accuracy, instruction target Acc@0.5, multi-object
grounding recall and precision at IoU 0.5, and per-task sample counts.
"""

from __future__ import annotations

from tqdm import tqdm

from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.scoring import Prediction, Scoreboard, Truth, truth_info

from .data import SyntheticTabletop

EVAL_TASK_WEIGHTS = {"rec": 3.0, "pope": 2.0, "region_caption": 2.0, "instruction": 1.0, "multi": 1.0,
                     "grounded_caption": 1.0, "count": 1.0, "color_vqa": 1.0}


def sample_truth(sample) -> Truth:
    """A synthetic sample's ground truth, for :class:`nextchat_ros.scoring.Scoreboard`."""
    return Truth(sample.task, sample.answer, [o.box for o in sample.answer_objects],
                 [o.mask for o in sample.answer_objects], truth_info(sample.truth))


def evaluate(model, split: str = "heldout", num_samples: int = 1000, task_weights=None, height: int = 240,
             width: int = 320, progress: bool = True, start: int = 0) -> dict:
    predictor = NextChatPredictor(model)
    stream = SyntheticTabletop(split, task_weights or EVAL_TASK_WEIGHTS, height=height, width=width)
    board = Scoreboard()
    for index in tqdm(range(start, start + num_samples), desc=f"evaluate {split}", disable=not progress,
                      unit="sample"):
        scene, sample = stream.item(index)
        predictor.set_image(scene.image)
        if sample.task == "rec":  # the grounding fast path, as the node uses for "where is ..." queries
            answer = predictor.ask(sample.question, mode="ground")
        else:
            answer = predictor.ask(sample.question, regions=sample.regions or None, max_new_tokens=40)
        board.add(sample_truth(sample),
                  Prediction(answer.text, [o.box for o in answer.objects], [o.mask for o in answer.objects],
                             [o.decoder_box for o in answer.objects]))
    return board.summary()


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
