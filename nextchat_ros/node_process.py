"""The grounding node in a process of its own, as `ros2 run` starts it: the one way
the demo, the bag replay, the benchmarks and the tests start and stop it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NodeExit:
    returncode: int
    log: str  # everything the node printed
    seconds: float  # from SIGINT to exit
    killed: bool  # still running after the timeout, so killed


def start_node(namespace: str, params: dict | None = None, log_path: str | Path | None = None,
               program: tuple[str, ...] = ("-m", "nextchat_ros.node"), cwd: str | Path | None = None,
               env: dict | None = None) -> subprocess.Popen:
    """``python -m nextchat_ros.node --ros-args -r __ns:=NAMESPACE -p key:=value ...``.

    Its output goes to ``log_path`` (a file: a pipe nobody reads can fill and block the
    node), or nowhere; the process remembers the path as ``log_path``."""
    args = [sys.executable, *program, "--ros-args", "-r", f"__ns:={namespace}"]
    for key, value in (params or {}).items():
        args += ["-p", f"{key}:={value}"]
    if log_path is not None:
        with open(log_path, "w") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    else:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env)
    process.log_path = Path(log_path) if log_path is not None else None
    return process


def stop_node(process: subprocess.Popen, timeout: float = 30.0) -> NodeExit:
    """SIGINT (a clean shutdown: queued queries answered), then wait up to ``timeout``;
    a node still running then is killed."""
    t0 = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    killed = False
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
        killed = True
    seconds = time.monotonic() - t0
    log_path = getattr(process, "log_path", None)
    log = log_path.read_text(errors="replace") if log_path is not None and log_path.is_file() else ""
    return NodeExit(process.returncode, log, seconds, killed)
