"""A training renderer of 3D solids: the tabletop world drawn as shaded surfaces
seen through a perspective camera, so that kinds are learnt by their shape.

The project's first renderer (``scenes.render_scene``) paints flat 2D icons, and a
model trained on it alone learnt the icons, not the kinds. This one draws the same
six kinds, eight colours and three sizes as solids resting on a table plane:

- a pinhole camera at a random height, pitch and yaw over the table, whose far edge
  and the wall beyond it may be in view;
- several shape variants per kind: boxes of uneven sides, balls a little squashed,
  cylinders standing or lying, cups tapered with or without a handle, tori lying or
  standing, bottles of several profiles with a cap;
- surfaces sampled as dense points (area-uniform), back faces culled, splatted into
  a z-buffer; a pixel belongs to the nearest surface (that is the object's exact
  visible mask; the few pixels no point landed on take their neighbours' surface);
- Lambert + specular shading from one light, cast shadows on the table (the solids'
  points projected along the light), textured tables (wood, tiles, stone, cloth, a
  real photo laid on the plane), colour shades around each named colour;
- clutter outside the vocabulary (cones, pyramids, prisms, plates) that occludes and
  casts shadows but is never listed, so "something red" can be wrong about it;
- camera effects: white balance, exposure, vignetting, blur, noise and JPEG.

It shares nothing with the held-out ray caster (``raycast.py``) but the vocabulary
and the Scene record: a model trained on this must still be measured on drawings it
never saw.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageFilter

from ..images import mask_box
from .scenes import COLORS, KINDS, SIZES, Scene, SceneObject, real_photo

BASE_SIZE_M = 0.05  # a medium object's half-width, metres
POINTS_PER_PIXEL = 4.5  # surface samples per pixel of projected area: few holes, few wasted points
MAX_POINTS = 120_000  # per object, for one filling the view
CLUTTER_KINDS = ("cone", "pyramid", "prism", "plate")
CLUTTER_COLORS = {"brown": (120, 80, 45), "grey": (128, 128, 128), "pink": (235, 150, 180), "teal": (30, 140, 140)}
PHOTO_TEXTURES = ("coffee", "chelsea", "astronaut", "rocket")


# --- surfaces: (points (N, 3), outward normals (N, 3), albedo factor (N,)) in an object's own frame,
# z up, the origin at the centre of its footprint on the table ------------------------------------
def _surface_area_points(rng, area: float, density: float) -> int:
    return int(np.clip(area * density, 200, MAX_POINTS))


def _ellipsoid(rng, n, radii):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    points = v * radii
    normals = v / radii
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    points[:, 2] += radii[2]
    return points, normals, np.ones(n)


def _box(rng, n, half):
    """An axis-aligned box standing on the table, half extents ``half``."""
    a, b, c = half
    areas = np.array([b * c, b * c, a * c, a * c, a * b, a * b])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    uv = rng.uniform(-1, 1, size=(n, 2))
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    points = np.empty((n, 3))
    normals = np.zeros((n, 3))
    others = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
    for ax in range(3):
        rows = axis == ax
        i, j = others[ax]
        points[rows, ax] = sign[rows] * half[ax]
        points[rows, i] = uv[rows, 0] * half[i]
        points[rows, j] = uv[rows, 1] * half[j]
        normals[rows, ax] = sign[rows]
    points[:, 2] += c
    return points, normals, np.ones(n)


def _lathe(rng, n, profile, albedo=None, sides: int = 0):
    """A surface of revolution about z through the polyline ``profile`` of (radius,
    height) points, normals on its right going up (outward for a profile that climbs
    the outside). ``albedo``: a factor per segment. ``sides`` > 0 makes it a prism
    or pyramid of that many flat sides."""
    profile = np.asarray(profile, dtype=np.float64)
    r0, z0 = profile[:-1, 0], profile[:-1, 1]
    dr, dz = np.diff(profile[:, 0]), np.diff(profile[:, 1])
    length = np.hypot(dr, dz)
    weight = length * np.maximum(r0 + dr / 2, 1e-4)
    seg = rng.choice(len(weight), size=n, p=weight / weight.sum())
    t = rng.random(n)
    # Area-uniform along a segment whose radius changes: denser where it is wider.
    ra, rb = r0[seg], r0[seg] + dr[seg]
    wide = np.abs(rb - ra) > 1e-9
    t = np.where(wide, (np.sqrt(ra ** 2 + t * (rb ** 2 - ra ** 2)) - ra) / np.where(wide, rb - ra, 1), t)
    radius = ra + t * dr[seg]
    z = z0[seg] + t * dz[seg]
    phi = rng.uniform(0, 2 * np.pi, n)
    normal_r, normal_z = dz[seg] / length[seg], -dr[seg] / length[seg]
    face_phi = phi
    if sides:
        sector = 2 * np.pi / sides
        face_phi = (np.floor(phi / sector) + 0.5) * sector
        radius = radius * np.cos(sector / 2) / np.cos(phi - face_phi)
    points = np.stack([radius * np.cos(phi), radius * np.sin(phi), z], 1)
    normals = np.stack([normal_r * np.cos(face_phi), normal_r * np.sin(face_phi), normal_z], 1)
    factor = np.ones(n) if albedo is None else np.asarray(albedo, dtype=np.float64)[seg]
    return points, normals, factor


def _torus(rng, n, major, minor):
    """A torus lying on the table about z."""
    theta = rng.uniform(0, 2 * np.pi, 4 * n)
    keep = rng.random(4 * n) < (major + minor * np.cos(theta)) / (major + minor)  # area-uniform
    theta = theta[keep][:n]
    phi = rng.uniform(0, 2 * np.pi, len(theta))
    ring = major + minor * np.cos(theta)
    points = np.stack([ring * np.cos(phi), ring * np.sin(phi), minor * np.sin(theta) + minor], 1)
    normals = np.stack([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), np.sin(theta)], 1)
    return points, normals, np.ones(len(theta))


def _rotate_x(points, normals, angle, lift):
    """Turn a shape about the x axis (to stand a torus or lay a cylinder down)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return points @ rot.T + np.array([0, 0, lift]), normals @ rot.T


def _kind_surface(rng, kind: str, s: float, density: float):
    """The surface of one object of ``kind`` and half-width ``s`` (metres), a shape
    variant drawn from ``rng``; returns points, normals, albedo factors, footprint radius."""
    if kind == "cube":
        half = s * rng.uniform(0.85, 1.15, 3) * 0.85
        p, nrm, f = _box(rng, _surface_area_points(rng, 8 * (half[0] * half[1] + half[1] * half[2]
                                                              + half[0] * half[2]), density), half)
        return p, nrm, f, float(np.hypot(half[0], half[1]))
    if kind == "ball":
        radii = s * np.array([1.0, 1.0, rng.uniform(0.85, 1.0)])
        p, nrm, f = _ellipsoid(rng, _surface_area_points(rng, 4 * np.pi * s * s, density), radii)
        return p, nrm, f, s
    if kind == "cylinder":
        radius, height = s * rng.uniform(0.55, 0.8), s * rng.uniform(1.5, 2.6)
        profile = [(0, 0), (radius, 0), (radius, height), (0, height)]
        n = _surface_area_points(rng, 2 * np.pi * radius * (radius + height), density)
        p, nrm, f = _lathe(rng, n, profile)
        if rng.random() < 0.25:  # lying on its side
            p, nrm = _rotate_x(p - np.array([0, 0, height / 2]), nrm, np.pi / 2, radius)
            return p, nrm, f, height / 2
        return p, nrm, f, radius
    if kind == "cup":
        top, height = s * rng.uniform(0.75, 0.95), s * rng.uniform(1.2, 1.7)
        bottom, wall = top * rng.uniform(0.65, 0.95), 0.08 * top
        # Outside up, over the rim, down the inside (normals towards the axis), the inner floor.
        profile = [(0, 0), (bottom, 0), (top, height), (top - wall, height), (bottom - wall, wall * 1.5),
                   (0, wall * 1.5)]
        albedo = [1.0, 1.0, 1.0, 0.45, 0.35]
        n = _surface_area_points(rng, 4 * np.pi * top * height, density)
        p, nrm, f = _lathe(rng, n, profile, albedo)
        if rng.random() < 0.85:  # a handle: half a thin torus standing on the cup's side
            hp, hn, hf = _torus(rng, max(200, n // 6), height * 0.28, height * 0.06)
            hp, hn = _rotate_x(hp - np.array([0, 0, height * 0.06]), hn, np.pi / 2, 0)
            outside = hp[:, 0] > 0
            hp, hn, hf = hp[outside], hn[outside], hf[outside]
            hp = hp + np.array([(top + bottom) / 2 - 0.01 * s, 0, height * 0.5])
            p, nrm, f = np.concatenate([p, hp]), np.concatenate([nrm, hn]), np.concatenate([f, hf])
        return p, nrm, f, top
    if kind == "ring":
        major, minor = s * rng.uniform(0.7, 0.85), s * rng.uniform(0.2, 0.35)
        p, nrm, f = _torus(rng, _surface_area_points(rng, 4 * np.pi ** 2 * major * minor, density), major, minor)
        if rng.random() < 0.2:  # standing on its edge
            p, nrm = _rotate_x(p - np.array([0, 0, minor]), nrm, np.pi / 2, major + minor)
            return p, nrm, f, major
        return p, nrm, f, major + minor
    if kind == "bottle":
        radius, height = s * rng.uniform(0.45, 0.6), s * rng.uniform(2.4, 3.4)
        shoulder, neck = height * rng.uniform(0.55, 0.7), radius * rng.uniform(0.3, 0.45)
        cap = height * 0.08
        profile = [(0, 0), (radius, 0), (radius, shoulder), (neck, shoulder + (height - shoulder) * 0.45),
                   (neck, height - cap), (neck * 1.15, height - cap), (neck * 1.15, height), (0, height)]
        albedo = [1.0, 1.0, 1.0, 1.0, 0.6, 0.6, 0.6]
        n = _surface_area_points(rng, 2 * np.pi * radius * (height + radius), density)
        p, nrm, f = _lathe(rng, n, profile, albedo)
        return p, nrm, f, radius
    raise ValueError(f"unknown object kind {kind}")


def _clutter_surface(rng, kind: str, s: float, density: float):
    if kind == "cone":
        radius, height = s * rng.uniform(0.6, 0.9), s * rng.uniform(1.4, 2.2)
        return (*_lathe(rng, _surface_area_points(rng, 2 * np.pi * radius * height, density),
                        [(0, 0), (radius, 0), (0, height)]), radius)
    if kind == "pyramid":
        radius, height = s * rng.uniform(0.8, 1.1), s * rng.uniform(1.0, 1.6)
        return (*_lathe(rng, _surface_area_points(rng, 2 * np.pi * radius * height, density),
                        [(0, 0), (radius, 0), (0, height)], sides=4), radius)
    if kind == "prism":
        radius, height = s * rng.uniform(0.5, 0.8), s * rng.uniform(1.2, 2.5)
        return (*_lathe(rng, _surface_area_points(rng, 2 * np.pi * radius * (height + radius), density),
                        [(0, 0), (radius, 0), (radius, height), (0, height)], sides=int(rng.choice([3, 5, 6]))),
                radius)
    radius = s * rng.uniform(1.1, 1.6)  # a plate
    height = s * 0.12
    return (*_lathe(rng, _surface_area_points(rng, 2 * np.pi * radius * radius, density),
                    [(0, 0), (radius * 0.8, 0), (radius, height), (0, height * 0.6)]), radius)


# --- camera -----------------------------------------------------------------------------------------
class _Camera:
    def __init__(self, rng, height: int, width: int):
        self.height, self.width = height, width
        # From close over the table to a robot's view across it: objects from a few
        # patches of the vision tower's grid to a sixth of the image.
        self.f = width * rng.uniform(0.75, 1.15)
        self.cx, self.cy = width / 2 + rng.normal(0, 2), height / 2 + rng.normal(0, 2)
        pitch, yaw = np.radians(rng.uniform(25, 68)), np.radians(rng.uniform(-12, 12))
        self.position = np.array([0.0, 0.0, rng.uniform(0.35, 1.2)])
        self.forward = np.array([np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), -np.sin(pitch)])
        self.right = np.cross(self.forward, [0.0, 0.0, 1.0])
        self.right /= np.linalg.norm(self.right)
        self.down = np.cross(self.forward, self.right)

    def project(self, points):
        """Pixel columns, rows and depths along the optical axis of world points."""
        v = points - self.position
        depth = v @ self.forward
        safe = np.maximum(depth, 1e-6)
        return self.f * (v @ self.right) / safe + self.cx, self.f * (v @ self.down) / safe + self.cy, depth

    def ray(self, u, v):
        d = (self.right * ((u - self.cx) / self.f)[..., None] + self.down * ((v - self.cy) / self.f)[..., None]
             + self.forward)
        return d / np.linalg.norm(d, axis=-1, keepdims=True)

    def table_point(self, u, v):
        """Where the ray through pixel (u, v) meets the table (None above the horizon)."""
        d = self.ray(np.asarray(u, float), np.asarray(v, float))
        if d[2] >= -1e-3:
            return None
        return self.position - d * (self.position[2] / d[2])

    def intrinsics(self) -> dict:
        return {"fx": float(self.f), "fy": float(self.f), "cx": float(self.cx), "cy": float(self.cy)}


# --- the table --------------------------------------------------------------------------------------
def _noise_field(rng, x, y, scale: float, octaves: int = 3):
    """A smooth random field over the table: a few random plane waves per octave."""
    field = np.zeros_like(x)
    for octave in range(octaves):
        for _ in range(4):
            angle, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / scale * (2 ** octave) * rng.uniform(0.7, 1.3)
            field += np.sin(k * (x * np.cos(angle) + y * np.sin(angle)) + phase) / (2 ** octave)
    return field / 4


def _table_texture(rng, x, y) -> np.ndarray:
    """(..., 3) colour of the table at world points (x, y)."""
    style = str(rng.choice(["wood", "tiles", "stone", "cloth", "photo"], p=[0.25, 0.2, 0.2, 0.15, 0.2]))
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.35, 0.85)))
    if style == "photo":
        photo = real_photo(str(rng.choice(PHOTO_TEXTURES)), 256, 256)
        if photo is not None:
            span = rng.uniform(0.5, 1.2)  # metres the photo covers
            col = ((x / span + rng.random()) % 1.0 * 255).astype(int)
            row = ((y / span + rng.random()) % 1.0 * 255).astype(int)
            return photo[row, col].astype(np.float64) / 255 * rng.uniform(0.6, 0.9)
        style = "stone"
    if style == "wood":
        base = np.array(colorsys.hsv_to_rgb(rng.uniform(0.05, 0.11), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.8)))
        along = x if rng.random() < 0.5 else y
        grain = np.sin(2 * np.pi * along / rng.uniform(0.01, 0.04) + 3 * _noise_field(rng, x, y, 0.3, 2))
        return base * (1 + 0.12 * grain[..., None])
    if style == "tiles":
        size = rng.uniform(0.06, 0.2)
        other = base * rng.uniform(0.7, 1.3, 3)
        check = ((np.floor(x / size) + np.floor(y / size)) % 2)[..., None]
        grout = ((np.abs((x / size) % 1 - 0.5) > 0.47) | (np.abs((y / size) % 1 - 0.5) > 0.47))[..., None]
        colour = np.where(check > 0, base, other) if rng.random() < 0.6 else np.broadcast_to(base, (*x.shape, 3))
        return np.where(grout, base * 0.5, colour)
    if style == "stone":
        return base * (1 + 0.2 * _noise_field(rng, x, y, rng.uniform(0.05, 0.3)))[..., None]
    return base * (1 + 0.05 * rng.normal(size=x.shape))[..., None]  # cloth


def _color_shade(rng, name: str, table: dict) -> np.ndarray:
    """A shade of the named colour: hue, saturation and value moved a little."""
    r, g, b = (c / 255 for c in table[name])
    hue, sat, val = colorsys.rgb_to_hsv(r, g, b)
    hue = (hue + rng.normal(0, 0.015)) % 1.0
    sat = float(np.clip(sat * rng.uniform(0.8, 1.1), 0, 1))
    val = float(np.clip(val * rng.uniform(0.8, 1.1), 0.08, 1))
    if name in ("white", "black"):
        sat = min(sat, 0.08)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val))


# --- drawing ----------------------------------------------------------------------------------------
def _fill_holes(ids: np.ndarray, passes: int = 3) -> np.ndarray:
    """Pixels no point landed on take the surface both their left and right (or upper
    and lower) neighbours show."""
    ids = ids.copy()
    for _ in range(passes):
        empty = ids < 0
        left, right = np.roll(ids, 1, 1), np.roll(ids, -1, 1)
        up, down = np.roll(ids, 1, 0), np.roll(ids, -1, 0)
        fill = np.where((left == right) & (left >= 0), left, np.where((up == down) & (up >= 0), up, -1))
        ids = np.where(empty & (fill >= 0), fill, ids)
    return ids


def _splat(camera: _Camera, points, order_key, height, width):
    """Nearest point per pixel: (pixel index, point index) of the points that win."""
    u, v, depth = camera.project(points)
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (depth > 0.02)
    index = np.nonzero(inside)[0]
    pixel = row[index] * width + col[index]
    order = np.lexsort((order_key[index], pixel))
    first = np.unique(pixel[order], return_index=True)[1]
    return pixel[order][first], index[order][first], depth


def render_solids(seed: int, height: int = 240, width: int = 320, num_objects: tuple[int, int] = (2, 5),
                  min_visible: float = 0.4) -> Scene:
    """Render the solids scene of ``seed`` (a pure function of it). Objects less
    than ``min_visible`` visible are not listed; they still occlude. A scene that
    ends up with nothing listed is drawn again from the next stream of its seed."""
    for attempt in range(8):
        scene = _render(np.random.default_rng([seed, 29, attempt]), seed, height, width, num_objects, min_visible)
        if scene.objects:
            return scene
    raise RuntimeError(f"solids scene {seed} has no visible object in 8 attempts")


def _render(rng, seed: int, height: int, width: int, num_objects: tuple[int, int], min_visible: float) -> Scene:
    camera = _Camera(rng, height, width)
    density = POINTS_PER_PIXEL * camera.f ** 2

    # Place the listed objects, then clutter, on free spots of the table in view.
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    n_clutter = int(rng.choice([0, 0, 1, 2]))
    placed, used = [], set()
    for _ in range(60):
        if len(placed) == n + n_clutter:
            break
        clutter = len([p for p in placed if p["listed"]]) >= n
        u, v = rng.uniform(0.1, 0.9) * width, rng.uniform(0.35, 0.95) * height
        spot = camera.table_point(u, v)
        if spot is None:
            continue
        distance = float(np.linalg.norm(spot - camera.position))
        if clutter:
            kind, size, color = str(rng.choice(CLUTTER_KINDS)), "medium", None
            s = BASE_SIZE_M * rng.uniform(0.7, 1.3)
        else:
            kind, color = str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))
            if (kind, color) in used and rng.random() < 0.7:
                continue
            size = str(rng.choice(list(SIZES)))
            s = BASE_SIZE_M * SIZES[size] * rng.uniform(0.92, 1.08)
        density_here = density / distance ** 2
        surface = _clutter_surface(rng, kind, s, density_here) if clutter else _kind_surface(rng, kind, s, density_here)
        footprint = surface[3]
        if any(np.hypot(*(spot[:2] - p["at"][:2])) < (footprint + p["footprint"]) * 0.95 for p in placed):
            continue
        yaw = rng.uniform(0, 2 * np.pi)
        c, si = np.cos(yaw), np.sin(yaw)
        rot = np.array([[c, -si, 0], [si, c, 0], [0, 0, 1]])
        points = surface[0] @ rot.T + np.array([spot[0], spot[1], 0.0])
        normals = surface[1] @ rot.T
        shade = (_color_shade(rng, color, COLORS) if color else
                 _color_shade(rng, str(rng.choice(list(COLORS) + list(CLUTTER_COLORS))), {**COLORS, **CLUTTER_COLORS}))
        placed.append({"kind": kind, "color": color, "size": size, "listed": not clutter, "at": spot,
                       "footprint": footprint, "points": points, "normals": normals, "albedo": surface[2],
                       "rgb": shade, "gloss": rng.uniform(0, 0.5), "shininess": rng.uniform(8, 60)})
        if not clutter:
            used.add((kind, color))

    # The light: above and to one side; ambient from the room.
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.6), rng.uniform(0.8, 2.0)])
    light /= np.linalg.norm(light)
    ambient, tint = rng.uniform(0.25, 0.45), rng.uniform(0.9, 1.1, 3)

    # Every surface point, its object, culled where it faces away from the camera.
    points = [p["points"] for p in placed]
    owner = [np.full(len(p["points"]), k) for k, p in enumerate(placed)]
    pts = np.concatenate(points) if points else np.zeros((0, 3))
    who = np.concatenate(owner) if owner else np.zeros(0, int)
    nrm = np.concatenate([p["normals"] for p in placed]) if placed else np.zeros((0, 3))
    alb = np.concatenate([p["albedo"] for p in placed]) if placed else np.zeros(0)
    facing = ((camera.position - pts) * nrm).sum(1) > 0
    pts, who, nrm, alb = pts[facing], who[facing], nrm[facing], alb[facing]

    pixel, winner, depth = _splat(camera, pts, camera.project(pts)[2], height, width)
    ids = np.full(height * width, -1)
    ids[pixel] = winner
    point_of = _fill_holes(ids.reshape(height, width))  # a point index per pixel, -1 for the table
    object_of = np.where(point_of >= 0, who[np.maximum(point_of, 0)], -1)

    # The table and wall behind it, per pixel.
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    rays = camera.ray(cols, rows)
    with np.errstate(divide="ignore"):
        t = np.where(rays[..., 2] < -1e-4, -camera.position[2] / rays[..., 2], np.inf)
    hit = camera.position + rays * np.where(np.isfinite(t), t, 0)[..., None]
    edge = rng.uniform(0.9, 2.5)  # the table's far edge, metres ahead
    on_table = np.isfinite(t) & (hit[..., 1] < edge)
    colour = _table_texture(rng, hit[..., 0], hit[..., 1])
    wall = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.4, 0.9)))
    wall = wall * np.linspace(0.8, 1.05, height)[:, None, None]
    colour = np.where(on_table[..., None], colour, wall)
    depth_map = np.where(on_table, t * (rays @ camera.forward), 4.0)

    # Cast shadows: every solid's points moved along the light onto the table.
    shadow = np.zeros(height * width, bool)
    if len(who):
        all_pts = np.concatenate(points)[::2]
        flat = all_pts - light * (all_pts[:, 2:3] / light[2])
        su, sv, sd = camera.project(flat)
        sc, sr = np.floor(su).astype(int), np.floor(sv).astype(int)
        ok = (sc >= 0) & (sc < width) & (sr >= 0) & (sr < height) & (sd > 0.02)
        shadow[sr[ok] * width + sc[ok]] = True
    shadow_img = Image.fromarray((shadow.reshape(height, width) * 255).astype(np.uint8))
    shadow_img = shadow_img.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.5)))
    darkness = np.asarray(shadow_img, np.float64)[..., None] / 255 * rng.uniform(0.35, 0.6)
    colour = colour * (1 - darkness * on_table[..., None])
    colour = colour * (ambient + (1 - ambient) * max(light[2], 0.3)) * 1.15

    # The solids, shaded per point.
    seen = point_of >= 0
    k = point_of[seen]
    normal = nrm[k]
    view = camera.position - pts[k]
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    lambert = np.clip(normal @ light, 0, None)
    half = view + light
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    owner_of = who[k]
    rgb = np.array([p["rgb"] for p in placed]).reshape(-1, 3)[owner_of]
    gloss = np.array([p["gloss"] for p in placed])[owner_of]
    shine = np.array([p["shininess"] for p in placed])[owner_of]
    spec = gloss * np.clip((normal * half).sum(1), 0, None) ** shine * (lambert > 0)
    lit = rgb * alb[k, None] * (ambient + (1 - ambient) * lambert[:, None]) + spec[:, None]
    colour[seen] = lit
    depth_map[seen] = depth[k]
    image = colour * tint

    # The camera.
    image = image * rng.uniform(0.85, 1.2) * rng.uniform(0.9, 1.1, 3)  # exposure, white balance
    r2 = ((cols - width / 2) ** 2 + (rows - height / 2) ** 2) / (width / 2) ** 2
    image = image * (1 - rng.uniform(0, 0.3) * r2)[..., None]
    image = np.clip(image, 0, 1) ** rng.uniform(0.85, 1.15) * 255
    image = image + rng.normal(0, rng.uniform(0, 7), image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.7:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(rng.integers(35, 95)))
        pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    image = np.asarray(pil)

    objects, hidden = [], 0
    for index, p in enumerate(placed):
        if not p["listed"]:
            continue
        visible = object_of == index
        # Its whole shape, as if nothing were in front: every pixel its facing points land on.
        own = np.full(height * width, -1)
        u, v, d = camera.project(pts[who == index])
        col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (d > 0.02)
        own[row[inside] * width + col[inside]] = 0
        full = _fill_holes(own.reshape(height, width)) >= 0
        fraction = visible.sum() / max(1, (full | visible).sum())
        if fraction < min_visible or visible.sum() < 12:
            hidden += 1
            continue
        objects.append(SceneObject(p["kind"], p["color"], p["size"], mask_box(visible), visible, float(fraction),
                                   float(np.median(depth_map[visible])), full | visible))
    # Far to near, as the other renderers list them.
    objects.sort(key=lambda o: -o.depth_m)
    return Scene(seed=seed, image=image, objects=objects, depth=depth_map.astype(np.float32), background="solids",
                 camera=camera.intrinsics(), hidden=hidden)
