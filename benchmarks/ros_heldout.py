"""The node over ROS on scenes of the held-out renderer: grounding, and an instruction
about something absent.

    .venv/bin/python benchmarks/ros_heldout.py [--model DIR] [--num-scenes 10] [--renderer raycast] [--json out.json]

Starts the ``nextchat_grounding`` node in its own process (the shipped model unless
--model), and for each scene of the renderer (default: the ray-cast renderer no
training run sees) publishes the scene's depth and camera intrinsics, then calls the
node's ``ground`` service with the scene's image and:

- "where is the {colour} {kind}?" about an object that colour and kind name
  uniquely: grounded when the result's first object overlaps it at IoU >= 0.5;
- "pick up the {colour} {kind}." about a colour and kind not in the scene (scenes
  with a painted but unlisted object are skipped): refused when the result has no
  object and no ``target_point`` is published for it.

Prints the two counts and the status of every result; ``--json`` writes them. The
node runs with its default parameters (min_score included), as a user meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import RENDERERS, draw_scene, write_json
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import CameraInfo

from nextchat_ros import node_process
from nextchat_ros.records import center_size_to_xyxy
from nextchat_ros.ros_client import GroundingClient, image_msg
from nextchat_ros.scoring import box_iou
from nextchat_ros.synthetic.scenes import COLORS, KINDS

SEED_OFFSET = 9_300_000  # seeds of its own
POINT_WAIT_S = 1.0  # how long after a result a target_point for it may still arrive


def first_box(result) -> np.ndarray | None:
    """The result's first object as a pixel box (x1, y1, x2, y2)."""
    if not result.objects:
        return None
    o = result.objects[0]
    return np.array(center_size_to_xyxy(o.center_x, o.center_y, o.size_x, o.size_y))


def publish_depth(client: GroundingClient, scene, stamp_ns: int) -> None:
    """The scene's depth (mm, 16UC1) and intrinsics with the image's stamp; a few times,
    as sensor-data QoS is best effort."""
    depth = image_msg(np.round(np.nan_to_num(scene.depth) * 1000).astype(np.uint16), stamp_ns, "16UC1")
    info = CameraInfo(header=depth.header, height=depth.height, width=depth.width)
    c = scene.camera
    info.k = [float(c["fx"]), 0.0, float(c["cx"]), 0.0, float(c["fy"]), float(c["cy"]), 0.0, 0.0, 1.0]
    for _ in range(3):
        client.info_pub.publish(info)
        client.depth_pub.publish(depth)
        time.sleep(0.2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model directory (default: the shipped tiny model)")
    parser.add_argument("--num-scenes", type=int, default=10)
    parser.add_argument("--renderer", choices=RENDERERS, default="raycast")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    namespace = f"/nextchat_ros_heldout_{os.getpid()}"
    log_path = Path(tempfile.mkdtemp(prefix="nextchat-ros-heldout-")) / "node.log"
    params = {"model_dir": args.model} if args.model else {}
    node = node_process.start_node(namespace, params, log_path)
    client = GroundingClient(namespace)
    points: list[PointStamped] = []
    lock = threading.Lock()

    def on_point(msg: PointStamped) -> None:
        with lock:
            points.append(msg)
    client.node.create_subscription(PointStamped, f"{namespace}/target_point", on_point, 10)
    rng = np.random.default_rng(0)
    rows = []
    try:
        client.wait_for_node(timeout=120)
        for k in range(args.num_scenes):
            scene = draw_scene(args.renderer, SEED_OFFSET + k)
            stamp_ns = 1_800_000_000_000_000_000 + k * 1_000_000_000
            publish_depth(client, scene, stamp_ns)
            image = image_msg(scene.image, stamp_ns)
            unique = [o for o in scene.objects
                      if sum((p.color, p.kind) == (o.color, o.kind) for p in scene.objects) == 1]
            if unique:
                target = unique[int(rng.integers(len(unique)))]
                text = f"where is the {target.color} {target.kind}?"
                result = client.call(f"present-{k}", text, image=image, timeout=120)
                box = first_box(result)
                iou = box_iou(box, target.box) if box is not None else 0.0
                rows.append({"scene": k, "kind": "present", "query": text, "status": int(result.status),
                             "answer": result.answer, "objects": len(result.objects), "iou": float(iou),
                             "grounded": bool(iou >= 0.5)})
            there = {(o.color, o.kind) for o in scene.objects}
            if getattr(scene, "hidden", None):
                continue
            missing = [(c, kind) for c in COLORS for kind in KINDS if (c, kind) not in there]
            color, kind = missing[int(rng.integers(len(missing)))]
            text = f"pick up the {color} {kind}."
            with lock:
                before = len(points)
            result = client.call(f"absent-{k}", text, image=image, timeout=120)
            time.sleep(POINT_WAIT_S)
            with lock:
                pointed = len(points) > before
            rows.append({"scene": k, "kind": "absent", "query": text, "status": int(result.status),
                         "answer": result.answer, "objects": len(result.objects), "target_point": pointed,
                         "refused": bool(not result.objects and not pointed)})
    finally:
        client.close()
        node_process.stop_node(node)
    present = [r for r in rows if r["kind"] == "present"]
    absent = [r for r in rows if r["kind"] == "absent"]
    figures = {"renderer": args.renderer, "scenes": args.num_scenes,
               "grounded": sum(r["grounded"] for r in present), "present_questions": len(present),
               "absent_refused": sum(r["refused"] for r in absent), "absent_instructions": len(absent),
               "rows": rows}
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "scene"}))
    print(f"{args.renderer} over ROS: grounded at IoU >= 0.5 {figures['grounded']} of {len(present)}; "
          f"absent instructions with no object and no target_point {figures['absent_refused']} of {len(absent)}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
