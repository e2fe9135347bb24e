"""Does the model say "not there", and does its score tell a right box from a wrong one?

    .venv/bin/python benchmarks/absence.py [--model DIR] [model options: --help] [--num-scenes 200]
        [--renderer tabletop | solids | raycast] [--min-score 0.5] [--json out.json]

For each held-out synthetic scene (seeds no training run used; the project's own
renderer, or the held-out ray caster; a scene with an unlisted occluded object asks
no absent question) it asks, the way the node asks (``queries.read_query``'s mode):
  - "where is the {colour} {kind}?" about one object that is there (present) and
    about a colour + kind that is not (absent);
  - "pick up the {colour} {kind}." about the same absent one.
A query is refused when the answer keeps no object at ``--min-score`` (the node's
``min_score``; each question is asked once, keeping every object, and the objects
below it are the ones the node drops). It prints the refusal rates (the JSON has
them at every min_score from 0.05 to 0.95, for choosing one),
and for the object scores of the where-questions: AUROC for telling a right box
(IoU >= 0.5 with the named object) from a wrong or absent one, and the expected
calibration error (10 equal-width bins) of the score read as P(right).
"""

from __future__ import annotations

import numpy as np
from common import RENDERERS, draw_scene, model_parser, write_json
from tqdm import tqdm

from nextchat_ros.commands.ground import predictor_from_args
from nextchat_ros.options import DEFAULT_MIN_SCORE
from nextchat_ros.queries import read_query
from nextchat_ros.scoring import box_iou
from nextchat_ros.synthetic.scenes import COLORS, KINDS

# Seeds far from any training stream's (those count up from 0 per split).
SEED_OFFSET = 7_300_000


def auroc(scores: np.ndarray, right: np.ndarray) -> float:
    """P(score of a right one > score of a wrong one), ties counted half."""
    pos, neg = scores[right], scores[~right]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def expected_calibration_error(scores: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(scores[members].mean() - right[members].mean())
    return float(error)


def ask(predictor, question):
    """The answer with every object (min_score 0): each keeps its score."""
    return predictor.ask(question, mode=read_query(question).mode, min_score=0.0, masks=False)


def main(argv=None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--num-scenes", type=int, default=200, help="scenes, three questions each (default 200)")
    parser.add_argument("--renderer", choices=RENDERERS, default="tabletop")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE)
    args = parser.parse_args(argv)

    predictor = predictor_from_args(args)
    rng = np.random.default_rng(0)
    # Per question, the highest score of its answer's objects (-1: none): refused at
    # a min_score when that is below it.
    best = {"present where": [], "absent where": [], "absent pick up": []}
    scores, right = [], []
    for k in tqdm(range(args.num_scenes), desc="absence", unit="scene"):
        scene = draw_scene(args.renderer, SEED_OFFSET + k)
        predictor.set_image(scene.image)
        there = {(o.color, o.kind) for o in scene.objects}
        # A present target the colour + kind name uniquely.
        unique = [o for o in scene.objects if sum((p.color, p.kind) == (o.color, o.kind) for p in scene.objects) == 1]
        missing = [(c, kind) for c in COLORS for kind in KINDS if (c, kind) not in there]
        if unique:
            target = unique[int(rng.integers(len(unique)))]
            answer = ask(predictor, f"where is the {target.color} {target.kind}?")
            best["present where"].append(max((o.score for o in answer.objects), default=-1.0))
            for obj in answer.objects[:1]:
                scores.append(obj.score)
                right.append(box_iou(obj.box, target.box) >= 0.5)
        if getattr(scene, "hidden", None):  # a painted but unlisted occluded object could be the "absent" one
            continue
        color, kind = missing[int(rng.integers(len(missing)))]
        for name, question in (("absent where", f"where is the {color} {kind}?"),
                               ("absent pick up", f"pick up the {color} {kind}.")):
            answer = ask(predictor, question)
            best[name].append(max((o.score for o in answer.objects), default=-1.0))
            if name == "absent where":
                for obj in answer.objects[:1]:
                    scores.append(obj.score)
                    right.append(False)
    scores_a, right_a = np.asarray(scores, float), np.asarray(right, bool)

    def refused_at(threshold: float) -> dict[str, float]:
        return {name: float(np.mean(np.asarray(v) < threshold)) for name, v in best.items()}
    figures = {
        "renderer": args.renderer, "min_score": args.min_score,
        "refused": refused_at(args.min_score),
        "questions": {name: len(v) for name, v in best.items()},
        # Every min_score at once, for choosing one (on renderers the model was trained on).
        "refused_by_min_score": {f"{t:.2f}": refused_at(t) for t in np.round(np.arange(0.05, 1.0, 0.05), 2)},
        "score_auroc_right_vs_wrong_or_absent": auroc(scores_a, right_a),
        "score_expected_calibration_error": expected_calibration_error(scores_a, right_a),
        "score_min": float(scores_a.min()) if len(scores_a) else float("nan"),
        "scored_objects": len(scores_a),
    }
    print("refused (no object): " + ", ".join(f"{n} {v:.3f} of {figures['questions'][n]}"
                                               for n, v in figures["refused"].items()))
    print(f"score: AUROC {figures['score_auroc_right_vs_wrong_or_absent']:.3f}, "
          f"ECE {figures['score_expected_calibration_error']:.3f}, lowest {figures['score_min']:.4f} "
          f"over {figures['scored_objects']} objects")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
