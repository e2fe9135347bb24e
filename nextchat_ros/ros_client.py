"""A ROS client of the grounding node: publishes camera frames and queries,
collects results, calls the service and the Ask action. Spins in a background thread, which
``close()`` stops and joins before it destroys anything. Used by `nextchat demo`,
the rosbag tools and the tests. Every wait is bounded and ends in TimeoutError."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import String

from .action import Ask
from .msg import GroundingResult, Query
from .ros_images import fill_image_msg
from .ros_messages import result_objects
from .srv import Ground

# How long close() waits for the spin thread: one spin_once is SPIN_PERIOD_S plus a
# callback, and the client's callbacks only append to lists.
SPIN_PERIOD_S = 0.05
CLOSE_TIMEOUT_S = 10.0


class Spinner:
    """Spins an executor on a thread of its own until :meth:`stop`, which ends the loop
    and joins the thread (bounded) before the caller destroys anything.

    spin_once with a short timeout instead of spin(): the loop checks its stop flag
    between calls. Destroying a node while another thread was inside spin() left that
    thread busy in rclpy's wait set, holding the GIL, and hung a test run in
    Popen.wait (no Python-level timeout can fire while another thread holds the GIL)."""

    def __init__(self, executor, context, name: str):
        self.executor, self.context = executor, context
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=SPIN_PERIOD_S)

    def stop(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the spin thread {self.thread.name} did not stop within {timeout:.0f} s")
        self.executor.shutdown(timeout_sec=timeout)


@dataclass
class StreamedAnswer:
    """What one Ask goal gave: its feedback messages in order, the result, and the
    goal's final status (action_msgs/GoalStatus: SUCCEEDED, CANCELED or ABORTED)."""

    feedback: list = field(default_factory=list)
    result: GroundingResult | None = None
    goal_status: int = GoalStatus.STATUS_UNKNOWN


def _wait_future(future, deadline: float, what: str):
    while not future.done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not arrive in time")
        time.sleep(0.01)
    return future.result()


def image_msg(array: np.ndarray, stamp_ns: int, encoding: str = "rgb8", frame_id: str = "camera") -> Image:
    msg = fill_image_msg(Image(), array, encoding)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


class GroundingClient:
    def __init__(self, namespace: str):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("nextchat_test_client", namespace=namespace, context=self.context)
        ns = namespace
        self.image_pub = self.node.create_publisher(Image, f"{ns}/image", 10)
        self.depth_pub = self.node.create_publisher(Image, f"{ns}/depth", 10)
        self.info_pub = self.node.create_publisher(CameraInfo, f"{ns}/camera_info", 10)
        self.text_pub = self.node.create_publisher(String, f"{ns}/query", 100)
        self.query_pub = self.node.create_publisher(Query, f"{ns}/structured_query", 100)
        self.results: list[GroundingResult] = []
        self.answers: list[str] = []
        self._cond = threading.Condition()
        self.node.create_subscription(GroundingResult, f"{ns}/result", self._on_result, 1000)
        self.node.create_subscription(String, f"{ns}/answer", lambda m: self.answers.append(m.data), 50)
        self.client = self.node.create_client(Ground, f"{ns}/ground")
        self.ask_client = ActionClient(self.node, Ask, f"{ns}/ask")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.spinner = Spinner(self.executor, self.context, "nextchat-client-spin")
        self.closed = False

    def _on_result(self, msg) -> None:
        with self._cond:
            self.results.append(msg)
            self._cond.notify_all()

    def start_camera(self, frames: list[np.ndarray], hz: float, stop: threading.Event) -> threading.Thread:
        """Publish ``frames`` on the image topic at ``hz`` from a background thread,
        each for one second in turn, stamped when sent, until ``stop`` is set."""
        def run() -> None:
            k, t_next = 0, time.perf_counter()
            while not stop.is_set():
                self.image_pub.publish(image_msg(frames[int(k / hz) % len(frames)], time.time_ns()))
                k += 1
                t_next += 1.0 / hz
                time.sleep(max(0.0, t_next - time.perf_counter()))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def wait_for_node(self, timeout: float = 90.0) -> None:
        if not self.client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"the node's ground service did not appear within {timeout:.0f} s")
        deadline = time.monotonic() + timeout
        while self.image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.image_pub.get_subscription_count() == 0:
            raise TimeoutError(f"the node did not subscribe to the image topic within {timeout:.0f} s")
        time.sleep(1.0)  # matched both ways before the first (large) frame goes out

    def publish_frame(self, msg: Image, settle: float = 0.3) -> None:
        self.image_pub.publish(msg)
        time.sleep(settle)  # let the frame land before a query that should pair with it

    def wait_result(self, predicate, timeout: float = 60.0) -> GroundingResult:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.results:
                    if predicate(r):
                        self.results.remove(r)
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching result within {timeout} s; have "
                                       f"{[r.query for r in self.results]}")
                self._cond.wait(left)

    def ask_text(self, text: str, timeout: float = 60.0) -> GroundingResult:
        self.text_pub.publish(String(data=text))
        return self.wait_result(lambda r: r.query == text, timeout)

    def ask(self, query_id: str, text: str, regions=(), stamp_ns: int = 0, timeout: float = 60.0) -> GroundingResult:
        q = Query(id=query_id, text=text)
        for x1, y1, x2, y2 in regions:
            q.regions.append(RegionOfInterest(x_offset=x1, y_offset=y1, width=x2 - x1, height=y2 - y1))
        q.image_stamp.sec, q.image_stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        self.query_pub.publish(q)
        return self.wait_result(lambda r: r.query_id == query_id, timeout)

    def call(self, query_id: str, text: str, image: Image | None = None, timeout: float = 60.0) -> GroundingResult:
        request = Ground.Request(query=Query(id=query_id, text=text))
        if image is not None:
            request.image = image
        future = self.client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                self.client.remove_pending_request(future)
                raise TimeoutError(f"the ground service did not answer within {timeout:.0f} s")
            time.sleep(0.05)
        return future.result().result

    def ask_streaming(self, query_id: str, text: str, image: Image | None = None, cancel_after: int | None = None,
                      timeout: float = 60.0) -> StreamedAnswer:
        """Send an Ask goal and collect its feedback and result. ``cancel_after``: request
        cancellation once that many feedback messages have arrived."""
        if not self.ask_client.wait_for_server(timeout_sec=timeout):
            raise TimeoutError(f"the node's ask action did not appear within {timeout:.0f} s")
        deadline = time.monotonic() + timeout
        streamed = StreamedAnswer()
        want_cancel = threading.Event()

        def on_feedback(message) -> None:  # on the spin thread
            streamed.feedback.append(message.feedback)
            if cancel_after is not None and len(streamed.feedback) >= cancel_after:
                want_cancel.set()

        goal = Ask.Goal(query=Query(id=query_id, text=text))
        if image is not None:
            goal.image = image
        sent = self.ask_client.send_goal_async(goal, feedback_callback=on_feedback)
        goal_handle = _wait_future(sent, deadline, f"the ask action's goal response for {query_id!r}")
        if not goal_handle.accepted:
            raise RuntimeError(f"the ask action rejected the goal {query_id!r}")
        result = goal_handle.get_result_async()
        cancel_sent = False
        while not result.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ask action's result for {query_id!r} did not arrive within {timeout:.0f} s")
            # Cancelled from here, not from the feedback callback: feedback can arrive
            # before the goal response has made the goal handle.
            if want_cancel.is_set() and not cancel_sent:
                goal_handle.cancel_goal_async()
                cancel_sent = True
            time.sleep(0.005)
        response = result.result()
        streamed.result, streamed.goal_status = response.result.result, response.status
        return streamed

    def close(self) -> None:
        """Stop and join the spin thread, then destroy the node and the context (bounded)."""
        if self.closed:
            return
        self.closed = True
        self.spinner.stop()
        self.ask_client.destroy()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


__all__ = ["GroundingClient", "Spinner", "StreamedAnswer", "image_msg", "result_objects"]
