"""Checks on images and regions given to the predictor, with readable refusals."""

from __future__ import annotations

import math

import numpy as np

from .errors import ImageError, QueryError

MIN_IMAGE_SIDE = 8
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def validate_image(image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Return ``image`` as a contiguous uint8 RGB array (H, W, 3), or raise ImageError."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"the image must be a numpy array (H, W, 3) of uint8 RGB, not {type(image).__name__}")
    if image.size == 0:
        raise ImageError(f"the image is empty (shape {image.shape})")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ImageError(f"the image is grayscale (shape {image.shape}); convert it to RGB (H, W, 3)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"the image must have shape (H, W, 3), got {image.shape}")
    if image.shape[2] == 4:
        raise ImageError(f"the image has 4 channels (RGBA, shape {image.shape}); drop the alpha channel first")
    if image.dtype != np.uint8:
        if image.dtype in (np.uint16, np.int16):
            raise ImageError("the image is 16-bit; scale it to 8-bit RGB (uint8) first")
        raise ImageError(f"the image must be uint8 RGB, got dtype {image.dtype}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"the image is {w}x{h} pixels; each side must be at least {MIN_IMAGE_SIDE}")
    if h * w > max_pixels:
        raise ImageError(
            f"the image is {w}x{h} = {h * w / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.1f} MP "
            "(max_image_pixels); resize it first")
    # Contiguous and writable (torch refuses to wrap read-only arrays safely).
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def validate_regions(regions, height: int, width: int) -> np.ndarray:
    """User regions as (K, 4) float pixel xyxy inside the image, or raise QueryError."""
    if regions is None:
        return np.zeros((0, 4), dtype=np.float64)
    try:
        boxes = np.asarray(regions, dtype=np.float64)
    except (TypeError, ValueError):
        raise QueryError("regions must be a list of [x1, y1, x2, y2] boxes in pixels") from None
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise QueryError(f"regions must be a list of [x1, y1, x2, y2] boxes, got shape {boxes.shape}")
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        box = "[" + ", ".join(f"{float(v):g}" for v in (x1, y1, x2, y2)) + "]"  # as the user wrote it
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise QueryError(f"region [{k}] has a non-finite coordinate: {box}")
        if min(x1, y1, x2, y2) < 0:
            raise QueryError(f"region [{k}] has a negative coordinate: {box}")
        if x2 > width or y2 > height:
            raise QueryError(f"region [{k}] {box} lies outside the {width}x{height} image")
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise QueryError(f"region [{k}] {box} has no area (x2 must exceed x1, y2 exceed y1)")
    return boxes


def square_padding(height: int, width: int) -> tuple[int, int, int]:
    """(side, left, top) of the centred square canvas the model sees."""
    side = max(height, width)
    return side, (side - width) // 2, (side - height) // 2


def normalized_to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised xyxy in the centre-padded square -> pixel xyxy clipped to the image."""
    side, left, top = square_padding(height, width)
    out = np.asarray(boxes, dtype=np.float64) * side - np.array([left, top, left, top])
    out[..., 0::2] = out[..., 0::2].clip(0, width)
    out[..., 1::2] = out[..., 1::2].clip(0, height)
    return out


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The tight pixel xyxy box around a bool mask's pixels (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def pixels_to_normalized(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    side, left, top = square_padding(height, width)
    return (np.asarray(boxes, dtype=np.float64) + np.array([left, top, left, top])) / side


def box_iou(a, b) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
