"""Predictor latency on this machine: set_image, grounding ask, 16-token chat ask,
and the ratio of a first query on a frame (encode + ask) to a second one (ask).

    .venv/bin/python benchmarks/predictor.py [--model DIR] [--device cpu] [--repeats 10]

Prints a table of medians (and p90) in milliseconds. Uses the shipped model when
there is one, else a randomly initialised tiny model (same shapes, same cost).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from nextchat_ros.predictor import load_predictor
from nextchat_ros.synthetic.scenes import render_scene


def no_eos(eos_id):
    def processor(generated, logits):
        logits = logits.clone()
        logits[eos_id] = float("-inf")
        return logits
    return processor


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times):
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()

    predictor = load_predictor(args.model, device=args.device)
    model = predictor.model
    frames = [render_scene(s, height=args.height, width=args.width).image for s in range(args.repeats + 1)]
    eos = no_eos(model.tokenizer.eos_id)
    predictor.set_image(frames[0])  # warm-up
    predictor.ask("where is the red cube?", mode="ground")
    predictor.ask("describe the table.", max_new_tokens=16, logits_processor=eos)

    set_image = timed(lambda: predictor.set_image(frames[1]), args.repeats)
    ground = timed(lambda: predictor.ask("where is the red cube?", mode="ground"), args.repeats)
    chat = []
    for _ in range(args.repeats):
        answer = predictor.ask("describe the table.", max_new_tokens=16, logits_processor=eos)
        assert len(answer.token_ids) - len(predictor.model.prompt.question("describe the table.", 0).ids) >= 16
        chat.append(answer.timings_ms["ask_ms"])
    first, second = [], []
    for frame in frames[1:]:
        t0 = time.perf_counter()
        predictor.set_image(frame)
        predictor.ask("where is the blue ball?", mode="ground")
        first.append((time.perf_counter() - t0) * 1e3)
        second.append(timed(lambda: predictor.ask("where is the green cup?", mode="ground"), 1)[0])

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}; model: {args.model or 'the shipped tiny model'}; "
          f"image {args.width}x{args.height}; {args.repeats} repeats")
    print(f"{'stage':<34}{'median ms':>10}{'p90 ms':>10}")
    for name, times in [("set_image (vision+SAM+prefix)", set_image), ("ask, grounding path", ground),
                        ("ask, 16-token chat", chat), ("first query on a frame", first),
                        ("second query on the frame", second)]:
        median, p90 = summary(times)
        print(f"{name:<34}{median:>10.1f}{p90:>10.1f}")
    print(f"first / second query ratio: {statistics.median(first) / statistics.median(second):.1f}x")


if __name__ == "__main__":
    main()
