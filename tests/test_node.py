"""The grounding node in its own process, over a real rclpy graph."""

import os
import subprocess
import threading
import time

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from sensor_msgs.msg import CameraInfo

from nextchat_ros import node_process
from nextchat_ros.msg import GroundingResult, Query
from nextchat_ros.node import SHUTDOWN_GRACE_S
from nextchat_ros.ros_client import GroundingClient, image_msg, result_objects
from nextchat_ros.synthetic.scenes import render_scene
from tests.conftest import ROOT

pytestmark = pytest.mark.ros
NS = f"/nextchat_test_{os.getpid()}"
OK = GroundingResult.STATUS_OK
LAUNCH_SIGTERM_AFTER_S = 5.0  # ros2 launch escalates to SIGTERM this long after SIGINT


def start_node(log_path, ns: str, *params: str, program=("-m", "nextchat_ros.node")) -> subprocess.Popen:
    """The node in its own process with the shipped model (its default), as a user gets it."""
    return node_process.start_node(ns, dict(p.split(":=", 1) for p in params), log_path, program, cwd=ROOT)


def stop_node(process: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str, float]:
    """SIGINT, then wait: (exit status, the node's output, seconds from SIGINT to exit).
    A node still running after ``timeout`` is killed and the test fails with its output."""
    end = node_process.stop_node(process, timeout)
    if end.killed:
        pytest.fail(f"the node was still running {timeout:.0f} s after SIGINT; its output:\n{end.log[-3000:]}")
    return end.returncode, end.log, end.seconds


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    process = start_node(tmp_path_factory.mktemp("node") / "node.log", NS,
                         "max_image_pixels:=100000", "max_image_age:=30.0", "queue_size:=16",
                         "subscribe_compressed:=true")
    client = GroundingClient(NS)
    try:
        client.wait_for_node()
        yield process, client
    finally:
        client.close()
        stop_node(process)


@pytest.fixture()
def client(node):
    return node[1]


def scene_frame(seed: int, stamp_ns: int):
    scene = render_scene(seed, height=240, width=320)
    return scene, image_msg(scene.image, stamp_ns)


def test_image_and_query_give_a_result_stamped_like_the_image(client):
    _scene, msg = scene_frame(1, 1_700_000_000_123_000_000)
    client.publish_frame(msg)
    result = client.ask_text("where is the white cube?")  # there, and the model says so
    assert result.status == OK, result.error
    assert result.header.stamp == msg.header.stamp and result.header.frame_id == "camera"
    assert len(result.objects) == 1 and "[0]" in result.answer
    obj = result.objects[0]
    assert obj.mask.width == 320 and obj.mask.height == 240 and obj.mask.encoding == "mono8"
    assert set(np.unique(np.frombuffer(bytes(obj.mask.data), np.uint8))) <= {0, 255}
    assert 0 <= obj.center_x <= 320 and obj.size_x >= 0
    assert result.total_ms > 0 and result.image_encode_ms > 0
    again = client.ask_text("where is the blue ball?")
    assert again.status == OK and again.image_encode_ms == 0  # the frame was encoded once


def test_the_service_gives_the_same_answer_as_the_topics(client):
    _scene, msg = scene_frame(2, 1_700_000_001_000_000_000)
    client.publish_frame(msg)
    by_topic = client.ask("topic-1", "where is the green bottle?")
    by_service = client.call("service-1", "where is the green bottle?", image=msg)
    assert by_topic.status == by_service.status == OK
    assert by_service.answer == by_topic.answer
    assert by_service.header.stamp == msg.header.stamp
    a, b = by_topic.objects[0], by_service.objects[0]
    assert (a.center_x, a.center_y, a.size_x, a.size_y) == pytest.approx((b.center_x, b.center_y, b.size_x, b.size_y),
                                                                         abs=1e-3)
    newest = client.call("service-2", "where is the green bottle?")  # no image: the newest camera frame
    assert newest.status == OK and newest.header.stamp == msg.header.stamp


def test_the_ask_action_streams_the_answer_before_its_one_result(client):
    _scene, msg = scene_frame(4, 1_700_000_001_500_000_000)
    by_service = client.call("service-describe", "describe the image.", image=msg)
    streamed = client.ask_streaming("ask-describe", "describe the image.", image=msg)
    result = streamed.result
    assert streamed.goal_status == GoalStatus.STATUS_SUCCEEDED and result.status == OK, result.error
    assert result.answer == by_service.answer and len(result.objects) == len(by_service.objects) >= 1
    assert result.header.stamp == msg.header.stamp and result.objects[0].mask.width == 320
    # Feedback came token by token: growing counts, objects as they are grounded, the
    # last one the whole answer (feedback carries no masks).
    tokens = [f.tokens for f in streamed.feedback]
    assert len(tokens) >= 4 and tokens == sorted(set(tokens))
    assert len(streamed.feedback[0].objects) == 0 and len(streamed.feedback[-1].objects) == len(result.objects)
    assert streamed.feedback[-1].answer == result.answer
    assert all(o.mask.width == 0 for f in streamed.feedback for o in f.objects)
    # One result per goal, and it is the one published on `result` too.
    published = client.wait_result(lambda r: r.query_id == "ask-describe")
    assert published.answer == result.answer
    time.sleep(0.5)
    assert not [r for r in client.results if r.query_id == "ask-describe"]
    client.wait_result(lambda r: r.query_id == "service-describe")  # later tests ask this text again


def test_cancelling_an_ask_goal_stops_it_at_the_next_token(client):
    _scene, msg = scene_frame(4, 1_700_000_001_600_000_000)
    whole = client.ask_streaming("ask-whole", "describe the image.", image=msg)
    cut = client.ask_streaming("ask-cut", "describe the image.", image=msg, cancel_after=1)
    assert cut.goal_status == GoalStatus.STATUS_CANCELED
    assert cut.result.status == GroundingResult.STATUS_CANCELLED and "cancelled by the client" in cut.result.error
    assert len(cut.feedback) < len(whole.feedback) and cut.result.llm_ms < whole.result.llm_ms
    assert cut.result.answer == cut.feedback[-1].answer
    refused = client.ask_streaming("ask-empty", "   ", image=msg)  # a refusal is the result, the goal aborted
    assert refused.goal_status == GoalStatus.STATUS_ABORTED
    assert refused.result.status == GroundingResult.STATUS_BAD_QUERY
    again = client.ask_streaming("ask-again", "describe the image.", image=msg)
    assert again.goal_status == GoalStatus.STATUS_SUCCEEDED and again.result.answer == whole.result.answer
    for query_id in ("ask-whole", "ask-cut", "ask-empty", "ask-again"):  # one result each on `result`
        client.wait_result(lambda r, query_id=query_id: r.query_id == query_id)


def test_a_region_query_over_ros_gets_a_caption(client):
    scene, msg = scene_frame(3, 1_700_000_002_000_000_000)
    client.publish_frame(msg)
    x1, y1, x2, y2 = (int(v) for v in scene.objects[0].box)
    result = client.ask("region-1", "describe [0].", regions=[(x1, y1, x2, y2)])
    assert result.status == OK, result.error
    assert isinstance(result.answer, str) and result.query == "describe [0]."


def test_depth_gives_3d_points(client):
    scene, msg = scene_frame(4, 1_700_000_003_000_000_000)
    info = CameraInfo()
    info.header = msg.header
    fx, fy, cx, cy = scene.camera["fx"], scene.camera["fy"], scene.camera["cx"], scene.camera["cy"]
    info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    depth = np.full((240, 320), 750, np.uint16)  # a plane 0.75 m away, in millimetres
    import time

    for _ in range(3):  # sensor-data QoS is best effort: send depth and intrinsics a few times
        client.info_pub.publish(info)
        client.depth_pub.publish(image_msg(depth, 1_700_000_003_000_000_000, "16UC1"))
        time.sleep(0.3)
    client.publish_frame(msg)
    result = client.ask_text("where is the yellow bottle?")
    assert result.status == OK, result.error
    masks = [np.frombuffer(bytes(o.mask.data), np.uint8).reshape(240, 320) > 0 for o in result.objects]
    assert any(m.any() for m in masks)
    # every object with a non-empty mask gets a point, and only those
    assert [o.has_position for o in result.objects] == [bool(m.any()) for m in masks]
    for obj, mask in zip(result.objects, masks):
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        truth = ((xs.mean() + 0.5 - cx) * 0.75 / fx, (ys.mean() + 0.5 - cy) * 0.75 / fy, 0.75)
        got = (obj.position.x, obj.position.y, obj.position.z)
        assert np.linalg.norm(np.subtract(got, truth)) < 0.02


BAD_IMAGES = {
    "unsupported encoding": lambda: _raw(8, 8, "yuv422", 16, b"\0" * 128),
    "step smaller than a row": lambda: _raw(8, 8, "rgb8", 10, b"\0" * 80),
    "truncated": lambda: _raw(16, 16, "rgb8", 48, b"\0" * 100),
    "empty": lambda: _raw(0, 0, "rgb8", 0, b""),
    "oversized": lambda: _raw(400, 400, "mono8", 400, b"\0" * (400 * 400)),  # > max_image_pixels
    "big-endian 16-bit": lambda: _raw(8, 8, "mono16", 16, b"\0" * 128, big=True),
    "float with NaN": lambda: _raw(8, 8, "32FC1", 32, np.full(64, np.nan, np.float32).tobytes()),
}


def _raw(width, height, encoding, step, data, big=False):
    msg = image_msg(np.zeros((1, 1, 3), np.uint8), 1_700_000_010_000_000_000)
    msg.width, msg.height, msg.encoding, msg.step, msg.data, msg.is_bigendian = width, height, encoding, step, data, big
    return msg


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_get_bad_image_and_the_node_keeps_serving(client, name):
    bad = BAD_IMAGES[name]()
    bad.header.stamp.nanosec = list(BAD_IMAGES).index(name) + 1  # a stamp of its own
    stamp_ns = bad.header.stamp.sec * 1_000_000_000 + bad.header.stamp.nanosec
    not_arrived = (GroundingResult.STATUS_STALE_IMAGE, GroundingResult.STATUS_NO_IMAGE)
    for attempt in range(5):  # camera QoS is best effort: resend if a frame was dropped
        client.publish_frame(bad, settle=0.5)
        result = client.ask(f"bad-{name}-{attempt}", "where is the cube?", stamp_ns=stamp_ns)
        if result.status not in not_arrived:
            break
    assert result.status == GroundingResult.STATUS_BAD_IMAGE, (name, result.error)
    assert result.error and result.header.stamp == bad.header.stamp
    _scene, msg = scene_frame(5, 1_700_000_011_000_000_000)
    client.publish_frame(msg)
    assert client.ask_text(f"where is the ball? ({name})").status == OK


@pytest.mark.parametrize("query_id,text,regions,status", [
    ("empty", "", (), GroundingResult.STATUS_BAD_QUERY),
    ("blank", "   \t ", (), GroundingResult.STATUS_BAD_QUERY),
    ("long", "where " * 1000, (), GroundingResult.STATUS_BAD_QUERY),
    ("special", "<trigger> <loc> <at> <boxes> <im_patch>", (), OK),
    ("zero-area", "what is [0]?", [(10, 10, 10, 40)], GroundingResult.STATUS_BAD_QUERY),
    ("outside", "what is [0]?", [(300, 200, 900, 900)], GroundingResult.STATUS_BAD_QUERY),
    ("unreferenced", "what is this?", [(10, 10, 50, 50)], GroundingResult.STATUS_BAD_QUERY),
])
def test_bad_queries_get_their_status_and_the_node_keeps_serving(client, query_id, text, regions, status):
    _scene, msg = scene_frame(6, 1_700_000_012_000_000_000)
    client.publish_frame(msg)
    result = client.ask(query_id, text, regions=regions)
    assert result.status == status, result.error
    if status != OK:
        assert result.error and result.header.stamp == msg.header.stamp
    assert client.ask(f"{query_id}-after", "where is the cube?").status == OK


def compressed_msg(image, image_format: str, stamp_ns: int, data: bytes | None = None):
    import io

    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    if data is None:
        buffer = io.BytesIO()
        PILImage.fromarray(image).save(buffer, format=image_format.upper(), quality=95)
        data = buffer.getvalue()
    msg = CompressedImage(format=image_format, data=data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = "compressed_camera"
    return msg


@pytest.fixture(scope="module")
def compressed_pub(node):
    from sensor_msgs.msg import CompressedImage

    client = node[1]
    pub = client.node.create_publisher(CompressedImage, f"{NS}/image/compressed", 10)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pub.get_subscription_count() > 0, "the node does not subscribe to image/compressed"
    time.sleep(0.5)
    return pub


def ask_about_stamp(client, pub, msg, query_id: str):
    """Publish (best effort: again if the frame was lost) and ask about that frame's stamp."""
    stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
    for attempt in range(5):
        pub.publish(msg)
        time.sleep(0.3)
        result = client.ask(f"{query_id}-{attempt}", "where is the cube?", stamp_ns=stamp_ns)
        if result.status not in (GroundingResult.STATUS_STALE_IMAGE, GroundingResult.STATUS_NO_IMAGE):
            return result
    return result


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_compressed_images_are_answered_like_raw_ones(client, compressed_pub, image_format):
    scene = render_scene(9, height=240, width=320)
    stamp_ns = 1_700_000_020_000_000_000 + (image_format == "png")
    msg = compressed_msg(scene.image, image_format, stamp_ns)
    result = ask_about_stamp(client, compressed_pub, msg, f"compressed-{image_format}")
    assert result.status == OK, result.error
    assert result.header.stamp == msg.header.stamp and result.header.frame_id == "compressed_camera"
    assert len(result.objects) == 1 and result.objects[0].mask.width == 320


@pytest.mark.parametrize("name,image_format,data,message", [
    ("garbage", "jpeg", b"this is not a jpeg", "cannot be decoded"),
    ("truncated", "png", None, "cannot be decoded"),
    ("empty", "jpeg", b"", "cannot be decoded"),
    ("oversized", "png", None, "the limit is 0.1 MP"),  # > max_image_pixels (100000) once decoded
])
def test_bad_compressed_images_get_bad_image_and_the_node_keeps_serving(client, compressed_pub, name, image_format,
                                                                         data, message):
    import io

    from PIL import Image as PILImage

    size = (400, 400) if name == "oversized" else (64, 48)
    if data is None:
        buffer = io.BytesIO()
        PILImage.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
        data = buffer.getvalue()[: 60 if name == "truncated" else None]
    stamp_ns = 1_700_000_030_000_000_000 + ["garbage", "truncated", "empty", "oversized"].index(name)
    result = ask_about_stamp(client, compressed_pub, compressed_msg(None, image_format, stamp_ns, data), f"bad-{name}")
    assert result.status == GroundingResult.STATUS_BAD_IMAGE, (name, result.status, result.error)
    assert message in result.error
    _scene, msg = scene_frame(5, 1_700_000_031_000_000_000)
    client.publish_frame(msg)
    assert client.ask_text(f"where is the ball? (after {name})").status == OK


def test_detections_are_vision_msgs_with_each_objects_box_score_and_phrase(client):
    vision_msgs = pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not installed "
                                                                "(../shared/ros2/install.sh VENV)")
    arrays = []
    sub = client.node.create_subscription(vision_msgs.Detection2DArray, f"{NS}/detections", arrays.append, 10)
    try:
        deadline = time.monotonic() + 30
        while sub.get_publisher_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        _scene, msg = scene_frame(11, 1_700_000_040_000_000_000)
        client.publish_frame(msg)
        result = client.ask_text("describe the image.")
        assert result.status == OK and result.objects, result.error
        deadline = time.monotonic() + 10
        while not arrays and time.monotonic() < deadline:
            time.sleep(0.1)
        assert arrays, "no Detection2DArray arrived"
        detections = arrays[-1]
        assert detections.header.stamp == msg.header.stamp and detections.header.frame_id == "camera"
        assert len(detections.detections) == len(result.objects)
        for detection, obj in zip(detections.detections, result.objects):
            assert detection.header.stamp == msg.header.stamp
            assert (detection.bbox.center.position.x, detection.bbox.center.position.y, detection.bbox.size_x,
                    detection.bbox.size_y) == pytest.approx((obj.center_x, obj.center_y, obj.size_x, obj.size_y))
            (hypothesis,) = detection.results
            assert hypothesis.hypothesis.class_id == obj.phrase
            assert hypothesis.hypothesis.score == pytest.approx(obj.score)
    finally:
        client.node.destroy_subscription(sub)


def test_a_query_for_an_unknown_frame_stamp_is_refused(client):
    _scene, msg = scene_frame(7, 1_700_000_013_000_000_000)
    client.publish_frame(msg)
    result = client.ask("old-stamp", "where is the cube?", stamp_ns=1_600_000_000_000_000_000)
    assert result.status == GroundingResult.STATUS_STALE_IMAGE and "no frame with stamp" in result.error
    named = client.ask("named-stamp", "where is the cube?", stamp_ns=1_700_000_013_000_000_000)
    assert named.status == OK and named.header.stamp == msg.header.stamp


def test_diagnostics_report_the_queue_and_the_camera_rate(client):
    from diagnostic_msgs.msg import DiagnosticArray

    seen = []  # each of the node's statuses, as a key -> value dict

    def on_diagnostics(msg) -> None:
        seen.extend({v.key: v.value for v in s.values} for s in msg.status if s.name.startswith("nextchat_grounding"))

    sub = client.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    try:
        _scene, msg = scene_frame(8, 1_700_000_020_000_000_000)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not any(float(v.get("camera_frames_per_second", 0)) > 0 for v in seen):
            client.image_pub.publish(msg)
            time.sleep(0.1)
    finally:
        client.node.destroy_subscription(sub)
    assert seen, "no diagnostics from the node"
    assert {"queue_depth", "camera_frames_per_second", "ok", "refused"} <= seen[-1].keys()
    assert any(float(v["camera_frames_per_second"]) > 0 for v in seen)


def test_sigint_answers_the_queries_in_flight_and_shuts_down_cleanly(node):
    """Every query sent before Ctrl-C gets its one result: answered if the node was at
    it, refused (shutting down) if it was still queued. rclpy's own SIGINT handler shut
    the ROS context down at once, and the results in flight were lost. Then exit status
    0, no traceback, and gone before ros2 launch would escalate to SIGTERM (the
    interpreter's own teardown alone took 1-5 s before main() skipped it)."""
    process, client = node
    client.publish_frame(image_msg(render_scene(7, height=240, width=320).image, time.time_ns()))
    ids = [f"last-{k}" for k in range(6)]
    for qid in ids:
        client.query_pub.publish(Query(id=qid, text="describe the image."))
    time.sleep(0.3)  # the node is answering the first ones
    status, out, seconds = stop_node(process)
    try:
        results = [client.wait_result(lambda r, q=qid: r.query_id == q, timeout=10.0) for qid in ids]
    finally:
        client.close()
    for result in results:
        assert result.status == OK or (result.status == GroundingResult.STATUS_INTERNAL_ERROR
                                       and "shutting down" in result.error), (result.status, result.error)
    assert any(r.status == OK for r in results), [r.error for r in results]
    assert status == 0, out[-3000:]
    assert "Traceback" not in out and "Timeout" not in out, out[-3000:]
    assert seconds < LAUNCH_SIGTERM_AFTER_S, f"{seconds:.1f} s from SIGINT to exit"


def test_a_teardown_that_hangs_is_cut_short_with_the_stacks(tmp_path):
    """Fast DDS can deadlock while destroying an entity (it did here, in destroy_node).
    Injected here as a destroy_node that never returns: the node must still exit, with
    status 1 and every thread's stack on stderr, SHUTDOWN_GRACE_S after teardown began."""
    ns = f"/nextchat_hang_{os.getpid()}"
    script = ("import sys, time, rclpy.node\n"
              "def destroy_node(self): time.sleep(3600)\n"
              "rclpy.node.Node.destroy_node = destroy_node\n"
              "from nextchat_ros.node import main\n"
              "main(sys.argv)\n")
    process = start_node(tmp_path / "node.log", ns, program=("-c", script))
    client = GroundingClient(ns)
    try:
        client.wait_for_node()
    finally:
        client.close()
        status, out, seconds = stop_node(process)
    assert status == 1, out[-3000:]
    assert "Timeout" in out and "destroy_node" in out, out[-3000:]
    assert SHUTDOWN_GRACE_S <= seconds < SHUTDOWN_GRACE_S + 10, f"{seconds:.1f} s from SIGINT to exit"


def test_shipped_model_grounds_held_out_scenes_over_ros(tmp_path):
    """The node's default model, over ROS, on the first 10 held-out referring expressions
    (the first of each scene): a box at IoU >= 0.5 on at least 8 (a refused one counts as
    a miss)."""
    from nextchat_ros.scoring import box_iou
    from nextchat_ros.synthetic.samples import SyntheticTabletop

    ns = f"/nextchat_shipped_{os.getpid()}"
    process = start_node(tmp_path / "node.log", ns, "max_image_age:=30.0")
    client = GroundingClient(ns)
    ious = []
    try:
        client.wait_for_node()
        stream = SyntheticTabletop("heldout", {"rec": 1.0})
        for i in range(10):
            scene, sample = stream.item(i)
            stamp = 1_800_000_000_000_000_000 + i
            client.publish_frame(image_msg(scene.image, stamp))
            result = client.ask(f"shipped-{i}", sample.question, stamp_ns=stamp)
            assert result.status == OK and result.header.stamp.nanosec == i
            objects = result_objects(result)
            ious.append(round(box_iou(objects[0].box, sample.answer_boxes[0]), 3) if objects else 0.0)
    finally:
        client.close()
        stop_node(process)
    hits = sum(iou >= 0.5 for iou in ious)
    assert hits >= 8, f"{hits} of 10 held-out scenes grounded at IoU >= 0.5: IoUs {ious}"


def test_a_30hz_camera_does_not_starve_queries(tmp_path):
    """A 640x480 camera at 30 Hz with a steady stream of queries, against the node with
    its default parameters. The query rate is set from this machine's own speed (one query
    every three unloaded query times, at most 5 Hz), so the node is never asked for more
    than it can do; what must hold is that the camera does not starve the queries. With
    rclpy's MultiThreadedExecutor, which spins while frames queue for its pool, this test
    failed at 5 Hz on a machine answering in ~50 ms (STALE_IMAGE and OVERLOADED results,
    p95 of seconds), and a 60 s soak had a third of its queries answered."""
    ns = f"/nextchat_load_{os.getpid()}"
    process = start_node(tmp_path / "node.log", ns)
    client = GroundingClient(ns)
    stop = threading.Event()
    frames = [render_scene(s, height=480, width=640).image for s in range(3)]

    sent, received = {}, {}
    client.node.create_subscription(GroundingResult, f"{ns}/result",
                                    lambda r: received.setdefault(r.query_id, time.monotonic()), 100)
    try:
        client.wait_for_node()
        # Unloaded query time on this machine: queries one at a time, each on a new frame
        # (as under a camera, where each query's newest frame has not been encoded yet).
        unloaded = []
        for k in range(5):
            client.publish_frame(image_msg(frames[k % len(frames)], time.time_ns()), settle=0.2)
            t0 = time.monotonic()
            assert client.ask(f"calibrate-{k}", "where is the red cube?").status == OK
            unloaded.append(time.monotonic() - t0)
        unloaded_s = sorted(unloaded)[2]
        interval_s = max(0.2, 3 * unloaded_s)
        client.start_camera(frames, 30, stop)
        time.sleep(1.0)
        for k in range(30):
            qid = f"load-{k}"
            sent[qid] = time.monotonic()
            client.query_pub.publish(Query(id=qid, text="where is the red cube?"))
            time.sleep(interval_s)
        results = {qid: client.wait_result(lambda r, q=qid: r.query_id == q, timeout=60.0) for qid in sent}
    finally:
        stop.set()
        client.close()
        stop_node(process)
    context = f"unloaded query {1e3 * unloaded_s:.0f} ms, one query every {1e3 * interval_s:.0f} ms"
    statuses = sorted({r.status for r in results.values()})
    assert statuses == [OK], (context, [(q, r.status, r.error) for q, r in results.items() if r.status != OK][:5])
    latency_ms = sorted(1e3 * (received[q] - t) for q, t in sent.items())  # publish -> receipt
    bound_ms = max(2000, 1e3 * 10 * unloaded_s)
    assert latency_ms[int(0.95 * len(latency_ms))] < bound_ms, (context, [round(v) for v in latency_ms])
