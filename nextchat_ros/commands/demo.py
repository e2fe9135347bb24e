"""``nextchat demo``: the quick-start demo, end to end over ROS 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

HELP = "quick-start demo: the node, a simulated camera, scripted questions, overlay PNGs"
DESCRIPTION = """\
Start the nextchat_grounding node with the shipped model, publish a simulated
camera (procedural tabletop scenes and one real photo, each for a few seconds),
send a scripted sequence of instructions and questions over ROS, print every
answer with its boxes, write overlay PNGs and a JSON summary to --out, and shut
the node down cleanly.
"""

SCRIPT = [
    "where is the {target}?",
    "pick up the {target}.",
    "is there a {absent} in the image?",
    "describe [0].",
    "describe the image.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .ground import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--scenes", type=int, default=3, help="number of generated scenes (default: 3)")
    parser.add_argument("--seed", type=int, default=20261126, help="first scene seed")
    parser.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz (default: 5)")


def _demo_model(model_dir: Path | None, out: Path) -> tuple[Path, bool]:
    """The model to use, and whether it is trained."""
    from ..model.build import DEFAULT_MODEL_DIR, build_model
    from ..model.checkpoint import save_pretrained

    if model_dir is not None:
        return model_dir, True
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return DEFAULT_MODEL_DIR, True
    # No shipped model in this checkout: a randomly initialised tiny model keeps
    # the whole pipeline runnable; its answers and boxes are meaningless.
    untrained = out / "untrained-tiny"
    if not (untrained / "model.safetensors").is_file():
        save_pretrained(build_model("tiny", seed=0), untrained)
    return untrained, False


class Camera:
    """Publishes the current frame at a fixed rate, freshly stamped each time."""

    def __init__(self, client, rate: float):
        self.client, self.period = client, 1.0 / rate
        self.image = None
        self.last_stamp_ns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ..ros_client import image_msg

        while not self._stop.wait(self.period):
            if self.image is not None:
                stamp = time.time_ns()
                self.client.image_pub.publish(image_msg(self.image, stamp, frame_id="demo_camera"))
                self.last_stamp_ns = stamp

    def show(self, image) -> None:
        self.image = image
        time.sleep(3 * self.period + 0.3)  # a few frames out before asking

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> int:
    from .. import node_process
    from ..msg import GroundingResult
    from ..overlay import draw_overlay, save_png
    from ..ros_client import GroundingClient, result_objects
    from ..synthetic.scenes import COLORS, KINDS, real_photo, render_scene

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, trained = _demo_model(args.model, args.out)
    print(f"model: {model_dir}" + ("" if trained else "  (UNTRAINED random weights: no shipped model here)"))
    card = Path(model_dir) / "README.md"
    if card.is_file():  # say up front how good the model is (its model card's status line)
        status = next((line for line in card.read_text().splitlines() if "Status" in line), "")
        if status:
            print(status.replace("**", ""))
    namespace = f"/nextchat_demo_{os.getpid()}"
    node_params = {"model_dir": model_dir, "device": args.device, "backend": args.backend}
    if args.export_dir:
        node_params["export_dir"] = args.export_dir
    if args.precision:
        node_params["precision"] = args.precision
    node = node_process.start_node(namespace, node_params, args.out / "node.log")
    client = GroundingClient(namespace)
    summary, code, camera = [], 0, None
    try:
        print("starting the nextchat_grounding node ...")
        client.wait_for_node()
        camera = Camera(client, args.rate)
        frames = []
        for i in range(args.scenes):
            scene = render_scene(args.seed + i)
            frames.append((f"scene{args.seed + i}", scene.image, scene.objects))
        photo = real_photo("coffee", 240, 320)
        if photo is not None:
            frames.append(("photo-coffee", photo, []))
        for name, image, objects in frames:
            camera.show(image)
            h, w = image.shape[:2]
            present = {(o.color, o.kind) for o in objects}
            target = f"{objects[-1].color} {objects[-1].kind}" if objects else "cup"
            absent = next((f"{c} {k}" for c in COLORS for k in KINDS if (c, k) not in present), "red cube")
            region = [int(v) for v in objects[-1].box] if objects else [w // 3, h // 3, 2 * w // 3, 2 * h // 3]
            print(f"\n== {name} ({w}x{h}) ==")
            for k, template in enumerate(SCRIPT):
                text = template.format(target=target, absent=absent)
                regions = [tuple(region)] if "[0]" in text else ()
                result = client.ask(f"{name}-q{k}", text, regions=regions, timeout=120)
                if result.status != GroundingResult.STATUS_OK:
                    print(f"Q: {text}\nA: error {result.status}: {result.error}")
                    continue
                print(f"Q: {text}\nA: {result.answer}   ({result.total_ms:.0f} ms, image encode "
                      f"{result.image_encode_ms:.0f} ms)")
                objs = result_objects(result)
                for j, o in enumerate(objs):
                    print(f"   [{j}] {o.phrase!r} box ({', '.join(f'{v:.0f}' for v in o.box)}) score {o.score:.2f}")
                overlay = args.out / f"{name}-q{k}.png"
                save_png(draw_overlay(image, objs, [list(r) for r in regions] or None), overlay)
                summary.append({"frame": name, "query": text, "answer": result.answer, "overlay": str(overlay),
                                "boxes": [list(map(float, o.box)) for o in objs], "total_ms": result.total_ms})
    except TimeoutError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        if camera is not None:
            camera.stop()
        client.close()
        end = node_process.stop_node(node, timeout=30)
        if end.killed or end.returncode != 0:
            print(f"the node exited with {end.returncode}{' (killed)' if end.killed else ''}; "
                  f"see {args.out / 'node.log'}", file=sys.stderr)
            code = code or 1
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {len(summary)} overlays, summary.json and node.log to {args.out}")
    return code
