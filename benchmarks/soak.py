"""Soak benchmark of the grounding node: a 30 Hz 640x480 camera and 5 Hz queries.

    .venv/bin/python benchmarks/soak.py --duration 300 [--idle 30] [--model DIR]

Phase 1 (--idle s): camera only, no queries: the node's idle CPU.
Phase 2 (--duration s): camera + queries. Reports query latency p50/p95/p99
(query publish -> result receipt), answered / refused / errors / lost, and the
node's CPU % and RSS sampled each second (written to --csv too).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from nextchat_ros import node_process
from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.msg import GroundingResult, Query
from nextchat_ros.ros_client import GroundingClient
from nextchat_ros.synthetic.scenes import render_scene

QUERIES = ["where is the red cube?", "pick up the blue ball.", "is there a green cup in the image?",
           "describe the image.", "find the yellow bottle."]


def proc_sample(pid: int) -> tuple[float, float]:
    """(cpu seconds used so far, RSS in MB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    return cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of camera + queries")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of camera only, first")
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--query-hz", type=float, default=5.0)
    parser.add_argument("--csv", type=Path, default=Path("out/soak.csv"))
    args = parser.parse_args()

    namespace = f"/nextchat_soak_{os.getpid()}"
    node = node_process.start_node(namespace, {"model_dir": args.model})
    client = GroundingClient(namespace)
    client.wait_for_node()
    frames = [render_scene(s, height=480, width=640).image for s in range(4)]
    stop = threading.Event()
    sent: dict[str, float] = {}
    received: dict[str, tuple[float, int, str]] = {}

    def on_result(msg: GroundingResult) -> None:
        received[msg.query_id] = (time.perf_counter(), msg.status, msg.error)
    client.node.create_subscription(GroundingResult, f"{namespace}/result", on_result, 1000)

    client.start_camera(frames, args.camera_hz, stop)

    samples = []
    def sampler(phase: str, seconds: float) -> None:
        cpu0, _ = proc_sample(node.pid)
        t0 = time.perf_counter()
        last_cpu, last_t = cpu0, t0
        while time.perf_counter() - t0 < seconds:
            time.sleep(1.0)
            cpu, rss = proc_sample(node.pid)
            now = time.perf_counter()
            samples.append({"phase": phase, "t": round(now - t0, 1),
                            "cpu_percent": 100 * (cpu - last_cpu) / (now - last_t),
                            "rss_mb": rss, "queue_in_flight": len(sent) - len(received)})
            last_cpu, last_t = cpu, now

    print(f"idle phase: camera {args.camera_hz:.0f} Hz 640x480, no queries, {args.idle:.0f} s")
    sampler("idle", args.idle)

    def queries() -> None:
        period, k, t_next = 1.0 / args.query_hz, 0, time.perf_counter()
        while not stop.is_set():
            qid = f"soak-{k}"
            sent[qid] = time.perf_counter()
            client.query_pub.publish(Query(id=qid, text=QUERIES[k % len(QUERIES)]))
            k += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.perf_counter()))
    print(f"load phase: + queries at {args.query_hz:.0f} Hz, {args.duration:.0f} s")
    qthread = threading.Thread(target=queries, daemon=True)
    qthread.start()
    sampler("load", args.duration)
    stop.set()
    qthread.join()
    deadline = time.perf_counter() + 30.0  # let the queued answers arrive
    while len(received) < len(sent) and time.perf_counter() < deadline:
        time.sleep(0.5)

    from collections import Counter

    from nextchat_ros.service import Status

    latencies = np.array([(received[q][0] - t) * 1e3 for q, t in sent.items()
                          if q in received and received[q][1] == GroundingResult.STATUS_OK])
    refused = sum(1 for q in sent if q in received and received[q][1] == GroundingResult.STATUS_OVERLOADED)
    errors = sum(1 for q in sent if q in received and received[q][1] not in (0, GroundingResult.STATUS_OVERLOADED))
    lost = sum(1 for q in sent if q not in received)
    idle = [s for s in samples if s["phase"] == "idle"]
    load = [s for s in samples if s["phase"] == "load"]
    print(f"\nqueries sent {len(sent)}: answered {len(latencies)}, refused (OVERLOADED) {refused}, "
          f"errors {errors}, lost {lost}")
    if errors:  # which errors, and one sentence of each kind
        kinds = Counter((Status(status).name, re.sub(r"\d+(\.\d+)?", "N", error)[:100])
                        for _, status, error in received.values()
                        if status not in (0, GroundingResult.STATUS_OVERLOADED))
        for (status, error), n in kinds.most_common():
            print(f"  {n:5d} x {status}: {error}")
    if len(latencies):
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        print(f"latency ms (publish -> result): p50 {p50:.0f}  p95 {p95:.0f}  p99 {p99:.0f}  max {latencies.max():.0f}")
    print(f"node CPU %: idle mean {np.mean([s['cpu_percent'] for s in idle]):.0f}, "
          f"load mean {np.mean([s['cpu_percent'] for s in load]):.0f}")
    print(f"node RSS MB: start {load[0]['rss_mb']:.0f}, end {load[-1]['rss_mb']:.0f}, "
          f"max {max(s['rss_mb'] for s in samples):.0f}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    print(f"per-second samples: {args.csv}")
    client.close()
    node_process.stop_node(node, timeout=30)


if __name__ == "__main__":
    main()
