"""Soak benchmark of the grounding node under faults (nextchat_ros/soak.py has the faults).

    .venv/bin/python benchmarks/soak.py --duration 3600            # the hour, every fault repeating
    .venv/bin/python benchmarks/soak.py --duration 600 --faults none   # the plain load
    .venv/bin/python benchmarks/soak.py --duration 300 --faults camera_stall,node_paused

The node runs in its own process (the shipped model unless --model) with a 30 Hz
640x480 camera and structured queries at 5 Hz throughout; after --warmup seconds the
faults play in turn, --recovery seconds apart, until --duration has passed (the
cycle in progress is finished). Writes to --out: report.json (the counts per client,
refusals by reason, lost and duplicated results, latency p50/p95/p99 overall and in
the 10 s after each kind of fault, recovery times, the camera rate the diagnostics
showed around stalls, the node's CPU and RSS), queries.csv, samples.csv (CPU and
RSS each second) and soak.png (latency and RSS over time, faults shaded). Exits 1
when a rule is broken (a query without exactly one result, an answer about another
frame than the one named, an exception in the node's log, no recovery).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.soak import FAULTS, RECOVERY_RUN, Durations, Soak, write_outputs


def parse_faults(text: str) -> tuple[str, ...]:
    if text == "all":
        return FAULTS
    if text == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}, all or none")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of the whole run (default: an hour)")
    parser.add_argument("--faults", type=parse_faults, default=FAULTS,
                        help=f"comma-separated, in order, or all / none (default all: {', '.join(FAULTS)})")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of plain load before the first fault")
    parser.add_argument("--recovery", type=float, default=20.0, help="seconds of plain load after each fault")
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--query-hz", type=float, default=5.0)
    parser.add_argument("--rss-after", type=float, default=300.0,
                        help="RSS growth is measured from this many seconds on (default: after the first 5 minutes)")
    parser.add_argument("--out", type=Path, default=Path("out/soak"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    namespace = f"/nextchat_soak_{os.getpid()}"
    soak = Soak(namespace, args.out / "node.log", args.model, camera_hz=args.camera_hz, query_hz=args.query_hz,
                durations=Durations(warmup=args.warmup, recovery=args.recovery), progress=print)
    try:
        soak.start()
        print(f"node up; camera {args.camera_hz:.0f} Hz 640x480, structured queries {args.query_hz:.0f} Hz; "
              f"faults: {', '.join(args.faults) or 'none'}; {args.duration:.0f} s")
        soak.run(args.faults, duration=args.duration)
        soak.drain()
    finally:
        end = soak.close()
    report = soak.report(end.log, rss_after_s=args.rss_after)
    paths = write_outputs(soak, report, args.out)

    print("\nper client:")
    for client, c in report.counts.items():
        print(f"  {client:10s} {json.dumps(c)}")
    print("latency ms (query sent -> result received):")
    for window, p in report.latency_ms.items():
        print(f"  {window:32s} {json.dumps(p)}")
    print(f"recovery (s to {RECOVERY_RUN} queries in a row within {report.recovery_bar_ms:.0f} ms): "
          f"{json.dumps(report.recovery_s)}")
    print(f"camera rate around stalls (diagnostics): {json.dumps(report.camera_hz_around_stalls)}")
    print(f"unnamed queries after a restart answered about the old camera's frame: {report.older_camera_answers}")
    print(f"node: {json.dumps(report.node)}; exit {end.returncode} after {end.seconds:.1f} s")
    print("written: " + ", ".join(str(p) for p in paths))
    if report.violations:
        print("\nRULES BROKEN:\n  " + "\n  ".join(report.violations))
        for line in report.log_problems:
            print(f"  log: {line}")
        return 1
    print("\nevery rule held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
