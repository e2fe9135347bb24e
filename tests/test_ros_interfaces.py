"""The generated interfaces import from the environment and cross OS processes."""

import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.ros


def test_generated_types_import_with_their_fields():
    from nextchat_ros.msg import GroundedObject, GroundingResult, Query
    from nextchat_ros.srv import Ground

    result = GroundingResult()
    assert {"header", "query_id", "query", "answer", "objects", "status", "error", "total_ms"} <= set(
        result.get_fields_and_field_types())
    assert GroundingResult.STATUS_OK == 0 and GroundingResult.STATUS_OVERLOADED != GroundingResult.STATUS_OK
    from nextchat_ros.service import Status

    statuses = {k[len("STATUS_"):]: v for k, v in vars(GroundingResult).items() if k.startswith("STATUS_")}
    assert statuses == {s.name: int(s) for s in Status}  # the service's statuses are the message's
    assert GroundedObject().get_fields_and_field_types()["mask"] == "sensor_msgs/Image"
    assert Query().get_fields_and_field_types()["regions"] == "sequence<sensor_msgs/RegionOfInterest>"
    request_fields = Ground.Request().get_fields_and_field_types()
    assert request_fields == {"query": "nextchat_ros/Query", "image": "sensor_msgs/Image"}
    assert Ground.Response().get_fields_and_field_types() == {"result": "nextchat_ros/GroundingResult"}


def test_grounding_result_round_trips_between_two_processes():
    import rclpy

    from nextchat_ros.msg import GroundingResult
    from tests.ros_nodes.result_publisher import make_result

    publisher = subprocess.Popen([PYTHON, "-m", "tests.ros_nodes.result_publisher"], cwd=ROOT)
    context = rclpy.Context()
    rclpy.init(context=context)
    received = []
    try:
        node = rclpy.create_node("nextchat_test_result_listener", context=context)
        node.create_subscription(GroundingResult, "/nextchat_test/result", received.append, 10)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.2)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        publisher.send_signal(signal.SIGINT)
        assert publisher.wait(timeout=20) == 0
    assert received, "no GroundingResult arrived from the publisher process"
    got, sent = received[0], make_result()
    assert got == sent  # every field, including both masks' bytes
    masks = [np.frombuffer(bytes(o.mask.data), np.uint8).reshape(o.mask.height, o.mask.width) for o in got.objects]
    assert [int((m == 255).sum()) for m in masks] == [40 * 50, 50 * 40]
    assert got.objects[1].phrase == "the box" and got.header.stamp.nanosec == 123456789
