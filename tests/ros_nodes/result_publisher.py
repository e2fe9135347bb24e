"""A separate OS process that publishes a GroundingResult with two masked objects
on /nextchat_test/result every 0.2 s until it is interrupted."""

import sys

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException

from nextchat_ros.msg import GroundedObject, GroundingResult


def make_result() -> GroundingResult:
    msg = GroundingResult()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1764000000, 123456789
    msg.header.frame_id = "camera_color_optical_frame"
    msg.query_id, msg.query = "q-42", "where are the red mug and the box?"
    msg.answer = "the red mug [0] is left of the box [1]."
    msg.status, msg.error = GroundingResult.STATUS_OK, ""
    msg.queue_ms, msg.image_encode_ms, msg.llm_ms, msg.mask_ms, msg.total_ms = 1.5, 80.25, 20.0, 4.0, 106.0
    for k, (phrase, box) in enumerate([("the red mug", (30, 40, 70, 90)), ("the box", (100, 20, 150, 60))]):
        obj = GroundedObject()
        # float32 fields get values float32 holds exactly, so the round trip compares equal
        obj.phrase, obj.score, obj.mask_score = phrase, 0.875 - 0.125 * k, 0.8125
        x1, y1, x2, y2 = box
        obj.center_x, obj.center_y = (x1 + x2) / 2, (y1 + y2) / 2
        obj.size_x, obj.size_y = float(x2 - x1), float(y2 - y1)
        mask = np.zeros((120, 160), np.uint8)
        mask[y1:y2, x1:x2] = 255
        obj.mask.header = msg.header
        obj.mask.height, obj.mask.width, obj.mask.encoding, obj.mask.step = 120, 160, "mono8", 160
        obj.mask.data = mask.tobytes()
        obj.has_position = k == 0
        obj.position.x, obj.position.y, obj.position.z = 0.1, -0.05, 0.62
        msg.objects.append(obj)
    return msg


def main() -> int:
    rclpy.init()
    node = rclpy.create_node("nextchat_test_result_publisher")
    pub = node.create_publisher(GroundingResult, "/nextchat_test/result", 10)
    msg = make_result()
    node.create_timer(0.2, lambda: pub.publish(msg))
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
