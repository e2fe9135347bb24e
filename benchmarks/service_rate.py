"""The node's core at a preset's size on a device: GroundingService (what the node
runs behind its topics) with camera frames and grounding queries, no ROS.

    python benchmarks/service_rate.py --device cuda:0 --preset full --dtype bf16 [--json out.json]
    python benchmarks/service_rate.py --device cpu --preset tiny

Reports, from the service's own outcomes:
- first query: a grounding question about a frame the service has not encoded
  (both encoders, prefix, query, box, mask), median over --queries frames;
- second query: another question about the same frame (its encoding reused);
- the frame rate it keeps up with: one query per frame, the next frame sent as soon
  as the previous answer came back, for --seconds (frames answered per second);
- each stage's ms as the service times it (``Outcome.timings_ms``), and peak GPU
  memory on CUDA.

``--preset full`` has random weights (as benchmarks/engine.py builds it): the
answers mean nothing, the time and memory are those of the released shapes.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from common import run_info, write_json
from engine import DTYPES, build

from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.service import Frame, GroundingService, Request, Status
from nextchat_ros.synthetic.scenes import render_scene

QUESTIONS = ("where is the red cube?", "find the blue ball.")


def ask(service: GroundingService, text: str, stamp_ns: int, timeout: float = 120.0):
    """Submit one query about the frame ``stamp_ns`` and wait (bounded) for its outcome."""
    done = threading.Event()
    box = {}

    def finished(outcome):
        box["outcome"] = outcome
        done.set()
    if not service.submit(Request(query_id=f"q{time.monotonic_ns()}", text=text, stamp_ns=stamp_ns,
                                  done=finished)):
        raise RuntimeError("the service refused the query (queue full)")
    if not done.wait(timeout):
        raise TimeoutError(f"no answer within {timeout} s")
    outcome = box["outcome"]
    if outcome.status != Status.OK:
        raise RuntimeError(f"query refused: {outcome.status.name} {outcome.error}")
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--queries", type=int, default=10, help="frames for the first/second query medians")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the frame-rate run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.preset, args.device, DTYPES[args.dtype])
    predictor = NextChatPredictor(model, device=device, dtype=DTYPES[args.dtype])
    service = GroundingService(predictor, max_image_age=600.0)
    images = [render_scene(seed, height=480, width=640).image for seed in range(8)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamp = 0

    def new_frame() -> int:
        nonlocal stamp
        stamp += 1
        service.add_frame(Frame(image=images[stamp % len(images)], stamp_ns=stamp))
        return stamp

    try:
        ask(service, QUESTIONS[0], new_frame())  # warm-up
        first, second, timings = [], [], []
        for _ in range(args.queries):
            named = new_frame()
            t0 = time.perf_counter()
            outcome = ask(service, QUESTIONS[0], named)
            first.append((time.perf_counter() - t0) * 1e3)
            timings.append(outcome.timings_ms)
            t0 = time.perf_counter()
            ask(service, QUESTIONS[1], named)
            second.append((time.perf_counter() - t0) * 1e3)
        answered, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            ask(service, QUESTIONS[answered % 2], new_frame())
            answered += 1
        rate = answered / (time.perf_counter() - t0)
    finally:
        service.close()
    stages = {k: statistics.median(t[k] for t in timings if k in t) for k in timings[0]}
    figures = {**run_info(device, args.preset, args.dtype), "first_query_ms": statistics.median(first),
               "second_query_ms": statistics.median(second), "frames_per_second_answered": rate,
               "first_query_stages_ms": stages}
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{figures['machine']}; {figures['device']}; preset {args.preset} {args.dtype}")
    print(f"first query on a new frame {figures['first_query_ms']:.1f} ms, second on the same frame "
          f"{figures['second_query_ms']:.1f} ms (medians of {args.queries}); "
          f"keeps up with {rate:.1f} frames/s at one query per frame")
    print("first query's stages (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if "peak_gpu_memory_gb" in figures:
        print(f"peak GPU memory {figures['peak_gpu_memory_gb']:.1f} GB")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
