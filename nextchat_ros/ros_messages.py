"""Messages built from the service's outcomes, and read back: the one place where a
grounded object becomes a ROS message (the node) and a message becomes a grounded
object again (clients, bag evaluation, overlays).

Needs the generated message types but not rclpy, so it is tested without a graph.
"""

from __future__ import annotations

import numpy as np
from std_msgs.msg import Header

from .msg import GroundedObject as GroundedObjectMsg
from .msg import GroundingResult
from .records import GroundedObject, center_size_to_xyxy, xyxy_to_center_size
from .ros_images import fill_image_msg, mono8_mask

try:
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
    HAVE_VISION_MSGS = True
except ImportError:  # real ROS installs have vision_msgs; the PyPI wheels do not
    HAVE_VISION_MSGS = False


def frame_header(frame, now) -> Header:
    """The image's stamp and frame id; ``now`` (a builtin_interfaces/Time) when the
    outcome has no stamped frame (a refusal before any image)."""
    header = Header()
    if frame is not None and frame.stamp_ns:
        header.stamp.sec, header.stamp.nanosec = divmod(frame.stamp_ns, 1_000_000_000)
    else:
        header.stamp = now
    header.frame_id = frame.frame_id if frame is not None else ""
    return header


def object_msg(obj: GroundedObject, mask_header: Header | None) -> GroundedObjectMsg:
    """The message of one object; its mask (stamped with ``mask_header``) only when a
    header is given."""
    item = GroundedObjectMsg(phrase=obj.phrase, score=float(obj.score), mask_score=float(obj.mask_score))
    item.center_x, item.center_y, item.size_x, item.size_y = xyxy_to_center_size(obj.box)
    if mask_header is not None and obj.mask is not None:
        fill_image_msg(item.mask, obj.mask.astype(np.uint8) * 255, "mono8", mask_header)
    if obj.position is not None:
        item.has_position = True
        item.position.x, item.position.y, item.position.z = obj.position
    return item


def result_msg(outcome, header: Header, with_masks: bool = True) -> GroundingResult:
    """The GroundingResult of a service Outcome (every status)."""
    request = outcome.request
    result = GroundingResult(header=header, query_id=request.query_id, query=request.text, answer=outcome.text,
                             status=int(outcome.status), error=outcome.error)
    timings = outcome.timings_ms
    for name in ("queue_ms", "image_encode_ms", "llm_ms", "mask_ms", "total_ms"):
        setattr(result, name, float(timings.get(name, 0.0)))
    result.objects = [object_msg(o, header if with_masks else None) for o in outcome.objects]
    return result


def label_image(objects: list[GroundedObject], height: int, width: int) -> np.ndarray:
    """One mono8 image of every mask: object k has value k + 1 (the first object wins overlaps)."""
    labels = np.zeros((height, width), np.uint8)
    for k, obj in enumerate(objects):
        if obj.mask is not None:
            labels[obj.mask & (labels == 0)] = min(k + 1, 255)
    return labels


def detections_msg(objects: list[GroundedObject], header: Header):
    """vision_msgs/Detection2DArray: one detection per object, its phrase as class and its score."""
    detections = Detection2DArray(header=header)
    for obj in objects:
        detection = Detection2D(header=header)
        (detection.bbox.center.position.x, detection.bbox.center.position.y, detection.bbox.size_x,
         detection.bbox.size_y) = xyxy_to_center_size(obj.box)
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = obj.phrase
        hypothesis.hypothesis.score = float(obj.score)
        detection.results.append(hypothesis)
        detections.detections.append(detection)
    return detections


def result_objects(result: GroundingResult) -> list[GroundedObject]:
    """A result message's objects as records (overlays, scoring of the live node)."""
    objects = []
    for o in result.objects:
        position = (o.position.x, o.position.y, o.position.z) if o.has_position else None
        box = np.array(center_size_to_xyxy(o.center_x, o.center_y, o.size_x, o.size_y))
        objects.append(GroundedObject(phrase=o.phrase, box=box, score=o.score, mask=mono8_mask(o.mask),
                                      mask_score=o.mask_score, position=position))
    return objects
