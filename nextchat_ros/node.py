"""The nextchat_grounding ROS 2 node.

A thin translation layer: ROS messages in, the ROS-agnostic GroundingService
(core) in the middle, ROS messages out (ros_messages). Callbacks only convert and
enqueue; the model runs on the service's worker thread, which also publishes the
results.

Topics (relative names, remap as usual):
  in : image (sensor_msgs/Image, sensor-data QoS), image/compressed (optional),
       query (std_msgs/String), structured_query (nextchat_ros/Query),
       depth (16UC1 mm or 32FC1 m) + camera_info (optional, for 3D points)
  out: result (nextchat_ros/GroundingResult), answer (std_msgs/String),
       mask (mono8 label image: object k has value k + 1), overlay (rgb8, only
       rendered while subscribed), detections (vision_msgs/Detection2DArray when
       vision_msgs is installed), target_point (geometry_msgs/PointStamped: the
       first object of an instruction), /diagnostics
  srv: ground (nextchat_ros/Ground)
  action: ask (nextchat_ros/Ask: feedback streams the answer so far and the objects
       grounded so far, token by token; cancel stops generation at the next token)
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from .action import Ask
from .errors import ImageError, NextChatError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .msg import GroundingResult, Query
from .options import BACKENDS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_SCORE, LLM_PRECISIONS, PRECISIONS
from .overlay import draw_overlay
from .predictor import load_predictor
from .ros_images import (
    compressed_msg_to_rgb,
    depth_msg_to_metres,
    fill_image_msg,
    image_frame,
    image_msg_to_rgb,
    roi_to_xyxy,
    stamp_to_ns,
)
from .ros_messages import HAVE_VISION_MSGS, detections_msg, frame_header, label_image, object_msg, result_msg
from .service import GroundingService, Outcome, Request, Status
from .srv import Ground

if HAVE_VISION_MSGS:
    from vision_msgs.msg import Detection2DArray

MODES = ("auto", "generate", "ground")
IMAGE_QOS = ("sensor_data", "reliable")
# The longest the ground service and the Ask action wait for a query's outcome.
SERVICE_TIMEOUT_S = 120.0
# Teardown normally takes 10-200 ms; ros2 launch sends SIGTERM 5 s after SIGINT, then SIGKILL.
SHUTDOWN_GRACE_S = 4.0
# How often the spin loop looks at its stop flag (a signal's Python handler runs between calls).
SPIN_PERIOD_S = 0.1


@dataclass
class NodeParameters:
    model_dir: str = ""
    backend: str = "torch"
    export_dir: str = ""
    # What the model runs in: fp32 | fp16 | bf16 ("" = fp32; the box heads stay fp32); with
    # onnxruntime / tensorrt, the export's graphs of it ("" = the export's default graphs).
    precision: str = ""
    # A TensorRT engine built for another TensorRT / GPU / model is rebuilt from its ONNX graph.
    rebuild_engines: bool = False
    # The LLM's weights: auto (precision's) | fp32 | fp16 | bf16 | int8 | int4 (weight-only).
    llm_precision: str = "auto"
    device: str = "cpu"
    max_image_age: float = 2.0
    frame_buffer: int = 8
    frame_wait: float = 0.5
    image_qos: str = "sensor_data"
    queue_size: int = 8
    mode: str = "auto"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    publish_masks: bool = True
    # Objects whose score (P the object named is there) is below this are not published.
    min_score: float = DEFAULT_MIN_SCORE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    subscribe_compressed: bool = False
    depth_sync_tolerance: float = 0.05
    diagnostics_period: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        if self.backend not in BACKENDS:
            raise ValueError(f"parameter backend='{self.backend}' must be one of {BACKENDS}")
        if self.precision and self.precision not in PRECISIONS:
            raise ValueError(f"parameter precision='{self.precision}' must be one of {PRECISIONS} (or empty)")
        if self.llm_precision not in LLM_PRECISIONS:
            raise ValueError(f"parameter llm_precision='{self.llm_precision}' must be one of {LLM_PRECISIONS}")
        if self.mode not in MODES:
            raise ValueError(f"parameter mode='{self.mode}' must be one of {MODES}")
        if self.image_qos not in IMAGE_QOS:
            raise ValueError(f"parameter image_qos='{self.image_qos}' must be one of {IMAGE_QOS}")
        for name in ("max_image_age", "depth_sync_tolerance", "diagnostics_period"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parameter {name}={getattr(self, name)} must be > 0 seconds")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"parameter min_score={self.min_score} must be in [0, 1]")
        if not self.frame_wait >= 0:
            raise ValueError(f"parameter frame_wait={self.frame_wait} must be >= 0 seconds")
        for name in ("frame_buffer", "queue_size", "max_new_tokens", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name}={getattr(self, name)} must be >= 1")
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ValueError(f"parameter model_dir: model directory not found: {self.model_dir}")
        if self.export_dir and not Path(self.export_dir).is_dir():
            raise ValueError(f"parameter export_dir: export directory not found: {self.export_dir}")
        check_device(self.device)


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` names a torch device this machine has."""
    if not _DEVICE.match(device):
        raise ValueError(f"parameter device='{device}' must be cpu, cuda or cuda:N (a bare number is read as an "
                         "integer by launch: write device:=cuda:0)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"parameter device='{device}': this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use device:=cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"parameter device='{device}': this machine has {torch.cuda.device_count()} CUDA GPU(s)")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce(name: str, value, kind: type):
    """A parameter's value as ``kind``, or ValueError naming it. Launch and YAML type
    values by their look (device:=0 is an integer), so strings take numbers too."""
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, bool) and type(value) is kind:
        return value
    raise ValueError(f"parameter {name}={value!r} must be {_TYPE_NAMES[kind]}")


def declare_node_parameters(node) -> None:
    """Declare every NodeParameters field on ``node``, typed when read (read_parameters)."""
    dynamic = ParameterDescriptor(dynamic_typing=True)  # checked there, with a sentence instead of a traceback
    for f in fields(NodeParameters):
        try:
            node.declare_parameter(f.name, f.default, dynamic)
        except ParameterException as exc:
            raise ValueError(f"parameter {f.name}: {exc}") from None


def read_parameters(node) -> NodeParameters:
    """The node's parameters; a value of the wrong type or range raises ValueError naming it."""
    values = {f.name: _coerce(f.name, node.get_parameter(f.name).value, type(f.default))
              for f in fields(NodeParameters)}
    params = NodeParameters(**values)
    params.validate()
    return params


def declare_parameters(node) -> NodeParameters:
    declare_node_parameters(node)
    return read_parameters(node)


def main(argv: list[str] | None = None) -> None:
    """The executable: run the node, then leave the process at once with run()'s status.

    run() closes everything that needs an orderly close (queued queries answered, ROS
    entities and the DDS participant destroyed, so peers see the node leave at once).
    os._exit then skips only the interpreter's teardown of the model's object graph,
    which took ~1 s from SIGINT to exit on an idle 2-core machine and 3-5 s under load,
    against the 5 s ros2 launch allows before escalating to SIGTERM.
    """
    status = run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT / SIGTERM; returns the exit status (0, or 1 when the
    parameters or the model are refused). ``--managed`` (before ``--ros-args``) runs
    the lifecycle node instead.

    The ROS teardown is bounded: Fast DDS can deadlock while destroying a reader or
    writer (seen here once in ~45 loaded runs, in destroy_node, after a CI run had the
    node alive 30 s after SIGINT; cf. eProsima/Fast-DDS#6193). If the teardown has not
    finished SHUTDOWN_GRACE_S after it starts, faulthandler's watchdog (a C thread, so it
    runs even while the stuck call holds the GIL) writes every thread's stack to stderr
    and exits with status 1."""
    stop = _StopOnSignal()
    try:
        # Our own signal handlers, not rclpy's: those shut the context down at once, and
        # the result of a query in flight could then no longer be published.
        rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    except _rclpy.RCLError as exc:  # e.g. a params file that is missing or not YAML
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r", at \S+:\d+", "", first)  # rcl's source locations say nothing to a user
        print(f"[FATAL] [nextchat_grounding]: cannot start: {first}", file=sys.stderr)
        return 1
    args = rclpy.utilities.remove_ros_args(argv if argv is not None else sys.argv)[1:]
    node = executor = None
    try:
        try:
            node = ManagedGroundingNode() if "--managed" in args else GroundingNode()
        except (ValueError, NextChatError) as exc:
            get_logger("nextchat_grounding").fatal(str(exc))
            return 1
        # One thread is enough: callbacks only convert and enqueue (the model runs on
        # the service's worker thread) and the service callback awaits its result.
        # rclpy 9's MultiThreadedExecutor re-submits tasks still queued in its pool
        # and spins without waiting meanwhile (ros2/rclpy#1452, fixed upstream in
        # #1547): holding the GIL, it stalled the worker for seconds per query.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        stop.spinning = True
        while not stop.requested.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # A terminal's Ctrl-C reaches the node twice (from the terminal to the whole
        # process group, and again from ros2 launch); the second must not interrupt
        # the teardown. Bounded all the same: the watchdog below, and launch's SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.close()  # queued queries get their result; the ones in flight finish and are published
        faulthandler.dump_traceback_later(SHUTDOWN_GRACE_S, exit=True)
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        context = rclpy.get_default_context()
        rclpy.try_shutdown()
        context.destroy()  # the DDS participant leaves the graph now, not at interpreter exit
        faulthandler.cancel_dump_traceback_later()
    return 0


class _StopOnSignal:
    """SIGINT and SIGTERM end the spin loop with the ROS context still up, so the
    teardown can answer and publish every query in flight. Before the loop runs (the
    model is loading) a signal raises KeyboardInterrupt, as Python's own handler does."""

    def __init__(self):
        self.requested = threading.Event()
        self.spinning = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)

    def __call__(self, signum, frame) -> None:
        self.requested.set()
        if not self.spinning:
            raise KeyboardInterrupt


class _Serving:
    """What the plain and the managed node share: the ROS interfaces around a
    GroundingService, their callbacks and outputs. ``self.service`` is the service
    while the node serves and None otherwise; :meth:`_refusal` says why a query
    that arrives is not served (None when it is)."""

    service: GroundingService | None = None

    def _start_serving(self, p: NodeParameters) -> None:
        """Load the model and create every subscription, publisher, service and timer."""
        self.params = p
        predictor = load_predictor(p.model_dir, p.backend, p.export_dir, p.device, p.precision or None,
                                   p.max_image_pixels, p.rebuild_engines, p.llm_precision)
        if getattr(predictor.backend, "fallback_reason", None):
            self.get_logger().warning(f"backend '{p.backend}' unavailable ({predictor.backend.fallback_reason}); "
                                      f"running the vision and mask parts on {predictor.backend.name}")
        self.service = GroundingService(predictor, max_image_age=p.max_image_age, frame_buffer=p.frame_buffer,
                                        frame_wait=p.frame_wait, queue_size=p.queue_size, default_mode=p.mode,
                                        max_new_tokens=p.max_new_tokens, masks=p.publish_masks,
                                        min_score=p.min_score)
        self._text_ids = 0
        self._depth = None  # (stamp_ns, metres)
        self._intrinsics = None
        self._lock = threading.Lock()
        self._entities = self._create_interfaces(p)
        # Frames received per second, in the diagnostics: far below the camera's
        # rate means frames are lost in transport (config/fastdds_large_images.xml).
        self._frames_at_last_diagnostics = (0, self.get_clock().now())
        self._entities.append(self.create_timer(p.diagnostics_period, self._publish_diagnostics))

    def _stop_serving(self) -> None:
        """Answer what is queued, destroy the interfaces and drop the model."""
        service, self.service = self.service, None
        if service is None:
            return
        service.close()
        for entity in self._entities:
            if isinstance(entity, ActionServer):
                entity.destroy()  # removes itself from the node's waitables
                continue
            for destroy in (self.destroy_subscription, self.destroy_publisher, self.destroy_service,
                            self.destroy_timer):
                if destroy(entity):  # each returns False for an entity of another kind
                    break
        self._entities = []

    def _parameters_text(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.params).items())

    def _refusal(self) -> tuple[Status, str] | None:
        # As the service answers what is still queued when it closes.
        return None if self.service is not None else (Status.INTERNAL_ERROR, "the node is shutting down")

    def _submit(self, request: Request) -> None:
        refusal = self._refusal()
        if refusal is None:
            self.service.submit(request)
        else:
            self._publish(Outcome(request, *refusal))

    def _create_interfaces(self, p: NodeParameters) -> list:
        # Best effort by default, as camera drivers publish (frames over 512 KB
        # need config/fastdds_large_images.xml with Fast DDS, or most are lost).
        # "reliable" is for replays, where every frame a query names must arrive.
        sensor = (qos_profile_sensor_data if p.image_qos == "sensor_data"
                  else QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        entities = [self.create_subscription(Image, "image", self._on_image, sensor)]
        if p.subscribe_compressed:
            entities.append(self.create_subscription(CompressedImage, "image/compressed", self._on_compressed, sensor))
        entities.append(self.create_subscription(Image, "depth", self._on_depth, sensor))
        entities.append(self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sensor))
        # A deep history: a burst of queries behind a camera callback must never
        # make the middleware drop one (each query gets exactly one result).
        entities.append(self.create_subscription(String, "query", self._on_text_query, 100))
        entities.append(self.create_subscription(Query, "structured_query", self._on_query, 100))
        self.result_pub = self.create_publisher(GroundingResult, "result", 100)
        self.answer_pub = self.create_publisher(String, "answer", 100)
        self.mask_pub = self.create_publisher(Image, "mask", 10)
        self.overlay_pub = self.create_publisher(Image, "overlay", 10)
        self.point_pub = self.create_publisher(PointStamped, "target_point", 10)
        self.detections_pub = self.create_publisher(Detection2DArray, "detections", 10) if HAVE_VISION_MSGS else None
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        entities += [pub for pub in (self.result_pub, self.answer_pub, self.mask_pub, self.overlay_pub,
                                     self.point_pub, self.detections_pub, self.diagnostics_pub) if pub is not None]
        # The service callback awaits its outcome, so the executor keeps taking
        # camera frames and queries meanwhile. Its own reentrant group: a pending
        # callback holds its group, and the default (mutually exclusive) group
        # holds every subscription.
        entities.append(self.create_service(Ground, "ground", self._on_ground, callback_group=ReentrantCallbackGroup()))
        # Every goal is accepted and gets one result; a refusal (overloaded, no image,
        # inactive...) is that result's status, with the goal aborted.
        entities.append(ActionServer(self, Ask, "ask", execute_callback=self._on_ask,
                                     cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                                     callback_group=ReentrantCallbackGroup()))
        return entities

    def close(self) -> None:
        self._stop_serving()

    # --- inputs --------------------------------------------------------------------
    def _frame_from(self, msg, convert):
        frame = image_frame(msg, convert, self.params.max_image_pixels)
        if frame.image is None:
            return frame
        with self._lock:
            depth, intrinsics = self._depth, self._intrinsics
        if depth is not None and intrinsics is not None and depth[1].shape == frame.image.shape[:2] \
                and abs(depth[0] - frame.stamp_ns) <= self.params.depth_sync_tolerance * 1e9:
            frame.depth, frame.intrinsics = depth[1], intrinsics
        return frame

    def _on_image(self, msg) -> None:
        self._add_frame(self._frame_from(msg, image_msg_to_rgb))

    def _on_compressed(self, msg) -> None:
        self._add_frame(self._frame_from(msg, compressed_msg_to_rgb))

    def _add_frame(self, frame) -> None:
        service = self.service
        if service is not None:
            service.add_frame(frame)

    def _on_depth(self, msg) -> None:
        try:
            depth = depth_msg_to_metres(msg, self.params.max_image_pixels)
        except ImageError as exc:
            self.get_logger().warning(f"depth image ignored: {exc}", throttle_duration_sec=5.0)
            return
        with self._lock:
            self._depth = (stamp_to_ns(msg.header.stamp), depth)

    def _on_camera_info(self, msg) -> None:
        k = list(msg.k)
        if k[0] > 0 and k[4] > 0:
            with self._lock:
                self._intrinsics = (k[0], k[4], k[2], k[5])

    def _on_text_query(self, msg) -> None:
        self._text_ids += 1
        self._submit(Request(f"text-{self._text_ids}", msg.data, done=self._publish))

    def _request_from(self, query, done, frame=None) -> Request:
        regions = [roi_to_xyxy(r) for r in query.regions]
        return Request(query.id, query.text, regions, stamp_to_ns(query.image_stamp), frame=frame, done=done)

    def _on_query(self, msg) -> None:
        self._submit(self._request_from(msg, self._publish))

    async def _on_ground(self, request, response):
        response.result = await self._outcome_of(request.query, request.image)
        return response

    async def _on_ask(self, goal):
        def progress(text, objects, tokens) -> None:  # on the worker thread, after each token
            goal.publish_feedback(Ask.Feedback(answer=text, objects=[object_msg(o, None) for o in objects],
                                               tokens=tokens))

        result = await self._outcome_of(goal.request.query, goal.request.image, progress,
                                        lambda: goal.is_cancel_requested)
        if result.status == GroundingResult.STATUS_OK:
            goal.succeed()
        elif result.status == GroundingResult.STATUS_CANCELLED and goal.is_cancel_requested:
            goal.canceled()
        else:
            goal.abort()
        return Ask.Result(result=result)

    async def _outcome_of(self, query, image, progress=None, cancelled=None) -> GroundingResult:
        """Submit one query (about ``image``, or the camera's frame when it is empty) and
        await its published result, or an INTERNAL_ERROR result after SERVICE_TIMEOUT_S."""
        outcome = Future(executor=self.executor)
        # A done callback makes set_result (on the worker thread) wake the executor,
        # which then resumes the awaiting coroutine.
        outcome.add_done_callback(lambda _: None)
        settle = threading.Lock()

        def settle_once(result) -> None:  # the worker's answer or the timeout, whichever is first
            with settle:
                if not outcome.done():
                    outcome.set_result(result)

        def timed_out() -> None:
            result = GroundingResult(query_id=query.id, query=query.text,
                                     status=GroundingResult.STATUS_INTERNAL_ERROR,
                                     error=f"no result within {SERVICE_TIMEOUT_S:.0f} s")
            result.header.stamp = self.get_clock().now().to_msg()
            settle_once(result)

        frame = self._frame_from(image, image_msg_to_rgb) if image.width or image.height or len(image.data) else None
        timer = threading.Timer(SERVICE_TIMEOUT_S, timed_out)
        timer.daemon = True
        timer.start()
        request = self._request_from(query, lambda o: settle_once(self._publish(o)), frame)
        request.progress, request.cancelled = progress, cancelled
        self._submit(request)
        result = await outcome
        timer.cancel()
        return result

    # --- outputs -------------------------------------------------------------------
    def _publish(self, outcome: Outcome) -> GroundingResult:
        """Runs on the service's worker thread (publishers are thread-safe)."""
        header = frame_header(outcome.frame, self.get_clock().now().to_msg())
        result = result_msg(outcome, header, with_masks=self.params.publish_masks)
        try:
            self.result_pub.publish(result)
            text = outcome.text if outcome.status == Status.OK else f"[{outcome.status.name}] {outcome.error}"
            self.answer_pub.publish(String(data=text))
            if outcome.status == Status.OK and outcome.objects:
                self._publish_images(outcome, header)
                self._publish_target(outcome, header)
        except _rclpy.RCLError as exc:
            if rclpy.ok():
                raise
            # run() shuts the context down only after the service has closed; should
            # something else in this process shut it down first, the result cannot be sent.
            self.get_logger().warning(f"result of query {outcome.request.query_id!r} not published: the node "
                                      f"is shutting down ({str(exc).split(',')[0]})")
        return result

    def _publish_images(self, outcome: Outcome, header) -> None:
        image = outcome.frame.image
        labels = label_image(outcome.objects, *image.shape[:2])
        self.mask_pub.publish(fill_image_msg(Image(), labels, "mono8", header))
        if self.overlay_pub.get_subscription_count() > 0:
            overlay = draw_overlay(image, outcome.objects, outcome.request.regions or None)
            self.overlay_pub.publish(fill_image_msg(Image(), overlay, "rgb8", header))
        if self.detections_pub is not None:
            self.detections_pub.publish(detections_msg(outcome.objects, header))

    def _publish_target(self, outcome: Outcome, header) -> None:
        first = outcome.objects[0]
        if first.position is None or not outcome.instruction:
            return
        point = PointStamped(header=header)
        point.point.x, point.point.y, point.point.z = first.position
        self.point_pub.publish(point)

    def _publish_diagnostics(self) -> None:
        s = self.service
        if s is None:
            return
        status = DiagnosticStatus(name="nextchat_grounding: inference", hardware_id=self.params.device)
        depth = s.queue_depth
        status.level = DiagnosticStatus.OK if depth < s.queue_size else DiagnosticStatus.WARN
        status.message = f"{depth} queued, {s.counts['ok']} answered, {s.counts['refused']} refused"
        now, (count_then, then) = self.get_clock().now(), self._frames_at_last_diagnostics
        seconds = max((now - then).nanoseconds * 1e-9, 1e-9)
        camera_hz = (s.counts["frames"] - count_then) / seconds
        self._frames_at_last_diagnostics = (s.counts["frames"], now)
        values = {"queue_depth": depth, "camera_frames_per_second": f"{camera_hz:.1f}", **s.counts,
                  **{k: f"{v:.1f}" for k, v in s.last_timings.items()}}
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)


class GroundingNode(_Serving, Node):
    """The node: loads the model and serves from the start."""

    def __init__(self, node_name: str = "nextchat_grounding", **kwargs):
        super().__init__(node_name, **kwargs)
        self._start_serving(declare_parameters(self))
        self.get_logger().info(f"nextchat_grounding ready: {self._parameters_text()}")


class ManagedGroundingNode(_Serving, LifecycleNode):
    """The lifecycle (managed) node: configure loads and checks the model, activate
    serves, deactivate refuses queries (STATUS_INACTIVE), cleanup frees the model's
    memory. Parameters are declared at once (``ros2 param set`` works before
    configure) and read at configure."""

    def __init__(self, node_name: str = "nextchat_grounding", **kwargs):
        super().__init__(node_name, **kwargs)
        self._active = False
        declare_node_parameters(self)
        self.get_logger().info(f"nextchat_grounding (managed) unconfigured; {memory_use()}")

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._start_serving(read_parameters(self))
        except (ValueError, NextChatError) as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"nextchat_grounding configured; {memory_use()}: {self._parameters_text()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._active = True
        self.get_logger().info("nextchat_grounding active: serving")
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._active = False
        self.get_logger().info(f"nextchat_grounding inactive; {memory_use()}: queries are refused (STATUS_INACTIVE)")
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._stop_serving()
        release_memory()
        self.get_logger().info(f"nextchat_grounding cleaned up; {memory_use()}")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._active = False
        self._stop_serving()
        return TransitionCallbackReturn.SUCCESS

    def _refusal(self) -> tuple[Status, str] | None:
        if self._active and self.service is not None:
            return None
        return (Status.INACTIVE,
                "the node is not active (lifecycle); activate it with `ros2 lifecycle set <node> activate`")


def release_memory() -> None:
    """Give the dropped model's memory back: Python's cycles, CUDA's cache, and the C
    heap's free pages (glibc keeps freed memory for the process unless trimmed)."""
    import contextlib
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_use() -> str:
    """This process's resident memory (and CUDA memory where there is a GPU), for the log."""
    import torch

    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    text = f"RSS {rss:.0f} MB"
    if torch.cuda.is_available():
        text += f", CUDA allocated {torch.cuda.memory_allocated() / 2**20:.0f} MB"
    return text


if __name__ == "__main__":
    main()
