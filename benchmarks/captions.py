"""Grounded captions: does an answer ground two of its objects at one box, and does it
find the objects that are there?

    .venv/bin/python benchmarks/captions.py [--model DIR] [model options: --help] [--num-scenes 200]
        [--renderer tabletop | solids | raycast] [--json out.json]

Asks "describe the image." about held-out scenes (seeds no training run used) and
reports, over the answers, the share with two objects at one box (decoder boxes at
IoU >= 0.8), and object recall and precision at IoU 0.5 against the scene's objects:
for the objects the predictor returns (duplicates merged) and for every box the
answer decoded (``Answer.location_boxes``: what it returned before merging).
"""

from __future__ import annotations

from common import RENDERERS, draw_scene, model_parser, write_json
from tqdm import tqdm

from nextchat_ros.commands.ground import predictor_from_args
from nextchat_ros.images import box_iou, normalized_to_pixels
from nextchat_ros.predictor import DUPLICATE_IOU

SEED_OFFSET = 7_500_000


def has_duplicates(boxes) -> bool:
    return any(box_iou(a, b) >= DUPLICATE_IOU for i, a in enumerate(boxes) for b in boxes[i + 1:])


def matched(pred_boxes, true_boxes) -> tuple[int, int]:
    """(true objects found, predicted boxes on some true object), at IoU 0.5."""
    found = sum(any(box_iou(p, t) >= 0.5 for p in pred_boxes) for t in true_boxes)
    right = sum(any(box_iou(p, t) >= 0.5 for t in true_boxes) for p in pred_boxes)
    return found, right


def main(argv=None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--num-scenes", type=int, default=200)
    parser.add_argument("--renderer", choices=RENDERERS, default="tabletop")
    args = parser.parse_args(argv)
    predictor = predictor_from_args(args)
    tallies = {name: {"duplicates": 0, "found": 0, "right": 0, "boxes": 0} for name in ("returned", "decoded")}
    truths = 0
    for k in tqdm(range(args.num_scenes), desc="captions", unit="scene"):
        seed = SEED_OFFSET + k
        scene = draw_scene(args.renderer, seed)
        predictor.set_image(scene.image)
        answer = predictor.ask("describe the image.", masks=False)
        h, w = scene.image.shape[:2]
        true_boxes = [o.box for o in scene.objects]
        truths += len(true_boxes)
        kinds = {"returned": [o.decoder_box for o in answer.objects],
                 "decoded": [normalized_to_pixels(b, h, w) for b in answer.location_boxes]}
        for name, boxes in kinds.items():
            tally = tallies[name]
            tally["duplicates"] += has_duplicates(boxes)
            found, right = matched(boxes, true_boxes)
            tally["found"] += found
            tally["right"] += right
            tally["boxes"] += len(boxes)
    figures = {"renderer": args.renderer, "answers": args.num_scenes, "true_objects": truths}
    for name, t in tallies.items():
        figures[name] = {"duplicate_box_answers": t["duplicates"] / args.num_scenes,
                         "object_recall@0.5": t["found"] / max(truths, 1),
                         "object_precision@0.5": t["right"] / max(t["boxes"], 1), "boxes": t["boxes"]}
        print(f"{name:>9}: duplicate boxes in {figures[name]['duplicate_box_answers']:.3f} of answers, "
              f"object recall {figures[name]['object_recall@0.5']:.3f}, "
              f"precision {figures[name]['object_precision@0.5']:.3f} ({t['boxes']} boxes)")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
