"""The nextchat_grounding ROS 2 node.

A thin translation layer: ROS messages in, the ROS-agnostic GroundingService
(core) in the middle, ROS messages out. Callbacks only convert and enqueue; the
model runs on the service's worker thread, which also publishes the results.

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
"""

from __future__ import annotations

import faulthandler
import os
import re
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MODES = ("auto", "generate", "ground")
IMAGE_QOS = ("sensor_data", "reliable")
SERVICE_TIMEOUT_S = 120.0
# Teardown normally takes 10-200 ms; ros2 launch sends SIGTERM 5 s after SIGINT, then SIGKILL.
SHUTDOWN_GRACE_S = 4.0
INSTRUCTION = re.compile(r"^\s*(?:please\s+)?(?:pick(?: up)?|grab|grasp|take|put|place|move|push|bring|fetch|"
                         r"hand me|go to|reach)\b", re.I)


@dataclass
class NodeParameters:
    model_dir: str = ""
    backend: str = "torch"
    export_dir: str = ""
    device: str = "cpu"
    max_image_age: float = 2.0
    frame_buffer: int = 8
    frame_wait: float = 0.5
    image_qos: str = "sensor_data"
    queue_size: int = 8
    mode: str = "auto"
    max_new_tokens: int = 48
    publish_masks: bool = True
    max_image_pixels: int = 16777216
    subscribe_compressed: bool = False
    depth_sync_tolerance: float = 0.05
    diagnostics_period: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        if self.backend not in BACKENDS:
            raise ValueError(f"parameter backend='{self.backend}' must be one of {BACKENDS}")
        if self.mode not in MODES:
            raise ValueError(f"parameter mode='{self.mode}' must be one of {MODES}")
        if self.image_qos not in IMAGE_QOS:
            raise ValueError(f"parameter image_qos='{self.image_qos}' must be one of {IMAGE_QOS}")
        for name in ("max_image_age", "depth_sync_tolerance", "diagnostics_period"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parameter {name}={getattr(self, name)} must be > 0 seconds")
        if not self.frame_wait >= 0:
            raise ValueError(f"parameter frame_wait={self.frame_wait} must be >= 0 seconds")
        for name in ("frame_buffer", "queue_size", "max_new_tokens", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name}={getattr(self, name)} must be >= 1")
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ValueError(f"parameter model_dir: model directory not found: {self.model_dir}")
        if self.export_dir and not Path(self.export_dir).is_dir():
            raise ValueError(f"parameter export_dir: export directory not found: {self.export_dir}")


def declare_parameters(node) -> NodeParameters:
    """Declare every NodeParameters field on ``node`` (typed by its default) and read them."""
    values = {f.name: node.declare_parameter(f.name, f.default).value for f in fields(NodeParameters)}
    params = NodeParameters(**values)
    params.validate()
    return params


def load_predictor(params: NodeParameters):
    """The predictor the parameters ask for; ModelFileError / ValueError name what is wrong."""
    from .backends import load_backend
    from .errors import ModelFileError
    from .model.build import DEFAULT_MODEL_DIR
    from .model.checkpoint import load_pretrained
    from .predictor import NextChatPredictor

    model_dir = Path(params.model_dir) if params.model_dir else DEFAULT_MODEL_DIR
    if not params.model_dir and not (model_dir / "model.safetensors").is_file():
        raise ModelFileError(f"no model_dir given and the shipped model is missing: {model_dir}")
    model = load_pretrained(model_dir, device=params.device)
    export_dir = Path(params.export_dir) if params.export_dir else model_dir / "export"
    backend = load_backend(params.backend, model, export_dir if params.backend != "torch" else None)
    return NextChatPredictor(model, device=params.device, max_image_pixels=params.max_image_pixels,
                             backend=backend)


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
    parameters or the model are refused).

    The ROS teardown is bounded: Fast DDS can deadlock while destroying a reader or
    writer (seen here once in ~45 loaded runs, in destroy_node, after a CI run had the
    node alive 30 s after SIGINT; cf. eProsima/Fast-DDS#6193). If the teardown has not
    finished SHUTDOWN_GRACE_S after it starts, faulthandler's watchdog (a C thread, so it
    runs even while the stuck call holds the GIL) writes every thread's stack to stderr
    and exits with status 1."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.logging import get_logger

    from .errors import NextChatError

    rclpy.init(args=argv if argv is not None else sys.argv)
    node = executor = None
    try:
        try:
            node = _node_class()()
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
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()  # queued queries get their result; an in-flight one finishes
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


def _node_class():
    """Defined lazily so that importing this module needs no rclpy (tests, CLI)."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from geometry_msgs.msg import PointStamped
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rclpy.task import Future
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from std_msgs.msg import Header, String

    from .errors import ImageError
    from .msg import GroundedObject, GroundingResult, Query
    from .overlay import draw_overlay
    from .ros_images import (
        compressed_msg_to_rgb,
        depth_msg_to_metres,
        fill_image_msg,
        image_frame,
        image_msg_to_rgb,
        roi_to_xyxy,
        stamp_to_ns,
    )
    from .service import Frame, GroundingService, Request, Status
    from .srv import Ground

    try:
        from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
        have_vision_msgs = True
    except ImportError:  # real ROS installs have vision_msgs; the PyPI wheels do not
        have_vision_msgs = False

    class GroundingNode(Node):
        def __init__(self):
            super().__init__("nextchat_grounding")
            self.params = declare_parameters(self)
            p = self.params
            predictor = load_predictor(p)
            if getattr(predictor.backend, "fallback_reason", None):
                self.get_logger().warning(f"backend '{p.backend}' unavailable ({predictor.backend.fallback_reason}); "
                                          "running the vision and mask parts on ONNX Runtime")
            self.service = GroundingService(predictor, max_image_age=p.max_image_age, frame_buffer=p.frame_buffer,
                                            frame_wait=p.frame_wait,
                                            queue_size=p.queue_size, default_mode=p.mode,
                                            max_new_tokens=p.max_new_tokens, masks=True)
            self._text_ids = 0
            self._depth = None  # (stamp_ns, metres)
            self._intrinsics = None
            self._lock = threading.Lock()
            # Best effort by default, as camera drivers publish (frames over 512 KB
            # need config/fastdds_large_images.xml with Fast DDS, or most are lost).
            # "reliable" is for replays, where every frame a query names must arrive.
            sensor = (qos_profile_sensor_data if p.image_qos == "sensor_data"
                      else QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            self.create_subscription(Image, "image", self._on_image, sensor)
            if p.subscribe_compressed:
                self.create_subscription(CompressedImage, "image/compressed", self._on_compressed, sensor)
            self.create_subscription(Image, "depth", self._on_depth, sensor)
            self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sensor)
            # A deep history: a burst of queries behind a camera callback must never
            # make the middleware drop one (each query gets exactly one result).
            self.create_subscription(String, "query", self._on_text_query, 100)
            self.create_subscription(Query, "structured_query", self._on_query, 100)
            self.result_pub = self.create_publisher(GroundingResult, "result", 100)
            self.answer_pub = self.create_publisher(String, "answer", 100)
            self.mask_pub = self.create_publisher(Image, "mask", 10)
            self.overlay_pub = self.create_publisher(Image, "overlay", 10)
            self.point_pub = self.create_publisher(PointStamped, "target_point", 10)
            self.detections_pub = (self.create_publisher(Detection2DArray, "detections", 10)
                                   if have_vision_msgs else None)
            self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            # The service callback awaits its outcome, so the executor keeps taking
            # camera frames and queries meanwhile. Its own reentrant group: a pending
            # callback holds its group, and the default (mutually exclusive) group
            # holds every subscription.
            self.create_service(Ground, "ground", self._on_ground, callback_group=ReentrantCallbackGroup())
            # Frames received per second, in the diagnostics: far below the camera's
            # rate means frames are lost in transport (config/fastdds_large_images.xml).
            self._frames_at_last_diagnostics = (0, self.get_clock().now())
            self.create_timer(p.diagnostics_period, self._publish_diagnostics)
            self.get_logger().info(
                "nextchat_grounding ready: " + ", ".join(f"{k}={v!r}" for k, v in vars(p).items()))

        def close(self) -> None:
            self.service.close()

        # --- inputs --------------------------------------------------------------------
        def _frame_from(self, msg, convert) -> Frame:
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
            self.service.add_frame(self._frame_from(msg, image_msg_to_rgb))

        def _on_compressed(self, msg) -> None:
            self.service.add_frame(self._frame_from(msg, compressed_msg_to_rgb))

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
            self.service.submit(Request(f"text-{self._text_ids}", msg.data, mode=self.params.mode,
                                        done=self._publish))

        def _request_from(self, query, done, frame=None) -> Request:
            regions = [roi_to_xyxy(r) for r in query.regions]
            return Request(query.id, query.text, regions, stamp_to_ns(query.image_stamp), self.params.mode,
                           frame=frame, done=done)

        def _on_query(self, msg) -> None:
            self.service.submit(self._request_from(msg, self._publish))

        async def _on_ground(self, request, response):
            outcome = Future(executor=self.executor)
            # A done callback makes set_result (on the worker thread) wake the executor,
            # which then resumes this coroutine.
            outcome.add_done_callback(lambda _: None)
            settle = threading.Lock()

            def settle_once(result) -> None:  # the worker's answer or the timeout, whichever is first
                with settle:
                    if not outcome.done():
                        outcome.set_result(result)

            def timed_out() -> None:
                result = GroundingResult(query_id=request.query.id, query=request.query.text,
                                         status=GroundingResult.STATUS_INTERNAL_ERROR,
                                         error=f"no result within {SERVICE_TIMEOUT_S:.0f} s")
                result.header.stamp = self.get_clock().now().to_msg()
                settle_once(result)

            frame = self._frame_from(request.image, image_msg_to_rgb) if request.image.width or \
                request.image.height or len(request.image.data) else None
            timer = threading.Timer(SERVICE_TIMEOUT_S, timed_out)
            timer.daemon = True
            timer.start()
            self.service.submit(self._request_from(request.query, lambda o: settle_once(self._publish(o)), frame))
            response.result = await outcome
            timer.cancel()
            return response

        # --- outputs -------------------------------------------------------------------
        def _header(self, frame) -> Header:
            header = Header()
            if frame is not None and frame.stamp_ns:
                header.stamp.sec, header.stamp.nanosec = divmod(frame.stamp_ns, 1_000_000_000)
                header.frame_id = frame.frame_id
            else:
                header.stamp = self.get_clock().now().to_msg()
                header.frame_id = frame.frame_id if frame is not None else ""
            return header

        def _publish(self, outcome) -> GroundingResult:
            """Runs on the service's worker thread (publishers are thread-safe)."""
            request, frame = outcome.request, outcome.frame
            header = self._header(frame)
            result = GroundingResult(header=header, query_id=request.query_id, query=request.text,
                                     answer=outcome.text, status=int(outcome.status), error=outcome.error)
            t = outcome.timings_ms
            result.queue_ms = float(t.get("queue_ms", 0.0))
            result.image_encode_ms = float(t.get("image_encode_ms", 0.0))
            result.llm_ms = float(t.get("llm_ms", 0.0))
            result.mask_ms = float(t.get("mask_ms", 0.0))
            result.total_ms = float(t.get("total_ms", 0.0))
            for obj in outcome.objects:
                item = GroundedObject(phrase=obj.phrase, score=float(obj.score), mask_score=float(obj.mask_score))
                x1, y1, x2, y2 = (float(v) for v in obj.box)
                item.center_x, item.center_y, item.size_x, item.size_y = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                if self.params.publish_masks and obj.mask is not None:
                    fill_image_msg(item.mask, obj.mask.astype(np.uint8) * 255, "mono8", header)
                if obj.position is not None:
                    item.has_position = True
                    item.position.x, item.position.y, item.position.z = obj.position
                result.objects.append(item)
            self.result_pub.publish(result)
            text = outcome.text if outcome.status == Status.OK else f"[{outcome.status.name}] {outcome.error}"
            self.answer_pub.publish(String(data=text))
            if outcome.status == Status.OK and outcome.objects:
                self._publish_images(outcome, header)
                self._publish_target(outcome, header)
            return result

        def _publish_images(self, outcome, header) -> None:
            frame = outcome.frame
            labels = np.zeros(frame.image.shape[:2], np.uint8)
            for k, obj in enumerate(outcome.objects):
                if obj.mask is not None:
                    labels[obj.mask & (labels == 0)] = min(k + 1, 255)
            self.mask_pub.publish(fill_image_msg(Image(), labels, "mono8", header))
            if self.overlay_pub.get_subscription_count() > 0:
                overlay = draw_overlay(frame.image, outcome.objects, outcome.request.regions or None)
                self.overlay_pub.publish(fill_image_msg(Image(), overlay, "rgb8", header))
            if self.detections_pub is not None:
                detections = Detection2DArray(header=header)
                for obj in outcome.objects:
                    d = Detection2D(header=header)
                    x1, y1, x2, y2 = (float(v) for v in obj.box)
                    d.bbox.center.position.x, d.bbox.center.position.y = (x1 + x2) / 2, (y1 + y2) / 2
                    d.bbox.size_x, d.bbox.size_y = x2 - x1, y2 - y1
                    hypothesis = ObjectHypothesisWithPose()
                    hypothesis.hypothesis.class_id = obj.phrase
                    hypothesis.hypothesis.score = float(obj.score)
                    d.results.append(hypothesis)
                    detections.detections.append(d)
                self.detections_pub.publish(detections)

        def _publish_target(self, outcome, header) -> None:
            first = outcome.objects[0]
            if first.position is None or not INSTRUCTION.match(outcome.request.text):
                return
            point = PointStamped(header=header)
            point.point.x, point.point.y, point.point.z = first.position
            self.point_pub.publish(point)

        def _publish_diagnostics(self) -> None:
            s = self.service
            status = DiagnosticStatus(name="nextchat_grounding: inference", hardware_id=self.params.device)
            depth = s.queue_depth
            status.level = DiagnosticStatus.OK if depth < s._queue.maxsize else DiagnosticStatus.WARN
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

    return GroundingNode


def __getattr__(name):
    if name == "GroundingNode":
        return _node_class()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
