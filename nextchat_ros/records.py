"""The records carried end to end: a camera frame, and one grounded object.

numpy only, so the ROS conversions (ros_images, ros_messages), the service, the
predictor and scoring share them without pulling in each other or the model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroundedObject:
    """One object an answer mentions, from the predictor to the message and the scoreboard."""

    phrase: str
    # (4,) pixel xyxy in the original image: the tight box of the mask when there is a
    # non-empty one, else decoder_box.
    box: np.ndarray
    # The probability that the object named is there: the model's own yes/no answer to
    # "is there a {phrase} in the image?" on the frame (``queries.presence_question``);
    # while an answer streams, the trigger's probability until the answer is done.
    score: float
    # The box decoder's own box in pixels, and normalised to the centre-padded square
    # ([0, 1]): what the location token carried back into the LLM. None where the
    # object was read back from a message, which carries only ``box``.
    decoder_box: np.ndarray | None = None
    box_normalized: np.ndarray | None = None
    mask: np.ndarray | None = None  # (H, W) bool
    mask_score: float = 0.0  # SAM's predicted IoU
    position: tuple[float, float, float] | None = None  # camera frame, metres (needs depth)
    trigger_score: float = 0.0  # the probability the LLM gave its trigger token


_frame_keys = itertools.count(1)


@dataclass
class Frame:
    """A camera frame. ``image`` is RGB uint8, or None with ``error`` saying why the
    message could not be used (a query paired with it gets BAD_IMAGE)."""

    image: np.ndarray | None
    stamp_ns: int = 0
    frame_id: str = ""
    received: float | None = None  # the service's clock; set by add_frame when None
    error: str = ""
    depth: np.ndarray | None = None  # float32 metres, image-sized; NaN or 0 = no reading
    intrinsics: tuple[float, float, float, float] | None = None  # fx, fy, cx, cy
    key: int = field(default_factory=lambda: next(_frame_keys))


def xyxy_to_center_size(box) -> tuple[float, float, float, float]:
    """Pixel (x1, y1, x2, y2) -> (centre x, centre y, width, height), as the messages carry boxes."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def center_size_to_xyxy(cx: float, cy: float, width: float, height: float) -> tuple[float, float, float, float]:
    return cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2
