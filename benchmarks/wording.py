"""Does the way a question is typed change the answer? REC Acc@0.5 of the same
held-out referring questions written several ways, and how often each way gives
the same box as the template wording.

    .venv/bin/python benchmarks/wording.py [--model DIR] [model options: --help] [--num-samples 300] [--json out.json]

The questions are the synthetic held-out split's REC questions (the template
wording, e.g. "where is the red cube?"). The first variants rewrite only their
case, spacing or punctuation, so a model that reads text the way a person means
it scores the same on all of them. Then everyday names of the kinds ("block",
"sphere", "mug", "tube", "donut", "flask": in the shipped model's synonym list, so
met by construction), and operator phrasings no template produces (held out): a
bare noun phrase, a polite request, "where's", "i need ...".
"""

from __future__ import annotations

import json
import re

import numpy as np
from common import model_parser
from tqdm import tqdm

from nextchat_ros.commands.ground import predictor_from_args
from nextchat_ros.queries import read_query
from nextchat_ros.scoring import box_iou
from nextchat_ros.synthetic.samples import SyntheticTabletop

EVERYDAY = {"cube": "block", "ball": "sphere", "cup": "mug", "cylinder": "tube", "ring": "donut", "bottle": "flask"}


def everyday_names(q: str) -> str:
    return re.sub(r"\b(" + "|".join(EVERYDAY) + r")\b", lambda m: EVERYDAY[m.group(1)], q)


# Each variant: (template question, its referring expression) -> what is typed.
VARIANTS = {
    "template": lambda q, ref: q,
    "UPPER CASE": lambda q, ref: q.upper(),
    "Capitalised": lambda q, ref: q[:1].upper() + q[1:],
    "no final mark": lambda q, ref: q.rstrip("?.!"),
    "UPPER, no final mark": lambda q, ref: q.upper().rstrip("?.!"),
    "extra spaces": lambda q, ref: "  " + "   ".join(q.split()) + "  ",
    "everyday names (synonym list)": lambda q, ref: everyday_names(q),
    "bare noun phrase (held out)": lambda q, ref: f"the {ref}",
    "polite request (held out)": lambda q, ref: f"Could you please find the {ref} for me?",
    "where's (held out)": lambda q, ref: f"where's the {ref}?",
    "i need (held out)": lambda q, ref: f"I need the {ref}.",
}


def main(argv=None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--num-samples", type=int, default=300, help="REC questions (default 300)")
    args = parser.parse_args(argv)

    predictor = predictor_from_args(args)
    stream = SyntheticTabletop("heldout", {"rec": 1.0}, height=240, width=320)
    hits = {name: [] for name in VARIANTS}
    same = {name: [] for name in VARIANTS}
    for index in tqdm(range(args.num_samples), desc="wording", unit="question"):
        scene, sample = stream.item(index)
        predictor.set_image(scene.image)
        truth = sample.answer_objects[0].box
        boxes = {}
        for name, rewrite in VARIANTS.items():
            question = rewrite(sample.question, sample.truth["expression"])
            answer = predictor.ask(question, mode=read_query(question).mode)
            box = answer.objects[0].box if answer.objects else None
            boxes[name] = box
            hits[name].append(box is not None and box_iou(box, truth) >= 0.5)
        for name, box in boxes.items():
            reference = boxes["template"]
            same[name].append(box is not None and reference is not None and np.allclose(box, reference, atol=1e-3))
    figures = {name: {"rec_acc@0.5": float(np.mean(hits[name])), "same_box_as_template": float(np.mean(same[name]))}
               for name in VARIANTS}
    print(f"{'wording':<32}{'REC Acc@0.5':>12}{'same box':>10}   ({args.num_samples} held-out questions)")
    for name, f in figures.items():
        print(f"{name:<32}{f['rec_acc@0.5']:>12.3f}{f['same_box_as_template']:>10.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"num_samples": args.num_samples, "variants": figures}, out, indent=2)


if __name__ == "__main__":
    main()
