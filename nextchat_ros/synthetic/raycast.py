"""A held-out renderer: the synthetic tabletop world drawn by a ray caster that
shares no code with ``scenes.render_scene``, for measuring only.

The project's scenes are flat 2D drawings. This renders the same six kinds, eight
colours and three sizes another way: a perspective camera at a random height and
pitch over a textured table plane, solids ray-cast in numpy (spheres, boxes turned
about their vertical axis, cylinders, a cup with a handle and a dark inside, a flat
ring with a hole, a bottle with a neck), Lambert + specular shading from a light on
one side with cast shadows, colour shades around each named colour, white balance,
blur, sensor noise and JPEG. Masks and boxes are exact (the ray-cast id of each
pixel centre). ``SyntheticTabletop`` refuses it for the training split: a model
must never be trained on the drawings it is measured on here.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageFilter

from ..images import mask_box
from .scenes import COLORS, KINDS, SIZES, Scene, SceneObject

INF = np.float64(np.inf)


# --- ray / primitive intersections (origins o: (N, 3) or (3,), directions d: (N, 3)) --------------
def _cylinder(o, d, cx, cy, radius, z0, z1, inner=0.0):
    """Entering hit of a vertical cylinder (side or top cap; an annulus top when inner > 0)."""
    ox, oy = o[..., 0] - cx, o[..., 1] - cy
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (ox * d[:, 0] + oy * d[:, 1])
    c = ox ** 2 + oy ** 2 - radius ** 2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
        z_side = o[..., 2] + t_side * d[:, 2]
        side = (disc >= 0) & (t_side > 1e-6) & (z_side >= z0) & (z_side <= z1)
        t_top = (z1 - o[..., 2]) / d[:, 2]
    px, py = ox + t_top * d[:, 0], oy + t_top * d[:, 1]
    r2 = px ** 2 + py ** 2
    top = (t_top > 1e-6) & (r2 <= radius ** 2) & (r2 >= inner ** 2)
    t = np.where(side, t_side, INF)
    t = np.where(top & (t_top < t), t_top, t)
    hit_x, hit_y = ox + t * d[:, 0], oy + t * d[:, 1]
    normal = np.stack([hit_x / radius, hit_y / radius, np.zeros_like(t)], -1)
    normal[np.isfinite(t) & (t == t_top)] = (0.0, 0.0, 1.0)
    return t, normal, np.isfinite(t) & (t == t_top)


def _sphere(o, d, center, radius):
    oc = o - center
    b = (oc * d).sum(-1)
    c = (oc * oc).sum(-1) - radius ** 2
    disc = b * b - c
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    t = np.where((disc >= 0) & (t > 1e-6), t, INF)
    normal = (o + t[:, None] * d - center) / radius
    return t, normal


def _box(o, d, center, half, yaw):
    """Slab test of a box turned by ``yaw`` about the vertical axis."""
    cos, sin = np.cos(-yaw), np.sin(-yaw)
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    lo_ = (o - center) @ rot.T
    ld = d @ rot.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - lo_) / ld
        t2 = (half - lo_) / ld
    t_near = np.nanmax(np.minimum(t1, t2), -1)
    t_far = np.nanmin(np.maximum(t1, t2), -1)
    hit = (t_near <= t_far) & (t_far > 1e-6) & (t_near > 1e-6)
    t = np.where(hit, t_near, INF)
    axis = np.nanargmax(np.minimum(t1, t2), -1)
    local = np.zeros(d.shape)
    rows = np.arange(len(d))
    local[rows, axis] = -np.sign(ld[rows, axis])
    return t, local @ rot  # back to world axes


class Solid:
    """One object: its parts (each a primitive) and their colours."""

    def __init__(self, kind: str, x: float, y: float, radius: float, yaw: float, rgb: np.ndarray):
        self.kind, self.x, self.y, self.r, self.yaw, self.rgb = kind, x, y, radius, yaw, rgb

    def intersect(self, o, d):
        """(t, normal, colour) of the nearest hit of every ray; t = inf for a miss."""
        k, x, y, r = self.kind, self.x, self.y, self.r
        dark = self.rgb * 0.35
        parts = []
        if k == "ball":
            t, n = _sphere(o, d, np.array([x, y, r]), r)
            parts.append((t, n, self.rgb))
        elif k == "cube":
            s = r * 0.85
            t, n = _box(o, d, np.array([x, y, s]), np.array([s, s, s]), self.yaw)
            parts.append((t, n, self.rgb))
        elif k == "cylinder":
            t, n, _ = _cylinder(o, d, x, y, r * 0.62, 0.0, r * 2.6)
            parts.append((t, n, self.rgb))
        elif k == "cup":
            t, n, top = _cylinder(o, d, x, y, r * 0.8, 0.0, r * 1.5)
            parts.append((t, n, np.where(top[:, None], dark, self.rgb)))  # its inside, seen from above
            hx, hy = x + np.cos(self.yaw) * r * 0.95, y + np.sin(self.yaw) * r * 0.95
            t, n = _box(o, d, np.array([hx, hy, r * 0.8]), np.array([r * 0.22, r * 0.08, r * 0.42]), self.yaw)
            parts.append((t, n, self.rgb))
        elif k == "ring":
            t, n, _ = _cylinder(o, d, x, y, r * 1.1, 0.0, r * 0.38, inner=r * 0.62)
            parts.append((t, n, self.rgb))
        elif k == "bottle":
            t, n, _ = _cylinder(o, d, x, y, r * 0.52, 0.0, r * 2.3)
            parts.append((t, n, self.rgb))
            t, n, top = _cylinder(o, d, x, y, r * 0.22, r * 2.3, r * 3.3)
            parts.append((t, n, np.where(top[:, None], dark, self.rgb)))  # a dark cap
        else:
            raise ValueError(k)
        t = np.full(len(d), INF)
        normal = np.zeros(d.shape)
        colour = np.zeros(d.shape)
        for pt, pn, pc in parts:
            nearer = pt < t
            t = np.where(nearer, pt, t)
            normal[nearer] = pn[nearer]
            colour[nearer] = np.broadcast_to(pc, d.shape)[nearer]
        return t, normal, colour


# Base radius (m) of a medium object; each kind's shape scales it.
BASE_RADIUS = 0.032


def _shade_of(name: str, rng) -> np.ndarray:
    r, g, b = (c / 255 for c in COLORS[name])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if name in ("white", "black"):
        v = float(np.clip(v * rng.uniform(0.85, 1.1) + rng.uniform(-0.04, 0.04), 0, 1))
    else:
        h = (h + rng.uniform(-0.025, 0.025)) % 1.0
        s = float(np.clip(s * rng.uniform(0.8, 1.1), 0, 1))
        v = float(np.clip(v * rng.uniform(0.85, 1.1), 0, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _table(rng):
    """A table texture: f(x, y) -> RGB in [0, 1]."""
    base = rng.uniform(0.3, 0.8, 3)
    style = rng.choice(["wood", "tiles", "speckle", "plain"])
    freq, phase, tile = rng.uniform(40, 120), rng.uniform(0, 6), rng.uniform(0.05, 0.12)

    def texture(x, y):
        if style == "wood":
            grain = np.sin(freq * (x + 0.03 * np.sin(25 * y)) + phase)
            f = 1 + 0.08 * grain[:, None]
        elif style == "tiles":
            f = np.where(((np.floor(x / tile) + np.floor(y / tile)) % 2)[:, None] == 0, 1.0, 0.82)
        elif style == "speckle":
            f = 1 + 0.1 * np.sin(173 * x)[:, None] * np.sin(191 * y)[:, None]
        else:
            f = np.ones((len(x), 1))
        return np.clip(base * f, 0, 1)

    return texture, style


def render_raycast(seed: int, height: int = 240, width: int = 320) -> Scene:
    """One ray-cast tabletop scene with exact visible masks."""
    rng = np.random.default_rng([seed, 2027])
    origin, d, yn, forward, focal, look_y = _camera_rays(rng, height, width)
    solids, specs = _place_solids(rng, look_y)
    shaded, t_best, ids, full_masks, style = _shade(rng, origin, d, yn, look_y, solids, height, width)
    image = _camera_effects(rng, shaded.reshape(height, width, 3))
    # Depth along the optical axis; objects with their exact visible masks.
    depth = (np.where(np.isfinite(t_best), t_best, 0) * (d @ forward)).reshape(height, width).astype(np.float32)
    id_map = ids.reshape(height, width)
    objects, hidden = [], 0
    for k, ((kind, color, size), full) in enumerate(zip(specs, full_masks)):
        visible = id_map == k
        fraction = visible.sum() / max(1, full.sum())
        if fraction < 0.4 or visible.sum() < 12:
            hidden += 1
            continue
        objects.append(SceneObject(kind, color, size, mask_box(visible), visible, float(fraction),
                                   float(np.median(depth[visible])), full))
    camera = {"fx": focal, "fy": focal, "cx": width / 2, "cy": height / 2}
    return Scene(seed=seed, image=image, objects=objects, depth=depth, background=f"raycast:{style}",
                 camera=camera, hidden=hidden)


def _camera_rays(rng, height: int, width: int):
    """A camera cam_h above the table, looking at a point look_y ahead: one unit ray
    per pixel centre. (origin, rays (H*W, 3), each ray's normalised image row offset,
    forward axis, focal length, look_y)"""
    cam_h, look_y = rng.uniform(0.4, 0.75), rng.uniform(0.45, 0.7)
    focal = width / (2 * np.tan(np.radians(rng.uniform(50, 68)) / 2))
    forward = np.array([0.0, look_y, -cam_h])
    forward /= np.linalg.norm(forward)
    right = np.array([1.0, 0.0, 0.0])
    up = np.cross(right, forward)
    ys, xs = np.mgrid[0:height, 0:width]
    xn = ((xs.ravel() + 0.5) - width / 2) / focal
    yn = ((ys.ravel() + 0.5) - height / 2) / focal
    d = forward[None] + xn[:, None] * right[None] - yn[:, None] * up[None]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.array([0.0, 0.0, cam_h]), d, yn, forward, focal, look_y


def _place_solids(rng, look_y: float):
    """Two to five objects on the table around the look point, apart from each other."""
    solids, specs = [], []
    for _ in range(int(rng.integers(2, 6))):
        kind = str(rng.choice(KINDS))
        color = str(rng.choice(list(COLORS)))
        size = str(rng.choice(list(SIZES)))
        radius = BASE_RADIUS * SIZES[size]
        for _ in range(40):
            x, y = rng.uniform(-0.22, 0.22), look_y + rng.uniform(-0.18, 0.22)
            if all((x - s.x) ** 2 + (y - s.y) ** 2 > (1.25 * (radius + s.r)) ** 2 for s in solids):
                break
        else:
            continue
        solids.append(Solid(kind, x, y, radius, rng.uniform(0, 2 * np.pi), _shade_of(color, rng)))
        specs.append((kind, color, size))
    return solids, specs


def _shade(rng, origin, d, yn, look_y, solids, height, width):
    """Every ray's colour in [0, 1] under a light from one side, with cast shadows;
    also the hit distance, the object id (-1: table or wall), each object's whole
    mask and the table's style."""
    azimuth, elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(30, 65))
    light = np.array([np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation), np.sin(elevation)])
    ambient, strength = rng.uniform(0.25, 0.45), rng.uniform(0.7, 1.0)
    n = len(d)
    t_best, ids = np.full(n, INF), np.full(n, -1)
    normal, colour = np.zeros((n, 3)), np.zeros((n, 3))
    full_masks = []
    for k, solid in enumerate(solids):
        t, nn, cc = solid.intersect(origin, d)
        full_masks.append(np.isfinite(t).reshape(height, width))
        nearer = t < t_best
        t_best[nearer], ids[nearer] = t[nearer], k
        normal[nearer], colour[nearer] = nn[nearer], cc[nearer]
    # The table (z = 0) where no object is hit, a wall beyond its far edge.
    texture, style = _table(rng)
    with np.errstate(divide="ignore"):
        t_table = np.where(d[:, 2] < 0, -origin[2] / d[:, 2], INF)
    far_edge = look_y + rng.uniform(0.45, 0.8)
    hit_table = (ids < 0) & np.isfinite(t_table) & (origin[1] + t_table * d[:, 1] < far_edge)
    p_table = origin + t_table[:, None] * d
    colour[hit_table] = texture(p_table[hit_table, 0], p_table[hit_table, 1])
    normal[hit_table] = (0.0, 0.0, 1.0)
    t_best[hit_table] = t_table[hit_table]
    wall = (ids < 0) & ~hit_table
    wall_rgb = rng.uniform(0.4, 0.85, 3)
    colour[wall] = wall_rgb * (0.8 + 0.2 * (1 - yn[wall] / max(1e-6, np.abs(yn).max())))[:, None]
    # Shadows: the object and table points that an object hides from the light.
    lit = ~wall
    points = origin + np.where(np.isfinite(t_best), t_best, 0)[:, None] * d + normal * 1e-4
    shadow = np.zeros(n, bool)
    rays = np.broadcast_to(light, (int(lit.sum()), 3))
    for solid in solids:
        t, _, _ = solid.intersect(points[lit], rays)
        shadow[np.flatnonzero(lit)[np.isfinite(t)]] = True
    diffuse = np.clip((normal * light).sum(-1), 0, 1) * np.where(shadow, 0.15, 1.0)
    half = light[None] - d
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    specular = np.where((ids >= 0) & ~shadow, np.clip((normal * half).sum(-1), 0, 1) ** 40 * 0.35, 0)
    shaded = np.where(wall[:, None], colour, colour * (ambient + strength * diffuse)[:, None] + specular[:, None])
    return shaded, t_best, ids, full_masks, style


def _camera_effects(rng, shaded: np.ndarray) -> np.ndarray:
    """White balance, blur, sensor noise and JPEG, as a cheap camera adds them."""
    height, width = shaded.shape[:2]
    image = shaded * rng.uniform(0.9, 1.1, 3) * 255
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
    image = np.asarray(pil).astype(np.float32) + rng.normal(0, rng.uniform(1, 7), (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(45, 92)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
