"""Procedural robot-tabletop scenes with exact boxes and masks.

Used by the demo and the camera simulator, and by training/ to make data. Every
scene is a pure function of its seed. Objects are painted far to near; an
object's mask is what stays visible after nearer objects are painted over it,
and its box is the tight box of that visible mask, so both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..images import mask_box

KINDS = ("cube", "ball", "cup", "cylinder", "ring", "bottle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 205, 35),
    "orange": (245, 135, 30), "purple": (135, 55, 175), "white": (238, 238, 238), "black": (35, 35, 35),
}
SIZES = {"small": 0.7, "medium": 1.0, "large": 1.35}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@dataclass
class SceneObject:
    kind: str
    color: str
    size: str
    box: np.ndarray  # (4,) pixel xyxy of the visible mask
    mask: np.ndarray  # (H, W) bool, visible part
    visible_fraction: float
    depth_m: float  # distance from the camera along the optical axis, metres
    full_mask: np.ndarray | None = None  # (H, W) bool, the whole (amodal) shape

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (float(self.box[0] + self.box[2]) / 2, float(self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]
    depth: np.ndarray  # (H, W) float32 metres
    background: str
    camera: dict = field(default_factory=dict)  # fx, fy, cx, cy of a pinhole camera
    hidden: int = 0  # objects painted but too occluded to list (they still occlude)


@lru_cache(maxsize=8)
def _photo(name: str) -> np.ndarray | None:
    try:
        from skimage import data
    except ImportError:
        return None
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def real_photo(name: str = "astronaut", height: int = 480, width: int = 640) -> np.ndarray | None:
    img = _photo(name)
    if img is None:
        return None
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _background(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    if kind.startswith("photo:"):
        photo = real_photo(kind.split(":", 1)[1], h, w)
        if photo is not None:
            # Dimmed so that the table objects stand out, as a real table would.
            return photo.astype(np.float32) * 0.55 + 60
    base = rng.uniform(90, 200, size=3)
    rows = np.linspace(0.8, 1.15, h)[:, None, None]  # lighter towards the camera
    img = np.broadcast_to(base, (h, w, 3)) * rows
    if kind == "wood":
        grain = np.sin(np.linspace(0, rng.uniform(20, 60), w) + rng.uniform(0, 6))[None, :, None]
        img = img * (1 + 0.06 * grain) * np.array([1.1, 0.9, 0.7])
    return img.astype(np.float32)


def _shade(color, factor):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in color)


def _draw_object(kind: str, color, cx: float, cy: float, r: float, canvas: ImageDraw.ImageDraw,
                 mask: ImageDraw.ImageDraw) -> None:
    """Paint one object centred at (cx, cy) with characteristic radius r."""
    dark, light = _shade(color, 0.7), _shade(color, 1.25)

    def both(method, xy, fill, outline=None, width=1):
        if outline is None:  # a filled shape
            getattr(canvas, method)(xy, fill=fill)
            getattr(mask, method)(xy, fill=255)
        else:  # an outline only (cup handle, ring)
            getattr(canvas, method)(xy, outline=outline, width=width)
            getattr(mask, method)(xy, outline=255, width=width)

    if kind == "ball":
        both("ellipse", [cx - r, cy - r, cx + r, cy + r], color)
        canvas.ellipse([cx - r * 0.55, cy - r * 0.6, cx - r * 0.05, cy - r * 0.1], fill=light)
    elif kind == "cube":
        d = r * 0.45
        both("rectangle", [cx - r, cy - r + d, cx + r - d, cy + r], color)
        both("polygon", [(cx - r, cy - r + d), (cx - r + d, cy - r), (cx + r, cy - r), (cx + r - d, cy - r + d)], light)
        both("polygon", [(cx + r - d, cy - r + d), (cx + r, cy - r), (cx + r, cy + r - d), (cx + r - d, cy + r)], dark)
    elif kind == "cylinder":
        e = r * 0.35
        both("rectangle", [cx - r * 0.7, cy - r + e, cx + r * 0.7, cy + r - e], color)
        both("ellipse", [cx - r * 0.7, cy + r - 2 * e, cx + r * 0.7, cy + r], color)
        both("ellipse", [cx - r * 0.7, cy - r, cx + r * 0.7, cy - r + 2 * e], light)
    elif kind == "cup":
        e = r * 0.3
        both("polygon", [(cx - r * 0.75, cy - r + e), (cx + r * 0.75, cy - r + e), (cx + r * 0.55, cy + r),
                         (cx - r * 0.55, cy + r)], color)
        both("ellipse", [cx + r * 0.45, cy - r * 0.45, cx + r * 1.05, cy + r * 0.35], None, outline=color,
             width=max(2, int(r * 0.16)))
        both("ellipse", [cx - r * 0.75, cy - r, cx + r * 0.75, cy - r + 2 * e], dark)
    elif kind == "ring":
        both("ellipse", [cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], None, outline=color, width=max(3, int(r * 0.32)))
    elif kind == "bottle":
        both("rectangle", [cx - r * 0.45, cy - r * 0.2, cx + r * 0.45, cy + r * 1.1], color)
        both("polygon", [(cx - r * 0.45, cy - r * 0.2), (cx + r * 0.45, cy - r * 0.2), (cx + r * 0.16, cy - r * 0.65),
                         (cx - r * 0.16, cy - r * 0.65)], color)
        both("rectangle", [cx - r * 0.16, cy - r * 1.1, cx + r * 0.16, cy - r * 0.6], color)
        both("rectangle", [cx - r * 0.19, cy - r * 1.25, cx + r * 0.19, cy - r * 1.05], dark)
        canvas.rectangle([cx - r * 0.3, cy, cx - r * 0.15, cy + r * 0.9], fill=light)
    else:
        raise ValueError(f"unknown object kind {kind}")


def render_scene(seed: int, height: int = 240, width: int = 320, num_objects: tuple[int, int] = (2, 5),
                 kinds=KINDS, colors=None, photo_probability: float = 0.2, noise_std: tuple[float, float] = (0, 6),
                 min_visible: float = 0.4) -> Scene:
    """Render the scene of ``seed``. Objects that end up less than ``min_visible``
    visible are dropped, so every listed object can be seen and named."""
    rng = np.random.default_rng(seed)
    colors = list(colors or COLORS)
    if rng.random() < photo_probability:
        background = "photo:" + PHOTOS[int(rng.integers(len(PHOTOS)))]
    else:
        background = str(rng.choice(["plain", "wood"]))
    canvas_f = _background(rng, height, width, background)
    # A pinhole camera looking down at a table: farther rows are higher in the image.
    fx = fy = 0.9 * width
    camera = {"fx": fx, "fy": fy, "cx": width / 2, "cy": height / 2}
    horizon_row = -0.6 * height
    table_depth = (fy * 0.5 / np.clip(np.arange(height) - horizon_row, 1, None)).astype(np.float32)
    depth = np.broadcast_to(table_depth[:, None] * 3.0, (height, width)).copy()

    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    distance = rng.uniform(0.8, 1.25)  # camera distance: scales every object
    specs = []
    used = set()
    for _ in range(n * 3):
        if len(specs) == n:
            break
        kind = str(rng.choice(list(kinds)))
        color = str(rng.choice(colors))
        if (kind, color) in used and rng.random() < 0.7:
            continue  # prefer distinct objects, allow some duplicates (counting, "all the ...")
        size = str(rng.choice(list(SIZES)))
        r = min(height, width) * 0.12 * SIZES[size] * distance
        cx = rng.uniform(r * 1.3, width - r * 1.3)
        cy = rng.uniform(height * 0.3 + r, height - r * 1.3)
        used.add((kind, color))
        specs.append((kind, color, size, cx, cy, r))
    specs.sort(key=lambda s: s[4] + s[5])  # far (high in the image) first

    canvas = Image.fromarray(canvas_f.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    full_masks = []
    for kind, color, _size, cx, cy, r in specs:
        m = Image.new("L", (width, height), 0)
        _draw_object(kind, COLORS[color], cx, cy, r, draw, ImageDraw.Draw(m))
        full_masks.append(np.asarray(m) > 127)
    image = np.asarray(canvas).astype(np.float32)
    std = rng.uniform(*noise_std)
    if std > 0:
        image = image + rng.normal(0, std, image.shape)
    image = image.clip(0, 255).astype(np.uint8)

    objects = []
    hidden = 0
    nearer = np.zeros((height, width), bool)
    for (kind, color, size, _cx, cy, r), full in reversed(list(zip(specs, full_masks))):
        visible = full & ~nearer
        nearer |= full
        frac = visible.sum() / max(1, full.sum())
        if frac < min_visible or visible.sum() < 12:
            hidden += 1
            continue
        box = mask_box(visible)
        obj_depth = float(table_depth[int(min(cy + r, height - 1))] * 3.0 - 0.02)
        depth[visible] = obj_depth
        objects.append(SceneObject(kind, color, size, box, visible, float(frac), obj_depth, full))
    objects.reverse()  # far to near, as painted
    return Scene(seed=seed, image=image, objects=objects, depth=depth.astype(np.float32),
                 background=background, camera=camera, hidden=hidden)
