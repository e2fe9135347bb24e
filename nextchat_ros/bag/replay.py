"""Replay an evaluation bag through the live node (or straight through the
predictor with ``offline``) and collect one record per query.

Live: frames, camera_info and queries are published with the bag's own timing
(scaled by ``rate``) as the bag's CDR bytes, unchanged, into the node's topics;
the node's results are matched to queries by id (plain-text queries by text, in
order), written to an output bag, and timed from query publish to result
receipt. Offline: the same messages, in the same order, go through the same
``GroundingService`` the node runs, in this process and one query at a time, so
live minus offline latency is what the transport and the node's threads cost.

A bag that breaks part way stops the replay there; everything scored until then
is kept and the error is reported with it.
"""

from __future__ import annotations

import importlib
import subprocess
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import node_process
from ..options import DEFAULT_MAX_NEW_TOKENS
from ..ros_images import image_frame, roi_to_xyxy, stamp_to_ns
from ..ros_messages import result_objects
from ..scoring import Prediction, Truth
from ..service import GroundingService, Request
from .io import BagError, BagInfo, BagWriter, bag_info, deserialize, read_messages
from .record import IMAGE_TYPE, QUERY_TYPE, RESULT_TYPE, STRING_TYPE, TRUTH_TYPE, truth_from_message
from .topics import Topics


@dataclass
class QueryRecord:
    """One query of the bag and what became of it."""

    key: str  # query id (structured) or "text:<n>" (plain text)
    text: str
    regions: list  # pixel xyxy
    image_stamp_ns: int
    bag_time_ns: int
    truth: Truth | None = None
    frame: bytes | None = None  # CDR of the image the query is about (for overlays)
    published: float | None = None  # time.monotonic() at publish (live)
    latency_ms: float | None = None  # publish -> result receipt (live); compute time (offline)
    status: int | None = None  # None = no result (dropped)
    error: str = ""
    prediction: Prediction | None = None
    result_stamp_ns: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    score: dict[str, float] = field(default_factory=dict)  # this answer's own figures (iou, correct, ...)


@dataclass
class ReplayResult:
    mode: str  # live | offline
    records: list[QueryRecord]
    bag: str
    error: str = ""  # why the replay stopped early, if it did
    wall_s: float = 0.0
    frames: int = 0
    output_bag: str | None = None


class _Collector:
    """Pairs queries with their truth and frame while the bag is read."""

    def __init__(self, topics: Topics, frame_buffer: int = 64):
        self.topics = topics
        self.records: OrderedDict[str, QueryRecord] = OrderedDict()
        self.truth: dict[str, Truth] = {}
        self.frames: deque[tuple[int, bytes]] = deque(maxlen=frame_buffer)
        self.text_count = 0
        self.frame_count = 0

    def add_frame(self, stamp_ns: int, data: bytes) -> None:
        self.frame_count += 1
        self.frames.append((stamp_ns, data))

    def add(self, message) -> QueryRecord | None:
        """Take one bag message (frames go to :meth:`add_frame`); returns the new
        QueryRecord when it is a query."""
        topic = message.topic
        if topic == self.topics.truth:
            msg = deserialize(message.data, TRUTH_TYPE)
            truth = truth_from_message(msg)
            if msg.query_id in self.records:
                self.records[msg.query_id].truth = truth
            else:
                self.truth[msg.query_id] = truth
            return None
        if topic == self.topics.query:
            msg = deserialize(message.data, QUERY_TYPE)
            record = QueryRecord(msg.id, msg.text, [roi_to_xyxy(r) for r in msg.regions],
                                 stamp_to_ns(msg.image_stamp), message.time_ns)
        elif topic == self.topics.text_query:
            msg = deserialize(message.data, STRING_TYPE)
            self.text_count += 1
            record = QueryRecord(f"text:{self.text_count}", msg.data, [], 0, message.time_ns)
        else:
            return None
        if record.key in self.records:
            raise BagError(f"query id '{record.key}' appears twice in the bag; ids must be unique to match results")
        record.truth = self.truth.pop(record.key, None)
        record.frame = self._frame_for(record.image_stamp_ns)
        self.records[record.key] = record
        return record

    def _frame_for(self, stamp_ns: int) -> bytes | None:
        if not self.frames:
            return None
        if stamp_ns == 0:
            return self.frames[-1][1]
        return next((data for stamp, data in reversed(self.frames) if stamp == stamp_ns), None)

    def finish(self) -> list[QueryRecord]:
        return list(self.records.values())


def read_queries(bag: str | Path, *, image_topic: str | None = None, query_topic: str | None = None,
                 frame_buffer: int = 64) -> list[QueryRecord]:
    """Every query of a bag with its truth and the frame it is about (CDR bytes of the
    image, or None when the bag lost it), without a model: what training reads from
    a recorded bag."""
    info = bag_info(bag)
    topics = Topics.detect(info, image_topic, query_topic)
    collector = _Collector(topics, frame_buffer)
    for message in read_messages(bag, topics.inputs()):
        if message.topic == topics.image:
            collector.add_frame(stamp_to_ns(deserialize(message.data, IMAGE_TYPE).header.stamp), message.data)
        else:
            collector.add(message)
    return collector.finish()


# --- offline ---------------------------------------------------------------------------

def replay_offline(bag: str | Path, predictor, *, image_topic: str | None = None, query_topic: str | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True,
                   info: BagInfo | None = None) -> ReplayResult:
    """Score the bag's queries straight through the predictor (no ROS, no timing),
    asked as the node asks them (the service's auto mode). ``info``: the bag's
    ``bag_info`` when the caller has read it already (a damaged bag is scanned whole)."""

    info = info or bag_info(bag)
    topics = Topics.detect(info, image_topic, query_topic)
    collector = _Collector(topics)
    service = GroundingService(predictor, max_image_age=float("inf"), frame_buffer=64, queue_size=1,
                               max_new_tokens=max_new_tokens, masks=True)
    error = ""
    t0 = time.perf_counter()
    total = sum(info.counts.get(t, 0) for t in topics.inputs())
    try:
        with tqdm(total=total, desc="offline", unit="msg", disable=not progress) as bar:
            for message in read_messages(bag, topics.inputs()):
                bar.update()
                if message.topic == topics.image:
                    frame = image_frame(deserialize(message.data, IMAGE_TYPE))  # as the node makes it
                    service.add_frame(frame)
                    collector.add_frame(frame.stamp_ns, message.data)
                    continue
                record = collector.add(message)
                if record is None:
                    continue
                outcome = service.process(Request(record.key, record.text, record.regions, record.image_stamp_ns))
                record.status = int(outcome.status)
                record.error = outcome.error
                record.latency_ms = outcome.timings_ms.get("total_ms")
                record.stage_ms = {k: v for k, v in outcome.timings_ms.items() if k != "total_ms"}
                record.result_stamp_ns = outcome.frame.stamp_ns if outcome.frame is not None else 0
                record.prediction = Prediction(outcome.text, outcome.objects)
    except BagError as exc:
        error = str(exc)
    finally:
        service.close()
    return ReplayResult("offline", collector.finish(), str(bag), error, time.perf_counter() - t0,
                        collector.frame_count)


# --- live ------------------------------------------------------------------------------

def _ros_class(msgtype: str):
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def start_node(namespace: str, model_dir: str | None = None, backend: str = "torch", device: str = "cpu",
               extra_params: dict | None = None, log_path: str | Path | None = None) -> subprocess.Popen:
    """The grounding node in its own process, set up for a replay."""
    # Reliable camera topics: the replay measures the node, not frames lost in
    # best-effort transport (which cost most queries their frame in a replay here).
    params = {"backend": backend, "device": device, "max_image_age": 30.0, "frame_buffer": 16, "queue_size": 64,
              "image_qos": "reliable"}
    if model_dir:
        params["model_dir"] = str(model_dir)
    params.update(extra_params or {})
    return node_process.start_node(namespace, params, log_path)


class _LiveReplay:
    """A node of this process that publishes the bag into the grounding node under
    ``ns`` and pairs each result with its query."""

    def __init__(self, info: BagInfo, topics: Topics, ns: str, output_bag: str | Path | None):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from ..msg import GroundingResult
        from ..ros_client import Spinner

        self.topics, self.ns = topics, ns
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("nextchat_bag_eval", context=self.context)
        self.writer = BagWriter(output_bag, "mcap") if output_bag else None
        if self.writer:
            self.writer.add(f"{ns}/result", RESULT_TYPE)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.pending_by_text: dict[str, deque] = {}
        self.collector = _Collector(topics)
        self.received = 0
        self.node.create_subscription(GroundingResult, f"{ns}/result", self._on_result, 1000, raw=True)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        targets = {topics.image: f"{ns}/image", topics.camera_info: f"{ns}/camera_info",
                   topics.query: f"{ns}/structured_query", topics.text_query: f"{ns}/query"}
        self.publishers = {src: self.node.create_publisher(_ros_class(info.topics[src]), dst, reliable)
                           for src, dst in targets.items() if src}
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(self.node)
        self.spinner = Spinner(executor, self.context, "nextchat-bag-spin")

    def _on_result(self, data: bytes) -> None:
        now = time.monotonic()
        msg = deserialize(data, RESULT_TYPE)
        with self.arrived:
            if self.writer:
                self.writer.write(f"{self.ns}/result", time.time_ns(), data)
            if msg.query_id in self.collector.records:
                record = self.collector.records[msg.query_id]
            else:  # a plain-text query: the oldest unanswered one with this text
                queue = self.pending_by_text.get(msg.query)
                record = queue.popleft() if queue else None
            if record is None or record.status is not None:
                return
            record.status = int(msg.status)
            record.error = msg.error
            record.latency_ms = (now - record.published) * 1e3 if record.published else None
            record.result_stamp_ns = stamp_to_ns(msg.header.stamp)
            record.stage_ms = {"queue_ms": msg.queue_ms, "image_encode_ms": msg.image_encode_ms,
                               "llm_ms": msg.llm_ms, "mask_ms": msg.mask_ms, "node_total_ms": msg.total_ms}
            record.prediction = Prediction(msg.answer, result_objects(msg))
            self.received += 1
            self.arrived.notify_all()

    def publish(self, message) -> None:
        """One bag message into the node (the truth stays here)."""
        with self.lock:
            if message.topic == self.topics.image:
                self.collector.add_frame(stamp_to_ns(deserialize(message.data, IMAGE_TYPE).header.stamp),
                                         message.data)
                record = None
            else:
                record = self.collector.add(message)
            publisher = self.publishers.get(message.topic)
            if publisher is None:
                return
            if record is not None:
                record.published = time.monotonic()
                if record.key.startswith("text:"):
                    self.pending_by_text.setdefault(record.text, deque()).append(record)
        publisher.publish(message.data)

    def wait_for_results(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        with self.arrived:
            while self.received < len(self.collector.records) and time.monotonic() < deadline:
                self.arrived.wait(deadline - time.monotonic())

    def close(self) -> None:
        import rclpy

        self.spinner.stop()  # the spin thread ends before the node goes (ros_client.Spinner)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        if self.writer:
            self.writer.close()


def replay_live(bag: str | Path, namespace: str, *, rate: float = 1.0, image_topic: str | None = None,
                query_topic: str | None = None, output_bag: str | Path | None = None, wait_s: float = 60.0,
                ready_timeout: float = 120.0, node_process: subprocess.Popen | None = None,
                progress: bool = True, info: BagInfo | None = None) -> ReplayResult:
    """Publish the bag into the node under ``namespace`` with its recorded timing
    (scaled by ``rate``) and collect its results. ``info``: as for replay_offline."""
    from ..srv import Ground

    if rate <= 0:
        raise BagError("--rate must be positive")
    info = info or bag_info(bag)
    topics = Topics.detect(info, image_topic, query_topic)
    replay = _LiveReplay(info, topics, namespace.rstrip("/"), output_bag)
    error = ""
    t0 = time.perf_counter()
    try:
        _wait_for_node(replay.node, Ground, replay.ns, replay.publishers, ready_timeout, node_process)
        total = sum(info.counts.get(t, 0) for t in topics.inputs())
        start_wall, first_ns = time.monotonic(), None
        try:
            with tqdm(total=total, desc=f"replay x{rate:g}", unit="msg", disable=not progress) as bar:
                for message in read_messages(bag, topics.inputs()):
                    bar.update()
                    first_ns = message.time_ns if first_ns is None else first_ns
                    delay = start_wall + (message.time_ns - first_ns) / 1e9 / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    replay.publish(message)
                    if node_process is not None and node_process.poll() is not None:
                        raise BagError(f"the node exited with code {node_process.returncode} during the replay")
        except BagError as exc:
            error = str(exc)
        replay.wait_for_results(wait_s)
    finally:
        replay.close()
    return ReplayResult("live", replay.collector.finish(), str(bag), error, time.perf_counter() - t0,
                        replay.collector.frame_count, str(output_bag) if output_bag else None)


def _wait_for_node(node, service_type, ns: str, publishers: dict, timeout: float, process) -> None:
    client = node.create_client(service_type, f"{ns}/ground")
    deadline = time.monotonic() + timeout
    while not client.wait_for_service(timeout_sec=0.5):
        if process is not None and process.poll() is not None:
            raise BagError(f"the node exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise BagError(f"no grounding node answered on {ns}/ground within {timeout:.0f} s")
    while any(p.get_subscription_count() == 0 for p in publishers.values()):
        if time.monotonic() > deadline:
            raise BagError(f"the node under {ns} does not subscribe to every replayed topic")
        time.sleep(0.1)
    time.sleep(1.0)  # discovery settles both ways before the first frame goes out
