"""``nextchat bag record|eval``: evaluation bags (rosbag2) written, replayed through
the live node, scored and reported."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HELP = "record evaluation rosbags and replay them through the live node (scores, latency, report)"
DESCRIPTION = """\
record: write a self-contained rosbag2 (mcap by default) with camera images and
  camera_info, queries (nextchat_ros/msg/Query) at a realistic rate, and each
  query's ground truth on its own topic (nextchat_ros/msg/QueryTruth).
eval:   replay a bag into a running grounding node with the recorded timing
  (scaled by --rate), record what it publishes into an output bag, match results
  to queries by id, and score them: REC Acc@0.5, mean IoU, mask mIoU / cIoU,
  POPE yes/no accuracy, answer correctness, latency p50/p95/p99 (query publish
  -> result receipt), refusals and drops. --offline scores the same queries
  straight through the predictor (no ROS), --compare does both and reports the
  transport overhead. Bags without truth (a robot's own recordings of images and
  queries) give latency, throughput and overlays.

examples:
  nextchat bag record --dataset synthetic --count 200 --out bags/heldout200
  nextchat bag eval --bag bags/heldout200 --compare --out bags/heldout200_eval
  nextchat bag eval --bag robot_run/ --image-topic /head_camera/image_raw --offline
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .ground import add_model_arguments

    sub = parser.add_subparsers(dest="bag_command", metavar="<record|eval>", required=True)
    rec = sub.add_parser("record", help="write an evaluation bag", description=DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("--dataset", choices=["synthetic", "jsonl"], default="synthetic",
                     help="synthetic held-out tabletop scenes, or a Shikra / NExT-Chat jsonl file")
    rec.add_argument("--out", required=True, help="output bag directory (must not exist)")
    rec.add_argument("--count", type=int, default=200, help="number of queries (default 200)")
    rec.add_argument("--split", choices=["heldout", "test", "train"], default="heldout",
                     help="synthetic split (default heldout: seeds training never sees)")
    rec.add_argument("--start", type=int, default=0, help="first synthetic sample index")
    rec.add_argument("--tasks", default=None,
                     help="synthetic task weights, e.g. 'rec=3,pope=2,region_caption=2' (default: the "
                          "evaluation mix of `nextchat evaluate`)")
    rec.add_argument("--jsonl", help="jsonl file (--dataset jsonl)")
    rec.add_argument("--task", choices=["rec", "reg", "gc", "vqa"], default="rec", help="jsonl task")
    rec.add_argument("--image-root", default=".", help="directory the jsonl image paths are relative to")
    rec.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    rec.add_argument("--camera-rate", type=float, default=5.0, help="camera frames per second (default 5)")
    rec.add_argument("--query-period", type=float, default=0.5,
                     help="seconds between queries; each query's scene is on camera for this long (default 0.5)")
    ev = sub.add_parser("eval", help="replay a bag through the node and score it", description=DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--bag", required=True, help="bag directory")
    ev.add_argument("--out", default=None, help="report directory (default: <bag>_eval)")
    ev.add_argument("--rate", type=float, default=1.0, help="replay speed factor (default 1.0 = recorded timing)")
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="score through the predictor only (no ROS)")
    mode.add_argument("--compare", action="store_true", help="live and offline, and the difference")
    add_model_arguments(ev)
    ev.add_argument("--node-namespace", default=None,
                    help="use an already running node under this namespace instead of starting one")
    ev.add_argument("--image-topic", default=None, help="the bag's camera topic (needed if it has several)")
    ev.add_argument("--query-topic", default=None, help="the bag's query topic (Query or std_msgs/String)")
    ev.add_argument("--wait", type=float, default=60.0, help="seconds to wait for late results after the bag ends")
    ev.add_argument("--examples", type=int, default=6, help="overlays in each of the best / worst grids")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    return _record(args) if args.bag_command == "record" else _eval(args)


def _parse_tasks(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        weights[name.strip()] = float(value or 1.0)
    return weights


def synthetic_items(split: str, count: int, start: int = 0, task_weights=None):
    """Held-out synthetic samples as RecordItems (lazily: one scene at a time)."""
    from ..bag.record import RecordItem
    from ..synthetic.evaluate import sample_truth
    from ..synthetic.samples import EVAL_TASK_WEIGHTS, SyntheticTabletop

    stream = SyntheticTabletop(split, task_weights or EVAL_TASK_WEIGHTS)
    for index in range(start, start + count):
        scene, sample = stream.item(index)
        yield RecordItem(scene.image, sample.question, [list(map(float, r)) for r in sample.regions],
                         sample_truth(sample), scene.camera)


def jsonl_items(path: str, task: str, image_root: str, count: int):
    from nextchat_training.formats import read_jsonl

    from ..bag.record import RecordItem
    from ..overlay import load_rgb
    from ..scoring import Truth

    for k, sample in enumerate(read_jsonl(path, task, image_root)):
        if k >= count:
            return
        # A jsonl region caption is free text (no colour / kind facts): scored by its words.
        truth = Truth("reg" if sample.task == "region_caption" else sample.task, sample.answer,
                      sample.answer_boxes, sample.masks)
        yield RecordItem(load_rgb(sample.image_path), sample.question, sample.regions, truth)


def _record(args) -> int:
    from ..bag.record import record
    from ..errors import UsageError

    if args.count <= 0:
        raise UsageError("--count must be positive")
    if args.dataset == "synthetic":
        items = synthetic_items(args.split, args.count, args.start, _parse_tasks(args.tasks))
    else:
        if not args.jsonl:
            raise UsageError("--dataset jsonl needs --jsonl FILE")
        items = jsonl_items(args.jsonl, args.task, args.image_root, args.count)
    summary = record(items, args.out, count=args.count, storage=args.storage, camera_rate=args.camera_rate,
                     query_period=args.query_period)
    print(f"wrote {summary['queries']} queries and {summary['frames']} frames "
          f"({summary['duration_s']:.0f} s of recording) to {summary['bag']} ({summary['storage']})")
    return 0


def _eval(args) -> int:
    from ..bag.io import bag_info
    from ..bag.topics import Topics

    bag = Path(args.bag)
    # From the bag's metadata, before anything loads a model: a wrong path or topic is
    # refused at once.
    info = bag_info(bag)
    Topics.detect(info, args.image_topic, args.query_topic)

    from .. import node_process
    from ..bag.replay import replay_live, replay_offline, start_node
    from ..bag.report import write_report
    from .ground import predictor_from_args

    out = Path(args.out) if args.out else bag.with_name(bag.name + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.json
    runs = {}
    if not args.offline:
        namespace = args.node_namespace
        process = None
        if namespace is None:
            namespace = f"/nextchat_bag_eval_{os.getpid()}"
            extra = {"export_dir": args.export_dir} if args.export_dir else {}
            if args.precision:
                extra["precision"] = args.precision
            process = start_node(namespace, args.model, args.backend, args.device, extra, out / "node.log")
        output_bag = out / f"results_{time.strftime('%Y%m%d_%H%M%S')}"
        try:
            runs["live"] = replay_live(bag, namespace, rate=args.rate, image_topic=args.image_topic,
                                       query_topic=args.query_topic, output_bag=output_bag, wait_s=args.wait,
                                       node_process=process, progress=progress, info=info)
        finally:
            if process is not None:
                node_process.stop_node(process, timeout=15)
    if args.offline or args.compare:
        runs["offline"] = replay_offline(bag, predictor_from_args(args), image_topic=args.image_topic,
                                         query_topic=args.query_topic, progress=progress, info=info)
    metrics = write_report(out, runs, examples=args.examples)
    if args.json:
        json.dump(metrics, sys.stdout, indent=2)
        print()
    else:
        print((out / "report.md").read_text())
        print(f"report: {out / 'report.md'}")
    stopped = [m.get("error") for m in metrics.values() if isinstance(m, dict) and m.get("error")]
    if stopped:
        print(f"nextchat bag eval: the bag could not be read to the end: {stopped[0]}", file=sys.stderr)
        return 3
    return 0
