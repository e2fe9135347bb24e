"""sensor_msgs/Image <-> numpy, with a clear refusal for every malformed message,
and the small conversions of other message fields (stamps, regions, masks).

Works on the message's fields only (no cv_bridge, which is not available from
PyPI), so it is tested without a ROS graph, and serves rclpy messages and the
rosbags-deserialized messages of the bag tools alike.
"""

from __future__ import annotations

import io

import numpy as np

from .errors import ImageError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .records import Frame

# encoding -> (channels, numpy dtype, channel order to RGB)
COLOR_ENCODINGS = {
    "rgb8": (3, np.uint8, (0, 1, 2)),
    "bgr8": (3, np.uint8, (2, 1, 0)),
    "rgba8": (4, np.uint8, (0, 1, 2)),
    "bgra8": (4, np.uint8, (2, 1, 0)),
    "mono8": (1, np.uint8, (0, 0, 0)),
    "8uc1": (1, np.uint8, (0, 0, 0)),
    "8uc3": (3, np.uint8, (2, 1, 0)),  # OpenCV's default channel order is BGR
}
DEPTH_ENCODINGS = {"16uc1": np.uint16, "mono16": np.uint16, "32fc1": np.float32}


def _check_layout(msg, channels: int, itemsize: int, max_pixels: int, what: str) -> None:
    h, w = int(msg.height), int(msg.width)
    if h == 0 or w == 0:
        raise ImageError(f"the {what} is {w}x{h} pixels: it is empty")
    if h * w > max_pixels:
        raise ImageError(f"the {what} is {w}x{h} = {h * w / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.1f} MP "
                         "(max_image_pixels)")
    row = w * channels * itemsize
    if msg.step < row:
        raise ImageError(
            f"the {what}'s step {msg.step} is smaller than a row of {w} {msg.encoding} pixels ({row} bytes)")
    need = msg.step * (h - 1) + row
    if len(msg.data) < need:
        raise ImageError(f"the {what} is truncated: {len(msg.data)} bytes of data, {w}x{h} {msg.encoding} "
                         f"with step {msg.step} needs {need}")


def _rows(msg, channels: int, dtype) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(buf, shape=(msg.height, msg.width * channels * itemsize),
                                           strides=(msg.step, 1))
    # The message says its byte order; read it as that, return native values.
    wire = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<") if itemsize > 1 else np.dtype(dtype)
    out = np.ascontiguousarray(rows).view(wire).astype(dtype)
    return out.reshape(msg.height, msg.width, channels)


def image_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A camera image message -> (H, W, 3) uint8 RGB."""
    encoding = (msg.encoding or "").lower()
    if encoding not in COLOR_ENCODINGS:
        if encoding in DEPTH_ENCODINGS or encoding.startswith(("16", "32", "64")):
            raise ImageError(f"the camera image has encoding '{msg.encoding}'; the model takes 8-bit colour or "
                             f"mono images: {sorted(COLOR_ENCODINGS)}")
        raise ImageError(f"unsupported image encoding '{msg.encoding}'; supported: {sorted(COLOR_ENCODINGS)}")
    channels, dtype, order = COLOR_ENCODINGS[encoding]
    _check_layout(msg, channels, 1, max_pixels, "image")
    pixels = _rows(msg, channels, dtype)
    return np.ascontiguousarray(pixels[..., list(order)])


def image_frame(msg, convert=image_msg_to_rgb, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """A camera image message -> the service's Frame, stamped like the message; a
    malformed one -> a Frame carrying the refusal (a query about it gets BAD_IMAGE).
    ``convert``: image_msg_to_rgb or compressed_msg_to_rgb."""
    stamp = stamp_to_ns(msg.header.stamp)
    try:
        return Frame(convert(msg, max_pixels), stamp, msg.header.frame_id)
    except ImageError as exc:
        return Frame(None, stamp, msg.header.frame_id, error=str(exc))


def compressed_msg_to_rgb(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A sensor_msgs/CompressedImage (jpeg / png) -> (H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(msg.data))) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"the compressed image is {img.width}x{img.height}; the limit is "
                                 f"{max_pixels / 1e6:.1f} MP (max_image_pixels)")
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"the compressed image ({msg.format or 'unknown format'}) cannot be decoded: {exc}") from None


def depth_msg_to_metres(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A depth image (16UC1 millimetres or 32FC1 metres) -> (H, W) float32 metres, NaN = no reading."""
    encoding = (msg.encoding or "").lower()
    if encoding not in DEPTH_ENCODINGS:
        raise ImageError(f"unsupported depth encoding '{msg.encoding}'; use 16UC1 (mm) or 32FC1 (m)")
    dtype = DEPTH_ENCODINGS[encoding]
    _check_layout(msg, 1, np.dtype(dtype).itemsize, max_pixels, "depth image")
    depth = _rows(msg, 1, dtype)[..., 0]
    if dtype == np.uint16:
        metres = depth.astype(np.float32) / 1000.0
        metres[depth == 0] = np.nan
        return metres
    metres = depth.astype(np.float32)
    metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
    return metres


def fill_image_msg(msg, array: np.ndarray, encoding: str, header=None):
    """Fill a sensor_msgs/Image from a uint8 (H, W) or (H, W, C) array."""
    array = np.ascontiguousarray(array)
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.strides[0])
    msg.data = array.tobytes()
    return msg


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def roi_to_xyxy(roi) -> list[int]:
    """sensor_msgs/RegionOfInterest -> pixel [x1, y1, x2, y2]."""
    return [roi.x_offset, roi.y_offset, roi.x_offset + roi.width, roi.y_offset + roi.height]


def mono8_mask(msg) -> np.ndarray | None:
    """A mono8 mask image (255 inside) -> (H, W) bool, or None when it is empty."""
    if not (msg.width and msg.height):
        return None
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, :msg.width] > 0
