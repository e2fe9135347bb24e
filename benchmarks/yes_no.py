"""What do a model's yes/no answers follow: the image, or the words of the question?

    .venv/bin/python benchmarks/yes_no.py [--model DIR] [model options: --help] [--num-questions 300]
        [--renderer tabletop | solids | raycast] [--json out.json]

It asks the held-out yes/no questions of `nextchat evaluate --task pope` ("is there
a {colour} {kind} in the image?"; the same questions in the same order, asked the
same way) and prints how often the model says "yes":
  - by the truth and the asked kind: a model that reads the image says "yes" to the
    yeses and "no" to the nos of every kind; one that keys on the question says the
    same to both;
  - by the truth and what of the question the scene holds (its kind, its colour);
  - by the negative's strategy (random, popular, adversarial);
and two agreements: with the truth (the accuracy), and with the model's own
commonest answer for the asked kind (1.0: the kind alone says what it answers).
Beside them, the data's own "blind" accuracy: the best guess from the asked kind
alone, which questions without a prior hold near 0.5.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from common import RENDERERS, model_parser, write_json
from tqdm import tqdm

from nextchat_ros.commands.ground import predictor_from_args
from nextchat_ros.scoring import said_yes
from nextchat_ros.synthetic.evaluate import ask
from nextchat_ros.synthetic.samples import SyntheticTabletop, pope_asked


def rate(rows: list[dict], key) -> dict[str, dict]:
    """P(the model said yes) and the question count, per value of ``key(row)``."""
    groups = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row["said"] == "yes")
    return {name: {"p_yes": sum(v) / len(v), "questions": len(v)} for name, v in sorted(groups.items())}


def agreement(rows: list[dict], by: str, field: str) -> float:
    """How often ``field`` is the commonest value of ``field`` among the rows of the same ``by``."""
    groups = defaultdict(Counter)
    for row in rows:
        groups[row[by]][row[field]] += 1
    return sum(max(c.values()) for c in groups.values()) / len(rows)


def main(argv=None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--num-questions", type=int, default=300, help="yes/no questions (default 300)")
    parser.add_argument("--renderer", choices=RENDERERS, default="tabletop")
    args = parser.parse_args(argv)

    predictor = predictor_from_args(args)
    stream = SyntheticTabletop("heldout", {"pope": 1.0}, renderer=args.renderer)
    rows = []
    for index in tqdm(range(args.num_questions), desc=f"yes/no {args.renderer}", unit="question"):
        scene, sample = stream.item(index)
        predictor.set_image(scene.image)
        answer = ask(predictor, sample.question)
        color, kind = pope_asked(sample.question)
        rows.append({"label": sample.truth["label"], "strategy": sample.truth["strategy"], "kind": kind,
                     "said": "yes" if said_yes(answer.text) else "no",
                     "holds": ("kind" if any(o.kind == kind for o in scene.objects) else "no kind") + ", " +
                              ("colour" if any(o.color == color for o in scene.objects) else "no colour")})
    figures = {
        "renderer": args.renderer, "questions": len(rows),
        "accuracy": sum(r["said"] == r["label"] for r in rows) / len(rows),
        "answer_follows_asked_kind": agreement(rows, "kind", "said"),
        "data_blind_accuracy_from_asked_kind": agreement(rows, "kind", "label"),
        "p_yes_by_truth_and_kind": rate(rows, lambda r: f"{r['label']} / {r['kind']}"),
        "p_yes_by_truth_and_scene": rate(rows, lambda r: f"{r['label']} / {r['holds']}"),
        "p_yes_by_strategy": rate(rows, lambda r: r["strategy"]),
    }
    for name in ("p_yes_by_truth_and_kind", "p_yes_by_truth_and_scene", "p_yes_by_strategy"):
        print(name.replace("_", " ") + ":")
        for group, v in figures[name].items():
            print(f"  {group:<28} {v['p_yes']:.2f} of {v['questions']}")
    print(f"accuracy {figures['accuracy']:.3f}; the answer follows the asked kind "
          f"{figures['answer_follows_asked_kind']:.3f}; the data's blind accuracy from the asked kind "
          f"{figures['data_blind_accuracy_from_asked_kind']:.3f} ({len(rows)} questions, {args.renderer})")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
