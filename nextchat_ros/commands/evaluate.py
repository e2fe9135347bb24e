"""``nextchat evaluate``: held-out metrics of a model on the synthetic tabletop tasks."""

from __future__ import annotations

import argparse
import json
import sys

from ..synthetic.samples import RENDERERS, TASKS

HELP = "evaluate a model on held-out synthetic scenes (REC, masks, POPE, captions, ...)"
DESCRIPTION = """\
Evaluate a model on procedurally generated held-out tabletop scenes (seeds that
training never sees) and print REC Acc@0.5 and mean IoU, mask mIoU and cIoU,
POPE-style yes/no accuracy / precision / recall / F1, region-caption attribute
accuracy, counting, colour-VQA and instruction accuracy, REC accuracy per kind
of referring expression, and per-task counts.

The default mix (REC 3 : POPE 2 : region captions 2 : each other task 1) gives
each task a share of --num-samples; --task asks every sample of one task, for a
figure on that many questions of its own.

--dataset picks the drawings: tabletop (the 2D painter; the shipped model is
trained on it alone) and solids (3D solids splatted through a perspective camera)
are the training renderers, so their held-out seeds are new scenes of drawings a
run may have seen (solids only where its config mixes them in); raycast draws the
same kinds, colours and sizes with a ray caster (perspective, shaded solids, cast
shadows, textures, camera effects) that shares no code with either and that no
training run uses: held-out drawings, not only held-out seeds. Report both.

examples:
  nextchat evaluate --model nextchat_ros/assets/models/tiny --num-samples 1000 --json
  nextchat evaluate --task pope --num-samples 1000
  nextchat evaluate --dataset raycast --task rec --num-samples 1000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .ground import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--split", choices=["heldout", "test"], default="heldout")
    parser.add_argument("--dataset", choices=list(RENDERERS), default="tabletop",
                        help="tabletop (default) or solids: the training renderers (new seeds); "
                             "raycast: the held-out ray-cast renderer no training uses")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--task", choices=TASKS, help="every sample of this task (default: the mix of all tasks)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from ..synthetic.evaluate import evaluate, format_metrics
    from .ground import predictor_from_args

    tasks = {args.task: 1.0} if args.task else None
    metrics = evaluate(predictor_from_args(args), args.split, args.num_samples, task_weights=tasks,
                       progress=not args.json, renderer=args.dataset)
    if args.json:
        json.dump(metrics, sys.stdout, indent=2)
        print()
    else:
        print(format_metrics(metrics))
    return 0
