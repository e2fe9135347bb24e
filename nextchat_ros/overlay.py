"""Overlay images: masks, boxes and phrases drawn on the image a person looks at."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


def draw_overlay(image: np.ndarray, objects, regions=None, alpha: float = 0.45) -> np.ndarray:
    """Return an RGB uint8 copy of ``image`` with each object's mask, box and label.

    ``objects`` are anything with ``phrase``, ``box`` (pixel xyxy), ``score`` and
    optionally ``mask`` (H, W bool). User ``regions`` (pixel xyxy) are drawn dashed-white.
    """
    out = image.astype(np.float32).copy()
    for k, obj in enumerate(objects):
        mask = getattr(obj, "mask", None)
        if mask is not None and mask.shape == image.shape[:2]:
            color = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
            out[mask] = out[mask] * (1 - alpha) + color * alpha
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, box in enumerate(regions if regions is not None else []):
        x1, y1, x2, y2 = [float(v) for v in box]
        for i in range(int(x1), int(x2), 8):
            draw.line([(i, y1), (min(i + 4, x2), y1)], fill=(255, 255, 255), width=2)
            draw.line([(i, y2), (min(i + 4, x2), y2)], fill=(255, 255, 255), width=2)
        for j in range(int(y1), int(y2), 8):
            draw.line([(x1, j), (x1, min(j + 4, y2))], fill=(255, 255, 255), width=2)
            draw.line([(x2, j), (x2, min(j + 4, y2))], fill=(255, 255, 255), width=2)
        draw.text((x1 + 2, y2 + 2), f"region [{k}]", fill=(255, 255, 255), font=font)
    for k, obj in enumerate(objects):
        color = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = [float(v) for v in obj.box]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        label = f"[{k}] {obj.phrase} {obj.score:.2f}"
        tx, ty = x1, max(0.0, y1 - 12)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=color)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path) -> None:
    Image.fromarray(image).save(path)


def load_rgb(path) -> np.ndarray:
    """Read an image file as uint8 RGB, refusing what the model cannot take."""
    from .errors import ImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise ImageError(f"{path} is a 16-bit image; convert it to 8-bit RGB first")
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
