"""Write an evaluation bag: camera frames + camera_info, queries, and their truth.

Timeline (per item, ``query_period`` seconds each): the item's image is shown as
camera frames at ``camera_rate`` Hz; ``query_delay`` after its first frame the
Query goes out, naming that frame's stamp, together with a QueryTruth on its
own topic. Log times equal header stamps, so a replay at rate 1 reproduces the
timing a live camera and a planner asking twice a second would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..ros_images import mono8_mask, roi_to_xyxy
from ..scoring import Truth
from .io import BagError, BagWriter, msg_class, serialize

IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
QUERY_TOPIC = "/nextchat/structured_query"
TRUTH_TOPIC = "/nextchat/truth"
IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
QUERY_TYPE = "nextchat_ros/msg/Query"
STRING_TYPE = "std_msgs/msg/String"
TRUTH_TYPE = "nextchat_ros/msg/QueryTruth"
RESULT_TYPE = "nextchat_ros/msg/GroundingResult"


@dataclass
class RecordItem:
    """One query about one image. ``regions``: pixel xyxy boxes, [k] in the text."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    question: str
    regions: list = field(default_factory=list)
    truth: Truth | None = None
    camera: dict | None = None  # fx, fy, cx, cy


def _time(stamp_ns: int):
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return msg_class("builtin_interfaces/msg/Time")(sec=sec, nanosec=nanosec)


def _header(stamp_ns: int, frame_id: str):
    return msg_class("std_msgs/msg/Header")(stamp=_time(stamp_ns), frame_id=frame_id)


def _roi(box):
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    return msg_class("sensor_msgs/msg/RegionOfInterest")(
        x_offset=max(0, x1), y_offset=max(0, y1), height=max(0, y2 - y1), width=max(0, x2 - x1), do_rectify=False)


def image_message(array: np.ndarray, stamp_ns: int, frame_id: str, encoding: str):
    array = np.ascontiguousarray(array)
    return msg_class(IMAGE_TYPE)(
        header=_header(stamp_ns, frame_id), height=array.shape[0], width=array.shape[1], encoding=encoding,
        is_bigendian=0, step=int(array.strides[0]), data=array.reshape(-1).view(np.uint8))


def camera_info_message(height: int, width: int, camera: dict | None, stamp_ns: int, frame_id: str):
    camera = camera or {}
    fx = float(camera.get("fx", width))  # a nominal ~53 degree lens when the source has no intrinsics
    fy = float(camera.get("fy", fx))
    cx = float(camera.get("cx", (width - 1) / 2))
    cy = float(camera.get("cy", (height - 1) / 2))
    roi = msg_class("sensor_msgs/msg/RegionOfInterest")(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return msg_class(CAMERA_INFO_TYPE)(
        header=_header(stamp_ns, frame_id), height=height, width=width, distortion_model="plumb_bob",
        d=np.zeros(5), k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], float), r=np.eye(3).reshape(-1),
        p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], float), binning_x=0, binning_y=0, roi=roi)


def query_message(query_id: str, text: str, regions, image_stamp_ns: int):
    return msg_class(QUERY_TYPE)(id=query_id, text=text, regions=[_roi(b) for b in regions],
                                 image_stamp=_time(image_stamp_ns))


def truth_message(truth: Truth, query_id: str, stamp_ns: int, frame_id: str):
    masks = [image_message(m.astype(np.uint8) * 255, stamp_ns, frame_id, "mono8") for m in (truth.masks or [])]
    keys = list(truth.info)
    return msg_class(TRUTH_TYPE)(
        header=_header(stamp_ns, frame_id), query_id=query_id, task=truth.task, answer=truth.answer,
        boxes=[_roi(b) for b in truth.boxes], masks=masks, keys=keys, values=[truth.info[k] for k in keys])


def truth_from_message(msg) -> Truth:
    masks = [mono8_mask(m) for m in msg.masks] or None
    return Truth(msg.task, msg.answer, [roi_to_xyxy(r) for r in msg.boxes], masks,
                 dict(zip(msg.keys, msg.values, strict=False)))


def record(items: Iterable[RecordItem], out: str | Path, *, count: int | None = None, storage: str = "mcap",
           camera_rate: float = 5.0, query_period: float = 0.5, query_delay: float = 0.1,
           start_ns: int | None = None, frame_id: str = "camera", id_prefix: str = "q",
           progress: bool = True) -> dict:
    """Write ``items`` as a bag at ``out``; returns a summary (queries, frames, duration)."""
    if camera_rate <= 0 or query_period <= 0:
        raise BagError("camera_rate and query_period must be positive")
    if not 0 <= query_delay < query_period:
        raise BagError("query_delay must be at least 0 and less than query_period")
    frames_per_item = max(1, math.ceil(query_period * camera_rate - 1e-9))
    start = start_ns if start_ns is not None else (time.time_ns() // 1_000_000) * 1_000_000
    frames = queries = 0
    with BagWriter(out, storage) as bag:
        bag.add(IMAGE_TOPIC, IMAGE_TYPE)
        bag.add(CAMERA_INFO_TOPIC, CAMERA_INFO_TYPE)
        bag.add(QUERY_TOPIC, QUERY_TYPE)
        bag.add(TRUTH_TOPIC, TRUTH_TYPE)
        for index, item in enumerate(tqdm(items, total=count, desc="record", unit="query", disable=not progress)):
            t_item = start + round(index * query_period * 1e9)
            h, w = item.image.shape[:2]
            events = []
            for k in range(frames_per_item):
                t = t_item + round(k * 1e9 / camera_rate)
                events.append((t, IMAGE_TOPIC, serialize(image_message(item.image, t, frame_id, "rgb8"), IMAGE_TYPE)))
                events.append((t, CAMERA_INFO_TOPIC,
                               serialize(camera_info_message(h, w, item.camera, t, frame_id), CAMERA_INFO_TYPE)))
            frames += frames_per_item
            query_id = f"{id_prefix}{index:05d}"
            t_query = t_item + round(query_delay * 1e9)
            events.append((t_query, QUERY_TOPIC,
                           serialize(query_message(query_id, item.question, item.regions, t_item), QUERY_TYPE)))
            if item.truth is not None:
                events.append((t_query, TRUTH_TOPIC,
                               serialize(truth_message(item.truth, query_id, t_item, frame_id), TRUTH_TYPE)))
            queries += 1
            for t, topic, data in sorted(events, key=lambda e: e[0]):
                bag.write(topic, t, data)
    return {"bag": str(out), "storage": storage, "queries": queries, "frames": frames,
            "duration_s": queries * query_period, "camera_rate": camera_rate, "query_period": query_period}
