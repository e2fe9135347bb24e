"""The fault soak: the grounding node, in its own process, under what a robot does to it.

Faults, each on a timer and named in the report with what happened to the queries
around it:
  camera_restart          the camera's participant destroyed and a new one started
  camera_restart_resized  the same, the new camera at another resolution and encoding,
                          publishing reliable instead of best effort
  camera_stall            no frames for a while, then the backlog in one burst
  node_paused             the node's process stopped (SIGSTOP), then continued
  cpu_starved             busy processes on every core
  three_clients           the query topic and the ground service join the structured
                          queries, with depth and camera_info on every frame
  vanishing_client        a process calls the ground service and is killed mid-call

Throughout, one client sends structured queries (some with regions, some naming the
stamp of the newest frame sent). The rules checked (``SoakReport.violations``): every
query gets exactly one result; a query that names a stamp is answered about that
frame or refused; nothing in the node's log is an unhandled exception; the node
answers normally again after every fault (``recovery_s``).

Used by benchmarks/soak.py (an hour of the schedule) and tests/test_soak.py (each
fault once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import String

from . import node_process
from .msg import GroundingResult, Query
from .ros_client import Spinner, image_msg
from .service import Status
from .srv import Ground
from .synthetic.scenes import render_scene

FAULTS = ("camera_restart", "camera_restart_resized", "camera_stall", "node_paused", "cpu_starved",
          "three_clients", "vanishing_client")
QUERIES = ["where is the red cube?", "pick up the blue ball.", "is there a green cup in the image?",
           "describe the image.", "find the yellow bottle."]
REGION_QUERY = "what is [0]?"
TOPIC_QUERIES = ["where is the cup?", "is there a ball?", "find the red cube."]
SERVICE_QUERIES = ["pick up the cup.", "where is the blue ball?"]
# A fault is recovered from when this many structured queries in a row are answered
# within the recovery bar (RECOVERY_BAR_FACTOR x the warm-up's p95 latency).
RECOVERY_RUN = 5
RECOVERY_BAR_FACTOR = 2.0
INFERENCE_DIAGNOSTICS = "nextchat_grounding: inference"
# The client that is killed: calls the ground service, says so, waits to be killed.
# Its own small program (python -c): no model code to import, so it starts in a second.
VANISHING_CLIENT = """
import sys, time
import rclpy
from nextchat_ros.msg import Query
from nextchat_ros.srv import Ground
rclpy.init()
node = rclpy.create_node("soak_vanishing_client", namespace=sys.argv[1])
client = node.create_client(Ground, "ground")
if not client.wait_for_service(timeout_sec=30.0):
    sys.exit("the ground service did not appear")
client.call_async(Ground.Request(query=Query(id=sys.argv[2], text=sys.argv[3])))
print("sent", flush=True)
time.sleep(60.0)
"""
VANISHING_QUERY = "describe the image."  # a description takes longer than the client lives


@dataclass
class Durations:
    """Seconds of each timed fault and of the quiet time after every fault."""

    warmup: float = 30.0
    recovery: float = 20.0
    stall: float = 3.0
    pause: float = 5.0
    starve: float = 30.0
    clients: float = 30.0


@dataclass
class Sent:
    query_id: str
    client: str  # structured | topic | service | vanishing
    text: str
    t: float  # seconds since the run started
    stamp_ns: int = 0  # the frame it names; 0 = the newest
    response_t: float | None = None  # the service's response (service clients only)


@dataclass
class Received:
    query_id: str
    t: float
    status: int
    error: str
    stamp_ns: int  # the stamp of the frame it is about (header)
    objects: int
    positions: int  # objects with a 3D position (depth)


@dataclass
class FaultEvent:
    name: str
    start: float
    end: float
    detail: str = ""


class Camera:
    """A camera driver: its own participant, publishing ``frames`` at ``hz``, each one
    for a second in turn, stamped when captured. ``stall`` holds frames back and then
    sends them all at once, stamped when they were captured."""

    def __init__(self, namespace: str, frames: list[np.ndarray], hz: float, encoding: str = "rgb8",
                 reliable: bool = False, generation: int = 0):
        self.frames, self.hz, self.encoding, self.generation = frames, hz, encoding, generation
        self.height, self.width = frames[0].shape[:2]
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"soak_camera_{generation}", namespace=namespace, context=self.context)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE) if reliable else qos_profile_sensor_data
        self.image_pub = self.node.create_publisher(Image, "image", qos)
        self.depth_pub = self.node.create_publisher(Image, "depth", qos)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", qos)
        self.depth = False  # also publish depth (16UC1, mm) and camera_info with each frame
        self._depth_mm = np.full((self.height, self.width), 800, np.uint16)  # a flat table 0.8 m away
        self.sent = 0
        self.first_stamp_ns = self.last_stamp_ns = 0
        self._stall_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"soak-camera-{generation}", daemon=True)
        self._thread.start()

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def _publish(self, k: int, stamp_ns: int) -> None:
        if self.depth:
            depth = image_msg(self._depth_mm, stamp_ns, "16UC1")
            self.depth_pub.publish(depth)
            info = CameraInfo(header=depth.header, width=self.width, height=self.height)
            info.k = [500.0, 0.0, self.width / 2, 0.0, 500.0, self.height / 2, 0.0, 0.0, 1.0]
            self.info_pub.publish(info)
        self.image_pub.publish(image_msg(self.frames[int(k / self.hz) % len(self.frames)], stamp_ns, self.encoding))
        self.first_stamp_ns = self.first_stamp_ns or stamp_ns
        self.last_stamp_ns = stamp_ns
        self.sent += 1

    def _run(self) -> None:
        k, t_next, backlog = 0, time.perf_counter(), []
        while not self._stop.is_set():
            if time.monotonic() < self._stall_until:
                backlog.append((k, time.time_ns()))  # captured, not sent
            else:
                for held in backlog:  # the burst after a stall
                    self._publish(*held)
                backlog = []
                self._publish(k, time.time_ns())
            k += 1
            t_next += 1.0 / self.hz
            time.sleep(max(0.0, t_next - time.perf_counter()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def proc_sample(pid: int) -> tuple[float, float]:
    """(cpu seconds used so far, RSS in MB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    return cpu, rss


def camera_frames(height: int, width: int, encoding: str = "rgb8", count: int = 4) -> list[np.ndarray]:
    frames = [render_scene(9_400_000 + s, height=height, width=width).image for s in range(count)]
    return [f[..., ::-1].copy() for f in frames] if encoding == "bgr8" else frames


class Soak:
    """A node process, its camera, the clients and the samplers, and the record of
    every query and result; :meth:`run` plays a fault schedule, :meth:`report` judges it."""

    def __init__(self, namespace: str, log_path: Path, model_dir: str | Path | None = None,
                 node_params: dict | None = None, camera_hz: float = 30.0, query_hz: float = 5.0,
                 size: tuple[int, int] = (480, 640), durations: Durations | None = None, progress=None):
        self.namespace, self.log_path = namespace, Path(log_path)
        self.camera_hz, self.query_hz, self.size = camera_hz, query_hz, size
        self.durations = durations or Durations()
        self.progress = progress or (lambda text: None)
        params = dict(node_params or {})
        if model_dir is not None:
            params["model_dir"] = str(model_dir)
        self.node = node_process.start_node(namespace, params, self.log_path)
        self.t0 = time.monotonic()
        self.sent: dict[str, Sent] = {}
        self.received: dict[str, list[Received]] = defaultdict(list)
        self.faults: list[FaultEvent] = []
        self.samples: list[dict] = []  # one a second: node CPU %, RSS MB
        self.diagnostics: list[tuple[float, float, int]] = []  # (t, camera frames/s, queue depth)
        self.cameras: list[Camera] = []  # every camera so far; the last one publishes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._text_sent = 0
        self._helpers: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.ros = rclpy.create_node("soak_clients", namespace=namespace, context=self.context)
        self.query_pub = self.ros.create_publisher(Query, "structured_query", 100)
        self.text_pub = self.ros.create_publisher(String, "query", 100)
        self.ground = self.ros.create_client(Ground, "ground")
        self.ros.create_subscription(GroundingResult, "result", self._on_result, 1000)
        self.ros.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        executor.add_node(self.ros)
        self.spinner = Spinner(executor, self.context, "soak-spin")

    # --- the record ---------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _on_result(self, msg: GroundingResult) -> None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        got = Received(msg.query_id, self.now(), msg.status, msg.error, stamp_ns, len(msg.objects),
                       sum(o.has_position for o in msg.objects))
        with self._lock:
            self.received[msg.query_id].append(got)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == INFERENCE_DIAGNOSTICS:
                values = {kv.key: kv.value for kv in status.values}
                self.diagnostics.append((self.now(), float(values.get("camera_frames_per_second", "nan")),
                                         int(values.get("queue_depth", "0"))))

    def _record(self, sent: Sent) -> None:
        with self._lock:
            self.sent[sent.query_id] = sent

    # --- clients ------------------------------------------------------------------------
    def _every(self, hz: float, until, body) -> None:
        k, t_next = 0, time.perf_counter()
        while not self._stop.is_set() and not until():
            body(k)
            k += 1
            t_next += 1.0 / hz
            self._stop.wait(max(0.0, t_next - time.perf_counter()))

    def _structured(self, k: int) -> None:
        camera = self.cameras[-1]
        text = REGION_QUERY if k % 4 == 3 else QUERIES[k % len(QUERIES)]
        query = Query(id=f"s-{k}", text=text)
        if text == REGION_QUERY:
            # Inside every camera's image: a query that names no stamp is answered about
            # the node's latest frame, which just after a restart can still be the old
            # camera's (a region outside it is refused BAD_QUERY, rightly).
            w, h = min(c.width for c in self.cameras), min(c.height for c in self.cameras)
            query.regions.append(RegionOfInterest(x_offset=w // 4, y_offset=h // 4, width=w // 2, height=h // 2))
        stamp_ns = camera.last_stamp_ns if k % 3 == 2 else 0
        query.image_stamp.sec, query.image_stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        self._record(Sent(query.id, "structured", text, self.now(), stamp_ns))
        self.query_pub.publish(query)

    def _topic(self, k: int) -> None:
        # The node numbers text queries text-1, text-2, ... as they arrive, and one
        # publisher's messages arrive in order.
        self._text_sent += 1
        text = TOPIC_QUERIES[k % len(TOPIC_QUERIES)]
        self._record(Sent(f"text-{self._text_sent}", "topic", text, self.now()))
        self.text_pub.publish(String(data=text))

    def _call(self, query_id: str, text: str, timeout: float = 60.0) -> None:
        sent = Sent(query_id, "service", text, self.now())
        self._record(sent)
        future = self.ground.call_async(Ground.Request(query=Query(id=query_id, text=text)))
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.01)
        if future.done():
            sent.response_t = self.now()
        else:
            self.ground.remove_pending_request(future)

    def _start_thread(self, target, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _sample(self) -> None:
        last_cpu, last_t = proc_sample(self.node.pid)[0], self.now()
        while not self._stop.wait(1.0) and self.node.poll() is None:
            try:
                cpu, rss = proc_sample(self.node.pid)
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                return
            now = self.now()
            self.samples.append({"t": round(now, 1), "cpu_percent": 100 * (cpu - last_cpu) / (now - last_t),
                                 "rss_mb": round(rss, 1)})
            last_cpu, last_t = cpu, now

    def start(self, timeout: float = 120.0) -> None:
        """Wait for the node, start the camera, the sampler and the structured client."""
        if not self.ground.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"the node's ground service did not appear within {timeout:.0f} s; "
                               f"its log: {self.log_path}")
        self.cameras.append(Camera(self.namespace, camera_frames(*self.size), self.camera_hz))
        # The first query after the node's diagnostics count camera frames (matching
        # takes seconds on a loaded machine; before it, queries are refused NO_IMAGE).
        deadline = time.monotonic() + timeout
        while not any(hz > 0 for _, hz, _ in self.diagnostics) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        self._start_thread(self._sample, "soak-sampler")
        self._start_thread(lambda: self._every(self.query_hz, lambda: False, self._structured), "soak-structured")

    # --- faults -------------------------------------------------------------------------
    def _restart_camera(self, resized: bool) -> str:
        old = self.cameras[-1]
        old.close()
        if resized:
            height, width = self.size[0] // 2, self.size[1] // 2
            camera = Camera(self.namespace, camera_frames(height, width, "bgr8"), self.camera_hz, "bgr8",
                            reliable=True, generation=len(self.cameras))
        else:
            camera = Camera(self.namespace, camera_frames(*self.size), self.camera_hz, generation=len(self.cameras))
        self.cameras.append(camera)
        return f"{camera.width}x{camera.height} {camera.encoding} {'reliable' if resized else 'best effort'}"

    def _stall_camera(self, seconds: float) -> str:
        camera = self.cameras[-1]
        camera.stall(seconds)
        sent = camera.sent
        self._stop.wait(seconds + 0.5)  # and the burst
        return f"no frames for {seconds:.0f} s, then {camera.sent - sent} at once"

    def _pause_node(self, seconds: float) -> str:
        os.kill(self.node.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.node.pid, signal.SIGCONT)
        return f"SIGSTOP for {seconds:.0f} s"

    def _starve(self, seconds: float) -> str:
        cores = os.cpu_count() or 2
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
        self._helpers += hogs
        try:
            self._stop.wait(seconds)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait(10)
        return f"{cores} busy processes for {seconds:.0f} s"

    def _three_clients(self, seconds: float) -> str:
        camera = self.cameras[-1]
        camera.depth = True
        end = time.monotonic() + seconds
        over = lambda: time.monotonic() >= end  # noqa: E731
        service = lambda k: self._call(f"v-{self.now():.3f}", SERVICE_QUERIES[k % len(SERVICE_QUERIES)])  # noqa: E731
        threads = [self._start_thread(lambda: self._every(3.0, over, self._topic), "soak-topic"),
                   self._start_thread(lambda: self._every(1.0, over, service), "soak-service")]
        for thread in threads:
            thread.join(seconds + 90.0)
        camera.depth = False
        return f"topic 3 Hz + service 1 Hz + structured {self.query_hz:.0f} Hz, depth on, {seconds:.0f} s"

    def _vanishing_client(self) -> str:
        query_id = f"gone-{self.now():.3f}"
        client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, self.namespace, query_id, VANISHING_QUERY],
                                  stdout=subprocess.PIPE, text=True)
        self._helpers.append(client)
        line, deadline = "", time.monotonic() + 60.0
        while "sent" not in line and time.monotonic() < deadline and client.poll() is None:
            line = client.stdout.readline()
        if "sent" not in line:
            client.kill()
            client.wait(10)
            return "the client did not get to send its call"
        self._record(Sent(query_id, "vanishing", VANISHING_QUERY, self.now()))
        time.sleep(0.1)  # the call is being answered
        client.kill()
        client.wait(10)
        return "killed (SIGKILL) 0.1 s after its call"

    def fault(self, name: str) -> FaultEvent:
        d = self.durations
        start = self.now()
        self.progress(f"{start:7.1f} s  fault {name}")
        actions = {"camera_restart": lambda: self._restart_camera(False),
                   "camera_restart_resized": lambda: self._restart_camera(True),
                   "camera_stall": lambda: self._stall_camera(d.stall),
                   "node_paused": lambda: self._pause_node(d.pause),
                   "cpu_starved": lambda: self._starve(d.starve),
                   "three_clients": lambda: self._three_clients(d.clients),
                   "vanishing_client": self._vanishing_client}
        detail = actions[name]()
        event = FaultEvent(name, start, self.now(), detail)
        self.faults.append(event)
        return event

    def run(self, faults=FAULTS, cycles: int = 1, duration: float | None = None) -> None:
        """The warm-up, then ``faults`` in turn, each followed by the recovery time;
        ``cycles`` times, or until ``duration`` seconds have passed (then the cycle in
        progress is finished)."""
        self._stop.wait(self.durations.warmup)
        if not faults:
            self._stop.wait(max(0.0, (duration or 0.0) - self.now()))
            return
        cycle = 0
        while cycle < cycles if duration is None else self.now() < duration:
            for name in faults:
                self.fault(name)
                self._stop.wait(self.durations.recovery)
            cycle += 1

    def drain(self, timeout: float = 60.0) -> None:
        """Stop the clients and wait (bounded) for the results still on their way."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(q not in self.received for q in self.sent):
            time.sleep(0.5)

    def close(self) -> node_process.NodeExit:
        """Stop everything this soak started; the node last (SIGINT, bounded)."""
        self._stop.set()
        if self.node.poll() is None:
            os.kill(self.node.pid, signal.SIGCONT)  # never leave it stopped
        for helper in self._helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait(10)
        for camera in self.cameras[-1:]:
            camera.close()
        self.spinner.stop()
        self.ros.destroy_node()
        rclpy.try_shutdown(context=self.context)
        return node_process.stop_node(self.node, timeout=30)

    # --- the verdict --------------------------------------------------------------------
    def report(self, node_log: str, rss_after_s: float = 300.0) -> SoakReport:
        return judge(self, node_log, rss_after_s)


@dataclass
class SoakReport:
    counts: dict  # per client: sent, answered, refused by status, lost, duplicated
    latency_ms: dict  # overall and in the 10 s after each kind of fault: p50 / p95 / p99 / n
    recovery_s: dict  # per fault kind: the slowest recovery (None: not recovered)
    recovery_bar_ms: float
    faults: list
    camera_hz_around_stalls: list  # per stall: the diagnostics' camera rate before / lowest / after
    stamp_violations: list  # query ids answered about another frame than the one they named
    older_camera_answers: int  # unnamed queries sent after a restart, answered about the old camera's frame
    log_problems: list  # lines of the node's log with an exception or an error
    node: dict  # cpu and rss over the run
    violations: list = field(default_factory=list)  # the rules broken, one sentence each

    def to_json(self) -> dict:
        return asdict(self)


def _percentiles(values) -> dict:
    if not len(values):
        return {"n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1)}


def _recovery(fault_end: float, latencies: list[tuple[float, float | None]], bar: float) -> float | None:
    """Seconds from ``fault_end`` to the first of RECOVERY_RUN queries in a row (by send
    time) answered within ``bar`` ms (None: answered is None, or not within it)."""
    run, start = 0, None
    for t, ms in latencies:
        if t < fault_end:
            continue
        if ms is not None and ms <= bar:
            start = t if run == 0 else start
            run += 1
            if run == RECOVERY_RUN:
                return max(0.0, start - fault_end)
        else:
            run = 0
    return None


def _camera_of(stamp_ns: int, cameras: list[Camera]) -> int | None:
    for camera in cameras:
        if camera.first_stamp_ns <= stamp_ns <= camera.last_stamp_ns:
            return camera.generation
    return None


def judge(soak: Soak, node_log: str, rss_after_s: float = 300.0) -> SoakReport:
    sent, received, faults = soak.sent, soak.received, soak.faults
    violations = []
    counts: dict[str, dict] = {}
    for client in ("structured", "topic", "service", "vanishing"):
        ids = [q for q, s in sent.items() if s.client == client]
        results = [received[q][0] for q in ids if received.get(q)]
        refused = Counter(Status(r.status).name for r in results if r.status != Status.OK)
        counts[client] = {"sent": len(ids), "answered": sum(r.status == Status.OK for r in results),
                          "refused": dict(refused), "lost": sum(1 for q in ids if not received.get(q)),
                          "duplicated": sum(1 for q in ids if len(received.get(q, [])) > 1),
                          "with_positions": sum(r.positions > 0 for r in results)}
        if client == "service":
            counts[client]["responses"] = sum(1 for q in ids if sent[q].response_t is not None)
        if counts[client]["lost"]:
            violations.append(f"{counts[client]['lost']} {client} queries got no result")
        if counts[client]["duplicated"]:
            violations.append(f"{counts[client]['duplicated']} {client} queries got more than one result")
    unknown = sorted(set(received) - set(sent))
    if unknown:
        violations.append(f"{len(unknown)} results for queries nobody sent, e.g. {unknown[:3]}")

    def latency(q: str) -> float | None:
        got = received.get(q)
        return (got[0].t - sent[q].t) * 1e3 if got and got[0].status == Status.OK else None

    answered = {q: ms for q in sent if (ms := latency(q)) is not None}
    first_fault = faults[0].start if faults else float("inf")
    warm = [ms for q, ms in answered.items() if sent[q].client == "structured" and sent[q].t < first_fault]
    bar = RECOVERY_BAR_FACTOR * float(np.percentile(warm, 95)) if warm else float("inf")
    latency_ms = {"overall": _percentiles(list(answered.values())), "warmup": _percentiles(warm)}
    structured = sorted((s.t, q) for q, s in sent.items() if s.client == "structured")
    recovery: dict[str, float | None] = {}
    for kind in dict.fromkeys(f.name for f in faults):
        after = [ms for f in faults if f.name == kind for q, ms in answered.items() if f.end <= sent[q].t < f.end + 10]
        latency_ms[f"10s_after_{kind}"] = _percentiles(after)
        times = [_recovery(f.end, [(t, latency(q)) for t, q in structured], bar) for f in faults if f.name == kind]
        slowest = None if None in times else max(times)
        recovery[kind] = None if slowest is None else round(slowest, 2)
        if slowest is None:
            # What the queries after it got, so that a failure says whether the node
            # was stuck (refusals, no answers) or only slower than the bar.
            last = max(f.end for f in faults if f.name == kind)
            got = [latency(q) for t, q in structured if t >= last]
            ms = [m for m in got if m is not None]
            seen = f"{len(got)} sent after it, none answered"
            if ms:
                seen = (f"{len(got)} sent after it: {len(ms)} answered (median {np.median(ms):.0f} ms, "
                        f"{sum(m <= bar for m in ms)} within the bar)")
            violations.append(f"after a {kind} fault the node never answered {RECOVERY_RUN} structured queries "
                              f"in a row within {bar:.0f} ms; {seen}")

    stamp_violations = [q for q, s in sent.items() if s.stamp_ns and received.get(q)
                        and received[q][0].status == Status.OK and received[q][0].stamp_ns != s.stamp_ns]
    if stamp_violations:
        violations.append(f"{len(stamp_violations)} queries naming a frame were answered about another one")
    # Each restart starts the next camera generation: a query sent after the k-th
    # restart is about an older camera's frame when that frame's generation is < k.
    restarts = [f.end for f in faults if f.name.startswith("camera_restart")]
    older = 0
    for q, s in sent.items():
        got = received.get(q)
        if not s.stamp_ns and got and got[0].status == Status.OK:
            camera = _camera_of(got[0].stamp_ns, soak.cameras)
            older += camera is not None and camera < sum(1 for t in restarts if t <= s.t)

    stalls = []
    for f in (f for f in faults if f.name == "camera_stall"):
        rates = soak.diagnostics
        before = [hz for t, hz, _ in rates if f.start - 5 <= t < f.start]
        during = [hz for t, hz, _ in rates if f.start + 1 <= t <= f.end + 1]
        after = [hz for t, hz, _ in rates if f.end + 3 <= t <= f.end + 10]
        stalls.append({"before": max(before, default=None), "lowest": min(during, default=None),
                       "after": max(after, default=None)})
        if not during or min(during) > 0.5:
            violations.append(f"the diagnostics' camera rate did not drop to 0 during the stall at {f.start:.0f} s")
        if not after or max(after) < 0.5 * soak.camera_hz:
            violations.append(f"the diagnostics' camera rate did not recover after the stall at {f.start:.0f} s")

    problems = [line for line in node_log.splitlines()
                if "Traceback" in line or "Exception" in line or "[ERROR]" in line or "[FATAL]" in line]
    if problems:
        violations.append(f"the node's log has {len(problems)} lines with an exception or an error")
    samples = soak.samples
    late = [s["rss_mb"] for s in samples if s["t"] >= rss_after_s]
    node = {"cpu_percent_mean": round(float(np.mean([s["cpu_percent"] for s in samples])), 1) if samples else None,
            "rss_mb_first": samples[0]["rss_mb"] if samples else None,
            "rss_mb_after": late[0] if late else None, "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
            "rss_mb_max": max(s["rss_mb"] for s in samples) if samples else None,
            "rss_growth_after_percent": round(100 * (late[-1] - late[0]) / late[0], 2) if late else None,
            "rss_after_s": rss_after_s}
    return SoakReport(counts, latency_ms, recovery, round(bar, 1), [asdict(f) for f in faults], stalls,
                      stamp_violations, older, problems[:20], node, violations)


def write_outputs(soak: Soak, report: SoakReport, out_dir: Path) -> list[Path]:
    """report.json, queries.csv (one row a query), samples.csv and soak.png (latency
    of every query over time with the faults shaded, and the node's RSS)."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "queries.csv", out_dir / "samples.csv", out_dir / "soak.png"]
    paths[0].write_text(json.dumps(report.to_json(), indent=2))
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query_id", "client", "text", "sent_s", "named_stamp_ns", "result_s", "status", "error",
                         "results"])
        for q, s in soak.sent.items():
            got = soak.received.get(q) or [None]
            first = got[0]
            writer.writerow([q, s.client, s.text, f"{s.t:.3f}", s.stamp_ns, f"{first.t:.3f}" if first else "",
                             Status(first.status).name if first else "LOST", first.error if first else "",
                             len(soak.received.get(q, []))])
    with open(paths[2], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["t", "cpu_percent", "rss_mb"])
        writer.writeheader()
        writer.writerows(soak.samples)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rss) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, height_ratios=[3, 1])
    colours = {f: plt.cm.tab10(i) for i, f in enumerate(FAULTS)}
    for f in soak.faults:
        for a in (ax, ax_rss):
            a.axvspan(f.start, max(f.end, f.start + 1.0), color=colours[f.name], alpha=0.25, lw=0)
    points = defaultdict(list)
    for q, s in soak.sent.items():
        got = soak.received.get(q)
        if got:
            points["answered" if got[0].status == Status.OK else "refused"].append((s.t, (got[0].t - s.t) * 1e3))
        else:
            points["lost"].append((s.t, 1.0))
    for kind, style in (("answered", dict(s=4, c="k")), ("refused", dict(s=10, c="tab:orange", marker="x")),
                        ("lost", dict(s=30, c="red", marker="v"))):
        if points[kind]:
            t, ms = zip(*points[kind])
            ax.scatter(t, ms, label=f"{kind} ({len(t)})", **style)
    ax.set_yscale("log")
    ax.set_ylabel("query -> result, ms")
    handles, labels = ax.get_legend_handles_labels()
    handles += [plt.Rectangle((0, 0), 1, 1, color=colours[f], alpha=0.25) for f in FAULTS]
    ax.legend(handles, labels + list(FAULTS), fontsize=7, ncol=5, loc="upper left")
    ax.set_title("grounding node under faults")
    if soak.samples:
        ax_rss.plot([s["t"] for s in soak.samples], [s["rss_mb"] for s in soak.samples], c="tab:blue")
    ax_rss.set_ylabel("node RSS, MB")
    ax_rss.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    return paths
