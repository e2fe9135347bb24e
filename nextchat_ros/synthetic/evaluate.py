"""Held-out evaluation of a model on the synthetic tabletop tasks.

Metrics: REC Acc@0.5 and mean IoU (grounding fast path), mask mIoU and cIoU,
POPE-style yes/no accuracy / precision / recall / F1 (and per negative
strategy), region-caption attribute accuracy (colour and kind both right),
counting and colour-VQA accuracy, instruction target Acc@0.5, multi-object
grounding recall and precision at IoU 0.5, and per-task sample counts.
"""

from __future__ import annotations

from tqdm import tqdm

from ..predictor import NextChatPredictor
from ..queries import read_query
from ..scoring import Prediction, Scoreboard, Truth, truth_info
from .samples import EVAL_TASK_WEIGHTS, SyntheticTabletop, expression_type


def sample_truth(sample) -> Truth:
    """A synthetic sample's ground truth, for :class:`nextchat_ros.scoring.Scoreboard`;
    a referring expression's kind (this grammar's) goes in ``info["expression_type"]``."""
    info = truth_info(sample.truth)
    if info.get("expression"):
        info["expression_type"] = expression_type(info["expression"])
    return Truth(sample.task, sample.answer, [o.box for o in sample.answer_objects],
                 [o.mask for o in sample.answer_objects], info)


def ask(predictor: NextChatPredictor, question: str, regions=None):
    """A question asked the way the node asks it (``queries.read_query``'s mode, the
    predictor's default token budget, as the node's): the offline bag replay asks
    the same way, through the node's GroundingService."""
    return predictor.ask(question, regions=regions or None, mode=read_query(question).mode)


def evaluate(predictor: NextChatPredictor, split: str = "heldout", num_samples: int = 1000, task_weights=None,
             height: int = 240, width: int = 320, progress: bool = True, start: int = 0,
             renderer: str = "tabletop") -> dict:
    """The metrics of ``predictor`` (``NextChatPredictor(model)`` for a model in memory)
    on ``num_samples`` synthetic samples of ``split``, drawn by ``renderer``
    (``samples.RENDERERS``: ``tabletop`` or ``solids``, which training draws, or the
    held-out ``raycast``)."""
    stream = SyntheticTabletop(split, task_weights or EVAL_TASK_WEIGHTS, height=height, width=width,
                               renderer=renderer)
    items = (stream.item(index) for index in range(start, start + num_samples))
    return score_samples(predictor, items, desc=f"evaluate {renderer} {split}", progress=progress,
                         total=num_samples)


def score_samples(predictor: NextChatPredictor, items, desc: str = "evaluate", progress: bool = True,
                  total: int | None = None) -> dict:
    """The metrics of the answers to (scene, sample) ``items``, each asked as the node
    asks it; consecutive samples about one scene share its encoding."""
    board = Scoreboard()
    encoded = None
    for scene, sample in tqdm(items, desc=desc, total=total, disable=not progress, unit="sample"):
        if scene is not encoded:
            predictor.set_image(scene.image)
            encoded = scene
        answer = ask(predictor, sample.question, sample.regions)
        board.add(sample_truth(sample), Prediction(answer.text, answer.objects))
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
