"""Procedural concept world: the embedded default dataset, with exact pixel masks, landmarks and classes.

Nothing may be downloaded, so Network Dissection, location stability and seed training all run on a world
drawn here. Each image has a background *scene* (whole-image label) and one main *object* (its shape is
the class label) plus optional smaller distractors, with pixel-level categories

* ``object``   — shape of every visible object (circle, ellipse, square, triangle, star, cross,
  semicircle, heart);
* ``color``    — the named palette colour that drew each pixel, background included (Broden's 11 colour
  names, ``-c`` suffix); objects and backgrounds take palette colours with a small per-image jitter;
* ``material`` — the object's fill pattern (solid, stripes, dots, checker), drawn in the object's frame
  as a tint of the object's own colour (halfway to white for dark colours, to black for light ones), so
  materials are texture and colours are hue, and the silhouette always contrasts with the background;
* ``part``     — two layers: ``rim``/``core`` (a band along the outline vs the inside) and ``corner``
  (regions around convex vertices and tips);

and five landmarks on the main object (``center`` and ``top``/``bottom``/``left``/``right``: points on the
object's own axes, 0.45 r from its centre, turning with it), invisible when outside the image, off the
drawn shape or hidden by a distractor.

The constraints that shaped it:

* **Exact labels.** Every mask is derived from the same signed-distance fields that decide which palette
  colour each pixel gets; nothing is anti-aliased, so a pixel belongs to an object iff its centre does.
* **Determinism per item.** All randomness of item ``i`` comes from ``PCG64(SeedSequence([seed, i]))``
  (one vector of uniforms plus one noise field), and the rendering is element-wise numpy, so any subset in
  any order, in any batch, gives identical bytes.
* **Speed.** Rendering is vectorised over the batch (coordinate grids × per-image parameters, grouped by
  shape), several hundred to thousands of 64×64 images per second per core (``benchmarks/bench_synthetic.py``).
* **Learnable but varied.** Size, position, colours, material, scene, distractors and noise all vary, the
  main object is turned up to ±15° from upright (``rotation``; free rotation made the shape class about
  three times harder to learn for a small CNN), and distractors take any orientation.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ._base import Batch, Concept, ConceptDataset, DatasetError, register_dataset
from ._files import canonical_digest, check_int

__all__ = [
    "COLOR_NAMES",
    "LANDMARK_NAMES",
    "MATERIAL_NAMES",
    "PALETTE",
    "PART_NAMES",
    "SCENE_NAMES",
    "SHAPE_NAMES",
    "SyntheticWorld",
    "TASKS",
]

#: bump when the drawing changes, so cached results keyed by the digest are invalidated
GENERATOR_VERSION = 3

SHAPE_NAMES = ("circle", "ellipse", "square", "triangle", "star", "cross", "semicircle", "heart")
COLOR_NAMES = ("black", "blue", "brown", "grey", "green", "orange", "pink", "purple", "red", "white", "yellow")
#: nominal RGB of the named colours (per image each is jittered by up to ±``_COLOR_JITTER`` per channel)
PALETTE = np.array(
    [
        (25, 25, 25), (35, 75, 215), (120, 72, 36), (128, 128, 128), (40, 160, 60), (240, 135, 20),
        (245, 150, 195), (125, 50, 165), (205, 30, 35), (235, 235, 235), (240, 215, 40),
    ],
    dtype=np.float64,
)
MATERIAL_NAMES = ("solid", "stripes", "dots", "checker")
PART_NAMES = ("rim", "core", "corner")
SCENE_NAMES = ("plain", "gradient", "noise", "grid", "horizon", "clouds")
LANDMARK_NAMES = ("center", "top", "bottom", "left", "right")
#: class tasks: the main object's shape (8 classes), or its shape and fill material jointly (32 classes)
TASKS = ("shape", "shape_material")

# Global label numbers, Broden-style: colours first, then objects, parts, materials, scenes.
_COLOR_BASE = 1
_OBJECT_BASE = _COLOR_BASE + len(COLOR_NAMES)
_PART_BASE = _OBJECT_BASE + len(SHAPE_NAMES)
_MATERIAL_BASE = _PART_BASE + len(PART_NAMES)
_SCENE_BASE = _MATERIAL_BASE + len(MATERIAL_NAMES)
_RIM, _CORE, _CORNER = _PART_BASE, _PART_BASE + 1, _PART_BASE + 2

_COLOR_JITTER = 12.0
# Colour pairs must differ this much (Euclidean RGB) so objects stand out from the background.
_OBJECT_VS_BACKGROUND = 100.0
_TINT_VS_BACKGROUND = 60.0
_BACKGROUND2_VS_BACKGROUND = 60.0

# Object geometry, in units of the object scale r (pixels = units · r).
# v3: smaller main objects over a wider range of positions. Large, central objects made the image centre
# a near-perfect predictor of every landmark (the Zhang et al. baseline beat trained nets), and whole-image
# colour dominated every unit's top activations (random-init nets had more "detectors" than trained ones).
_MAIN_CENTER = (0.2, 0.8)  # centre range, fraction of the image side
_MAIN_SCALE = (0.14, 0.22)  # r range, fraction of the image side
_DISTRACTOR_CENTER = (0.05, 0.95)
_DISTRACTOR_SCALE = (0.045, 0.075)  # well below the main object's, so the class stays the main object's shape
_RIM_FRACTION, _RIM_MIN_PX = 0.2, 1.0  # rim band width = max(1 px, 0.2 r)
_CORNER_RADIUS = 0.4  # corner region radius (units)
_SQUARE_HALF = 0.9
_TRIANGLE_RADIUS = 1.25
_STAR_OUTER, _STAR_INNER = 1.25, 0.625
_CROSS_LONG, _CROSS_HALF_WIDTH = 1.05, 0.32
_ELLIPSE_MAJOR = 1.25
_SEMI_RADIUS = 1.2
_SEMI_OFFSET = 4 * _SEMI_RADIUS / (3 * math.pi)  # flat edge sits this far from the centroid (the origin)
_HEART_SCALE, _HEART_SHIFT = 1.7, 0.5
# Landmarks other than the centre sit on the object's own axes, this far from its centre (units of r): points
# fixed to the object (like a bird's head or tail), so they move and turn with it. Every shape contains
# them (the tightest is the semicircle's flat edge at 0.51 below the centroid).
_LANDMARK_OFFSET = 0.45
_LANDMARK_FRAME = np.array([(0.0, -1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, 0.0)]) * _LANDMARK_OFFSET  # top bottom left right


def _regular(count: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(count) / count)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


_TRIANGLE = _regular(3, _TRIANGLE_RADIUS)
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular(5, _STAR_OUTER)
_STAR[1::2] = _regular(5, _STAR_INNER, -90.0 + 36.0)
_L, _W = _CROSS_LONG, _CROSS_HALF_WIDTH
# Convex vertices per shape (units); a corner region is the object within _CORNER_RADIUS of one.
_CORNERS: dict[str, np.ndarray] = {
    "circle": np.zeros((0, 2)),
    "ellipse": np.zeros((0, 2)),
    "square": np.array([(sx * _SQUARE_HALF, sy * _SQUARE_HALF) for sx in (-1, 1) for sy in (-1, 1)]),
    "triangle": _TRIANGLE,
    "star": _STAR[0::2],
    "cross": np.array([(sx * a, sy * b) for a, b in ((_L, _W), (_W, _L)) for sx in (-1, 1) for sy in (-1, 1)]),
    "semicircle": np.array([(-_SEMI_RADIUS, _SEMI_OFFSET), (_SEMI_RADIUS, _SEMI_OFFSET)]),
    "heart": np.array([(0.0, _HEART_SHIFT * _HEART_SCALE)]),
}
# Farthest object point from the origin (units): sizes the padded grid used for off-image landmarks.
_MAX_EXTENT = math.hypot(_SEMI_RADIUS, _SEMI_OFFSET)

# Layout of each image's uniform vector.
_SCENE_SLOTS = 8  # kind, background, background2, five scene parameters
_OBJECT_SLOTS = 12  # shape, cx, cy, r, theta, aspect, color, material, period, psi, phase1, phase2
_JITTER_SLOTS = len(COLOR_NAMES) * 3
_MAIN_AT = _SCENE_SLOTS
_JITTER_AT = _MAIN_AT + _OBJECT_SLOTS
_COUNT_AT = _JITTER_AT + _JITTER_SLOTS
_DISTRACTORS_AT = _COUNT_AT + 1
_OBJECT_KEYS = (
    "shape", "cx", "cy", "r", "theta", "aspect", "color", "material", "period", "psi", "phase1", "phase2",
)
_NOISE_PLANES = 4  # three per-channel noise planes + one for the "noise" scene texture
_CHUNK = 256  # items per cached block
_RENDER_PIECE = 64  # items rendered at once (bounds the renderer's temporary memory)


def _concepts() -> list[Concept]:
    rows = [Concept(_COLOR_BASE + i, f"{n}-c", "color", True) for i, n in enumerate(COLOR_NAMES)]
    rows += [Concept(_OBJECT_BASE + i, n, "object", True) for i, n in enumerate(SHAPE_NAMES)]
    rows += [Concept(_PART_BASE + i, n, "part", True) for i, n in enumerate(PART_NAMES)]
    rows += [Concept(_MATERIAL_BASE + i, n, "material", True) for i, n in enumerate(MATERIAL_NAMES)]
    rows += [Concept(_SCENE_BASE + i, f"{n}-s", "scene", False) for i, n in enumerate(SCENE_NAMES)]
    return rows


# Pattern pixels are mixed halfway towards this: white for dark colours, black for light ones.
_TINT_TARGET = np.where(PALETTE @ np.array([0.299, 0.587, 0.114]) < 128, 255.0, 0.0).astype(np.float32)
_PALETTE_DISTANCE = np.linalg.norm(PALETTE[:, None, :] - PALETTE[None, :, :], axis=2)
# Object colour c may sit on background b when both c and its pattern tint stand out from b.
_TINTED = 0.5 * (PALETTE + _TINT_TARGET[:, None])
_OBJECT_ALLOWED = (_PALETTE_DISTANCE > _OBJECT_VS_BACKGROUND) & (
    np.linalg.norm(_TINTED[None, :, :] - PALETTE[:, None, :], axis=2) > _TINT_VS_BACKGROUND
)  # [background, object]


def _choose(u: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Index of the ⌊u·k⌋-th allowed option per row (``allowed`` (N, C) bool, each row non-empty)."""
    counts = allowed.sum(axis=1)
    k = np.minimum((u * counts).astype(np.int64), counts - 1)
    return np.argmax(np.cumsum(allowed, axis=1) > k[:, None], axis=1)


def _uniform(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _object_params(
    u: np.ndarray, size: int, background: np.ndarray, center: tuple, scale: tuple, rotation: float
) -> dict:
    """Per-image object parameters from 12 uniform columns (see ``_OBJECT_SLOTS``); ``rotation`` in degrees."""
    return {
        "shape": np.minimum((u[:, 0] * len(SHAPE_NAMES)).astype(np.int64), len(SHAPE_NAMES) - 1),
        "cx": size * _uniform(u[:, 1], center),
        "cy": size * _uniform(u[:, 2], center),
        "r": size * _uniform(u[:, 3], scale),
        "theta": math.radians(rotation) * (2 * u[:, 4] - 1),
        "aspect": 0.45 + 0.15 * u[:, 5],
        "color": _choose(u[:, 6], _OBJECT_ALLOWED[background]),
        "material": np.minimum((u[:, 7] * len(MATERIAL_NAMES)).astype(np.int64), len(MATERIAL_NAMES) - 1),
        "period": size * (0.09 + 0.06 * u[:, 8]),
        "psi": math.pi * u[:, 9],
        "phase1": u[:, 10],
        "phase2": u[:, 11],
    }


# ----------------------------------------------------------------------------------------------------------------
# Signed distance fields, in units of r, negative inside. u, v: (n, h, w) float32 in the object frame.


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Exact SDF of a simple polygon (crossing-number sign), after Inigo Quilez's ``sdPolygon``."""
    vertices = vertices.astype(np.float32)
    dist2 = (u - vertices[0, 0]) ** 2 + (v - vertices[0, 1]) ** 2
    inside = np.zeros(u.shape, dtype=bool)
    for i in range(len(vertices)):
        (xi, yi), (xj, yj) = vertices[i], vertices[i - 1]
        ex, ey = xj - xi, yj - yi
        wx, wy = u - xi, v - yi
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        above_i, below_j, left = v >= yi, v < yj, ex * wy > ey * wx
        inside ^= (above_i & below_j & left) | ~(above_i | below_j | left)
    return np.where(inside, -1, 1).astype(np.float32) * np.sqrt(dist2)


def _ellipse(u: np.ndarray, v: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    """First-order SDF f/|∇f| of the ellipse with semi-axes (1.25, 1.25·aspect)."""
    a, b = _ELLIPSE_MAJOR, _ELLIPSE_MAJOR * aspect
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    h = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
    ratio = np.where(h > 1e-6, q / np.maximum(h, 1e-6), b)
    return (q - 1) * ratio


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact heart SDF (Quilez's ``sdHeart``), cusp pointing to +v, centroid near the origin."""
    s = _HEART_SCALE
    px, py = np.abs(u) / s, _HEART_SHIFT - v / s
    lobe = np.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - math.sqrt(2.0) / 4.0
    m = 0.5 * np.maximum(px + py, 0)
    lower = np.sqrt(np.minimum(px**2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
    return np.where(py + px > 1, lobe, lower) * s


def _shape_field(name: str, u: np.ndarray, v: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    if name == "circle":
        return np.sqrt(u * u + v * v) - 1
    if name == "ellipse":
        return _ellipse(u, v, aspect)
    if name == "square":
        return _box(u, v, _SQUARE_HALF, _SQUARE_HALF)
    if name == "triangle":
        return _polygon(u, v, _TRIANGLE)
    if name == "star":
        return _polygon(u, v, _STAR)
    if name == "cross":
        return np.minimum(_box(u, v, _L, _W), _box(u, v, _W, _L))
    if name == "semicircle":
        return np.maximum(np.sqrt(u * u + (v - _SEMI_OFFSET) ** 2) - _SEMI_RADIUS, v - _SEMI_OFFSET)
    if name == "heart":
        return _heart(u, v)
    raise AssertionError(name)


def _near_corner(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    corners = _CORNERS[name].astype(np.float32)
    near = np.zeros(u.shape, dtype=bool)
    for cu, cv in corners:
        near |= (u - cu) ** 2 + (v - cv) ** 2 < _CORNER_RADIUS**2
    return near


def _render_objects(p: dict, x0: np.ndarray, y0: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """Draw one object per image in a ``window``×``window`` pixel block whose top-left pixel is (x0, y0).

    Pixel centres sit at integer + 0.5 image coordinates, so a pixel's value does not depend on the window.
    Returns ``inside`` (n, window, window) bool, ``pattern`` (the material's tinted pixels), ``rim`` and
    ``corner`` masks (all false outside the object).
    """
    f32 = np.float32
    col = lambda a: np.asarray(a, dtype=f32)[:, None, None]  # noqa: E731 — per-image scalar → broadcastable
    steps = np.arange(window)
    xs = ((x0[:, None] + steps).astype(f32) + f32(0.5))[:, None, :]
    ys = ((y0[:, None] + steps).astype(f32) + f32(0.5))[:, :, None]
    cos_t, sin_t = col(np.cos(p["theta"])), col(np.sin(p["theta"]))
    du, dv = xs - col(p["cx"]), ys - col(p["cy"])
    u_px, v_px = du * cos_t + dv * sin_t, dv * cos_t - du * sin_t  # object frame, pixels
    radius = col(p["r"])
    u, v = u_px / radius, v_px / radius
    field = np.empty(u.shape, dtype=f32)
    corner = np.zeros(u.shape, dtype=bool)
    for shape_id, name in enumerate(SHAPE_NAMES):
        rows = np.flatnonzero(p["shape"] == shape_id)
        if rows.size == 0:
            continue
        su, sv = u[rows], v[rows]
        field[rows] = _shape_field(name, su, sv, col(p["aspect"][rows]))
        if len(_CORNERS[name]):
            corner[rows] = _near_corner(name, su, sv)
    inside = field < 0
    rim = field * radius > -np.maximum(f32(_RIM_MIN_PX), f32(_RIM_FRACTION) * radius)

    cos_p, sin_p = col(np.cos(p["psi"])), col(np.sin(p["psi"]))
    period = col(p["period"])
    a = (u_px * cos_p + v_px * sin_p) / period + col(p["phase1"])
    b = (v_px * cos_p - u_px * sin_p) / period + col(p["phase2"])
    pattern = np.zeros(u.shape, dtype=bool)
    for material_id, name in enumerate(MATERIAL_NAMES):
        rows = np.flatnonzero(p["material"] == material_id)
        if rows.size == 0 or name == "solid":
            continue
        ra, rb = a[rows], b[rows]
        if name == "stripes":
            pattern[rows] = ra - np.floor(ra) < 0.5
        elif name == "dots":
            pattern[rows] = (ra - np.floor(ra) - 0.5) ** 2 + (rb - np.floor(rb) - 0.5) ** 2 < 0.3**2
        else:  # checker
            pattern[rows] = (np.floor(ra) + np.floor(rb)) % 2 == 1
    return {"inside": inside, "pattern": pattern & inside, "rim": rim & inside, "corner": corner & inside}


def _render_scene(p: dict, size: int, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background palette index (n, S, S) int16 and brightness modulation (n, S, S) float32."""
    f32 = np.float32
    n = p["scene"].shape[0]
    xs = (np.arange(size, dtype=f32) + f32(0.5))[None, None, :]
    ys = (np.arange(size, dtype=f32) + f32(0.5))[None, :, None]
    col = lambda a: np.asarray(a, dtype=f32)[:, None, None]  # noqa: E731
    index = np.broadcast_to(p["background"][:, None, None].astype(np.int16), (n, size, size)).copy()
    modulation = np.ones((n, size, size), dtype=f32)
    a, b, c, d, e = (p["scene_params"][:, k] for k in range(5))
    for scene_id, name in enumerate(SCENE_NAMES):
        rows = np.flatnonzero(p["scene"] == scene_id)
        if rows.size == 0 or name == "plain":
            continue
        ra, rb, rc, rd, re = (col(x[rows]) for x in (a, b, c, d, e))
        second = col(p["background2"][rows]).astype(np.int16)
        if name == "gradient":
            angle = 2 * np.pi * ra
            t = ((xs / size - 0.5) * np.cos(angle) + (ys / size - 0.5) * np.sin(angle)) * f32(math.sqrt(2)) + 0.5
            modulation[rows] = 0.5 + 0.5 * np.clip(t, 0, 1)
        elif name == "noise":
            modulation[rows] = 0.8 + 0.2 * np.clip(texture[rows], -2, 2)
        elif name == "grid":
            period = size * (0.14 + 0.1 * ra)
            width = np.maximum(f32(1), size * (0.016 + 0.016 * rb))
            line = ((xs + rc * period) % period < width) | ((ys + rd * period) % period < width)
            index[rows] = np.where(line, second, index[rows])
        elif name == "horizon":
            height = size * (0.35 + 0.3 * ra)
            ground = ys > height + 0.6 * (rb - 0.5) * (xs - size / 2)
            index[rows] = np.where(ground, second, index[rows])
        else:  # clouds: two crossed low-frequency waves
            angle = 2 * np.pi * rb
            along = xs * np.cos(angle) + ys * np.sin(angle)
            across = ys * np.cos(angle) - xs * np.sin(angle)
            wave1 = np.sin(along * (2 * np.pi * (1.5 + 2 * ra) / size) + 2 * np.pi * rc)
            wave2 = np.sin(across * (2 * np.pi * (1.5 + 2 * re) / size) + 2 * np.pi * rd)
            modulation[rows] = 0.8 + 0.1 * (wave1 + wave2)
    return index, modulation


def _axis_landmarks(p: dict) -> np.ndarray:
    """Top, bottom, left, right landmarks (n, 4, 2) as (x, y): points on the object's own axes.

    Object-frame point ``(u, v)`` (units of r; ``v`` grows downwards when upright) maps to image coordinates
    ``x = cx + r (u cos θ − v sin θ)``, ``y = cy + r (u sin θ + v cos θ)`` — the inverse of the frame
    rotation in :func:`_render_objects`.
    """
    cos_t, sin_t = np.cos(p["theta"])[:, None], np.sin(p["theta"])[:, None]
    u, v = _LANDMARK_FRAME[None, :, 0], _LANDMARK_FRAME[None, :, 1]
    r = p["r"][:, None]
    out = np.empty((p["r"].shape[0], 4, 2), dtype=np.float64)
    out[..., 0] = p["cx"][:, None] + r * (u * cos_t - v * sin_t)
    out[..., 1] = p["cy"][:, None] + r * (u * sin_t + v * cos_t)
    return out


#: per-process bytes of rendered blocks kept for reuse, label maps narrowed (the demo's 4000 64-px items: 125 MiB)
BLOCK_CACHE_BYTES = 512 << 20
_BLOCK_CACHE: "OrderedDict[tuple[str, int], Batch]" = OrderedDict()
_BLOCK_CACHE_USED = 0
_BLOCK_LOCK = threading.Lock()


def clear_block_cache() -> None:
    """Drop every cached block of this process."""
    global _BLOCK_CACHE_USED
    with _BLOCK_LOCK:
        _BLOCK_CACHE.clear()
        _BLOCK_CACHE_USED = 0


def _batch_bytes(batch: Batch) -> int:
    arrays = [batch.index, batch.images, batch.landmarks, batch.landmark_visible, batch.class_label,
              *batch.pixel_labels.values(), *batch.image_labels.values()]
    return sum(int(a.nbytes) for a in arrays if a is not None)


def _narrow(labels: np.ndarray) -> np.ndarray:
    """``labels`` in the smallest unsigned dtype that holds them (uint8 for this world's < 256 labels), else as
    they are: a cached block's int32 label maps are 4× larger than their information."""
    if labels.size == 0 or labels.dtype.kind not in "iu":
        return labels
    low, high = int(labels.min()), int(labels.max())
    for dtype in (np.uint8, np.uint16):
        if low >= 0 and high <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    return labels


def _compact(batch: Batch) -> Batch:
    """The form a block is cached in: label maps narrowed (:func:`_narrow`); :func:`_gather` widens them back
    to the Batch contract's int32, so a cached and a freshly rendered load hold the same values and dtypes."""
    return dataclasses.replace(batch, pixel_labels={k: _narrow(v) for k, v in batch.pixel_labels.items()},
                               image_labels={k: _narrow(v) for k, v in batch.image_labels.items()})


def _gather(parts: list[Batch], where: np.ndarray, index: np.ndarray, label_dtype: Any = np.int32) -> Batch:
    """Rows ``where`` of the concatenation of ``parts`` (fresh arrays, never views of a cached block); label
    maps come out as ``label_dtype`` (the Batch contract's int32) whatever a cached part holds them in, or in
    the parts' common dtype when it is None."""
    offsets = np.cumsum([0] + [len(b) for b in parts])
    # which output rows each part supplies, and from where in it: the same for every field
    sources = [(rows, where[rows] - start) for start, stop in zip(offsets[:-1], offsets[1:])
               for rows in [np.flatnonzero((where >= start) & (where < stop))]]

    def take(arrays: list[np.ndarray], dtype: Any = None) -> np.ndarray:
        dtype = np.result_type(*arrays) if dtype is None else dtype
        if len(arrays) == 1:
            return arrays[0][where].astype(dtype, copy=False)
        out = np.empty((where.size, *arrays[0].shape[1:]), dtype=dtype)
        for (rows, src), array in zip(sources, arrays):
            out[rows] = array[src]  # one copy, widened on the way
        return out

    first = parts[0]
    return Batch(
        index=index.copy(),
        images=take([b.images for b in parts]),
        pixel_labels={k: take([b.pixel_labels[k] for b in parts], label_dtype) for k in first.pixel_labels},
        image_labels={k: take([b.image_labels[k] for b in parts], label_dtype) for k in first.image_labels},
        landmarks=take([b.landmarks for b in parts]),
        landmark_visible=take([b.landmark_visible for b in parts]),
        class_label=take([b.class_label for b in parts]),
    )


@register_dataset("synthetic")
class SyntheticWorld(ConceptDataset):
    """The procedural concept world (see the module docstring for what is drawn).

    Args:
        images: number of items (indexes ``0 .. images-1``).
        size: image side S in pixels (images are S×S; default 64).
        seed: world seed; item ``i`` depends only on ``(seed, i)`` and the other parameters.
        seg_scale: label maps are at ``S / seg_scale`` (nearest sample of the full-resolution labels,
            like Broden's downscaled maps); must divide ``size``. Default 1 = image resolution.
        distractors: maximum number of small distractor objects per image (drawn uniformly in
            ``0 .. distractors``; they occlude the main object and carry their own labels).
        noise: standard deviation of the per-pixel, per-channel noise in intensity levels (uniform
            distribution; 0 = none; labels never depend on it).
        rotation: the main object is turned by a uniform angle in ``[-rotation, +rotation]`` degrees from
            upright (default 15; 180 = any orientation). Upright-ish objects, like photographed ones, keep
            the shape class learnable from a few thousand images and give landmarks such as ``top`` a
            stable meaning; distractors always take any orientation.
        task: the class label: ``"shape"`` (default; the main object's shape, 8 classes) or
            ``"shape_material"`` (its shape and fill material jointly, ``shape · 4 + material``, 32 classes
            named ``<shape>_<material>``). Images and masks do not depend on it.
    """

    kind = "synthetic"

    def __init__(
        self,
        images: int = 4000,
        size: int = 64,
        seed: int = 0,
        seg_scale: int = 1,
        distractors: int = 2,
        noise: float = 5.0,
        rotation: float = 15.0,
        task: str = "shape",
    ) -> None:
        self.images = check_int("images", images, low=1)
        self.size = check_int("size", size, low=16, high=2048, fix="16 px is the smallest legible world")
        self.seed = check_int("seed", seed, low=0)
        self.seg_scale = check_int("seg_scale", seg_scale, low=1)
        if self.size % self.seg_scale:
            raise DatasetError(
                f"dataset parameter seg_scale={seg_scale!r} does not divide size={size}; "
                "use a divisor of the image size (1, 2, 4, …)"
            )
        self.distractors = check_int("distractors", distractors, low=0, high=8)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (0 <= float(noise) < 256):
            raise DatasetError(f"dataset parameter noise={noise!r} is invalid; use a number in [0, 256) (0 = none)")
        self.noise = float(noise)
        if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not (0 <= float(rotation) <= 180):
            raise DatasetError(
                f"dataset parameter rotation={rotation!r} is invalid; use degrees in [0, 180] (180 = any orientation)"
            )
        self.rotation = float(rotation)
        if task not in TASKS:
            raise DatasetError(f"dataset parameter task={task!r} is invalid; use one of {', '.join(TASKS)}")
        self.task = task
        # Half-sides of the drawing windows: the whole shape fits, with a pixel to spare.
        self._main_half = int(math.ceil(_MAX_EXTENT * _MAIN_SCALE[1] * self.size)) + 1
        self._distractor_half = int(math.ceil(_MAX_EXTENT * _DISTRACTOR_SCALE[1] * self.size)) + 1
        self._concepts = _concepts()
        self._block_key = self.digest()

    # --------------------------------------------------------------------------------------------- protocol

    def __len__(self) -> int:
        return self.images

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def seg_size(self) -> tuple[int, int]:
        side = self.size // self.seg_scale
        return side, side

    @property
    def concepts(self) -> list[Concept]:
        return list(self._concepts)

    @property
    def landmark_names(self) -> list[str]:
        return list(LANDMARK_NAMES)

    @property
    def class_names(self) -> list[str]:
        if self.task == "shape_material":
            return [f"{shape}_{material}" for shape in SHAPE_NAMES for material in MATERIAL_NAMES]
        return list(SHAPE_NAMES)

    def params(self) -> dict[str, Any]:
        """The constructor parameters (what the digest covers, besides the generator version)."""
        return {
            "images": self.images, "size": self.size, "seed": self.seed, "seg_scale": self.seg_scale,
            "distractors": self.distractors, "noise": self.noise, "rotation": self.rotation,
            # only where it differs from the default, so the default world's digest (and every cache key
            # built on it) predates the parameter and stays valid
            **({"task": self.task} if self.task != "shape" else {}),
        }

    def digest(self) -> str:
        return canonical_digest({"kind": self.kind, "generator": GENERATOR_VERSION, "params": self.params()})

    def load(self, indices: np.ndarray) -> Batch:
        """Render (or fetch from the block cache) the items at ``indices``; the arrays are always fresh copies.

        Items live in aligned blocks of ``_CHUNK`` indexes. A block the request covers by at least a quarter
        (a shard, a forward batch) is rendered whole and kept in a per-process LRU cache of
        :data:`BLOCK_CACHE_BYTES`, so the stages that read the same shard in one worker (extraction, every
        instance's and layer's IoU tally and stability) render it once; scattered requests (exemplars)
        render just their items. Either way item ``i``'s bytes are the same (per-item determinism).
        """
        index = self._check_indices(indices)
        if index.size == 0:
            return self._render(index)
        blocks, counts = np.unique(index // _CHUNK, return_counts=True)
        parts, where = [], np.empty(index.size, dtype=np.int64)
        offset = 0
        for block, count in zip(blocks.tolist(), counts.tolist()):
            start = block * _CHUNK
            size = min(_CHUNK, self.images - start)
            mine = np.flatnonzero(index // _CHUNK == block)
            cached = self._cached_block(block, render=4 * count >= size)
            if cached is None:
                parts.append(self._render(index[mine]))
                where[mine] = offset + np.arange(mine.size)
            else:
                parts.append(cached)
                where[mine] = offset + (index[mine] - start)
            offset += len(parts[-1])
        return _gather(parts, where, index)

    def _cached_block(self, block: int, render: bool) -> Batch | None:
        key = (self._block_key, block)
        with _BLOCK_LOCK:
            hit = _BLOCK_CACHE.get(key)
            if hit is not None:
                _BLOCK_CACHE.move_to_end(key)
                return hit
        if not render:
            return None
        start = block * _CHUNK
        compact = self._render_compact(np.arange(start, min(start + _CHUNK, self.images), dtype=np.int64))
        nbytes = _batch_bytes(compact)
        global _BLOCK_CACHE_USED
        with _BLOCK_LOCK:
            if key not in _BLOCK_CACHE and nbytes <= BLOCK_CACHE_BYTES:
                _BLOCK_CACHE[key] = compact
                _BLOCK_CACHE_USED += nbytes
                while _BLOCK_CACHE_USED > BLOCK_CACHE_BYTES:
                    _, old = _BLOCK_CACHE.popitem(last=False)
                    _BLOCK_CACHE_USED -= _batch_bytes(old)
        return compact

    def _render_compact(self, index: np.ndarray) -> Batch:
        """:meth:`_render` in pieces of :data:`_RENDER_PIECE` items, each narrowed (:func:`_compact`) before the
        next is drawn: the renderer's float temporaries scale with the items drawn at once (a 256-item block at
        64 px peaked at 114 MiB, 64 items at 29 MiB; no slower), and the int32 label maps never pile up (a
        t-SNE load touching all 16 of the demo's blocks held 392 MiB of them). Item bytes do not depend on the
        piece (per-item determinism)."""
        pieces = [_compact(self._render(index[i:i + _RENDER_PIECE])) for i in range(0, index.size, _RENDER_PIECE)]
        if len(pieces) == 1:
            return pieces[0]
        return _gather(pieces, np.arange(index.size), index, label_dtype=None)

    # ------------------------------------------------------------------------------------------- generation

    def _class_label(self, params: dict) -> np.ndarray:
        """The task's class of each item from its drawn parameters (shape, or shape · 4 + material)."""
        if self.task == "shape_material":
            return (params["shape"] * len(MATERIAL_NAMES) + params["material"]).astype(np.int64)
        return params["shape"].astype(np.int64)

    def scene_parameters(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The drawn parameters of the items at ``indices`` (what the renderer uses), for tests and captions.

        Keys: ``scene``, ``background``, ``background2`` (palette indexes), ``scene_params`` (n, 5),
        ``palette`` (n, 11, 3) jittered RGB, ``distractor_count``; main-object arrays ``shape``, ``cx``,
        ``cy`` (pixels), ``r`` (pixels), ``theta`` (radians), ``aspect``, ``color``,
        ``material``, ``period``, ``psi``, ``phase1``, ``phase2``; the same per distractor slot with a
        ``distractor_`` prefix, shaped (n, distractors), plus ``distractor_active`` (n, distractors).
        """
        index = self._check_indices(indices)
        return self._draw(index)[0]

    def _check_indices(self, indices: Any) -> np.ndarray:
        index = np.asarray(indices)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise DatasetError(
                f"indices must be a 1-D integer array, got shape {index.shape} dtype {index.dtype}; "
                "pass e.g. np.arange(start, stop)"
            )
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.images):
            bad = index[(index < 0) | (index >= self.images)][0]
            raise DatasetError(f"index {int(bad)} is out of range for a synthetic world of {self.images} images")
        return index

    def _draw(self, index: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-image parameters and noise fields, each item from its own ``(seed, index)`` stream."""
        n, size = index.size, self.size
        slots = _DISTRACTORS_AT + _OBJECT_SLOTS * self.distractors
        uniforms = np.empty((n, slots), dtype=np.float64)
        noise_bytes = np.empty((n, _NOISE_PLANES * size * size), dtype=np.uint8)
        for row, item in enumerate(index.tolist()):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, item])))
            uniforms[row] = rng.random(slots)
            noise_bytes[row] = np.frombuffer(rng.bytes(noise_bytes.shape[1]), dtype=np.uint8)
        # Uniform noise with unit variance (random bytes are ~10× cheaper than Gaussian draws).
        noise = (noise_bytes.astype(np.float32) - np.float32(127.5)) * np.float32(math.sqrt(12.0) / 256.0)
        noise = noise.reshape(n, _NOISE_PLANES, size, size)
        u = uniforms
        background = np.minimum((u[:, 1] * len(COLOR_NAMES)).astype(np.int64), len(COLOR_NAMES) - 1)
        params: dict[str, np.ndarray] = {
            "scene": np.minimum((u[:, 0] * len(SCENE_NAMES)).astype(np.int64), len(SCENE_NAMES) - 1),
            "background": background,
            "background2": _choose(u[:, 2], _PALETTE_DISTANCE[background] > _BACKGROUND2_VS_BACKGROUND),
            "scene_params": u[:, 3:8],
            "palette": (PALETTE[None] + _COLOR_JITTER * (2 * u[:, _JITTER_AT:_COUNT_AT] - 1).reshape(n, -1, 3)),
            "distractor_count": np.minimum(
                (u[:, _COUNT_AT] * (self.distractors + 1)).astype(np.int64), self.distractors
            ),
        }
        params.update(
            _object_params(u[:, _MAIN_AT:_JITTER_AT], size, background, _MAIN_CENTER, _MAIN_SCALE, self.rotation)
        )
        slot_params = [
            _object_params(u[:, at : at + _OBJECT_SLOTS], size, background, _DISTRACTOR_CENTER, _DISTRACTOR_SCALE, 180)
            for at in range(_DISTRACTORS_AT, slots, _OBJECT_SLOTS)
        ]
        for key in _OBJECT_KEYS:
            stacked = [sp[key] for sp in slot_params]
            params[f"distractor_{key}"] = np.stack(stacked, axis=1) if stacked else np.zeros((n, 0), params[key].dtype)
        params["distractor_active"] = np.arange(self.distractors)[None, :] < params["distractor_count"][:, None]
        return params, noise

    def _render(self, index: np.ndarray) -> Batch:
        f32 = np.float32
        size, n = self.size, index.size
        params, noise = self._draw(index)
        background_index, modulation = _render_scene(params, size, noise[:, 3])
        # Objects are drawn in windows around their centres (large enough for the whole shape), then pasted
        # into per-pixel slot maps.
        owner = np.zeros((n, size, size), dtype=np.int8)  # 0 background, 1 main object, 2.. distractors
        flags = {key: np.zeros((n, size, size), dtype=bool) for key in ("pattern", "rim", "corner")}

        def paste(rows: np.ndarray, x0: np.ndarray, y0: np.ndarray, drawn: dict, slot: int) -> None:
            inside = drawn["inside"]
            k, i, j = np.nonzero(inside)
            y, x = y0[k] + i, x0[k] + j
            on_image = (y >= 0) & (y < size) & (x >= 0) & (x < size)
            flat = ((rows[k] * size + y) * size + x)[on_image]
            owner.reshape(-1)[flat] = slot
            for key, target in flags.items():
                target.reshape(-1)[flat] = drawn[key][inside][on_image]

        all_rows = np.arange(n)
        half = self._main_half
        main_x0 = np.floor(params["cx"]).astype(np.int64) - half
        main_y0 = np.floor(params["cy"]).astype(np.int64) - half
        drawn = _render_objects(params, main_x0, main_y0, 2 * half + 2)
        paste(all_rows, main_x0, main_y0, drawn, 1)

        half = self._distractor_half
        for slot in range(self.distractors):
            rows = np.flatnonzero(params["distractor_active"][:, slot])
            if rows.size == 0:
                continue
            p = {key: params[f"distractor_{key}"][rows, slot] for key in _OBJECT_KEYS}
            x0 = np.floor(p["cx"]).astype(np.int64) - half
            y0 = np.floor(p["cy"]).astype(np.int64) - half
            paste(rows, x0, y0, _render_objects(p, x0, y0, 2 * half + 2), slot + 2)

        # Per-pixel labels: look the owner slot up in per-image slot tables (slot 0 = background).
        slots = 2 + self.distractors
        slot_index = (np.arange(n) * slots)[:, None, None] + owner

        def lookup(key: str) -> np.ndarray:
            main = params[key][:, None]
            table = np.concatenate([np.zeros_like(main), main, params[f"distractor_{key}"].astype(main.dtype)], 1)
            return table.reshape(-1)[slot_index]

        has_object = owner > 0
        color_index = np.where(has_object, lookup("color"), background_index)
        object_map = np.where(has_object, _OBJECT_BASE + lookup("shape"), 0)
        material_map = np.where(has_object, _MATERIAL_BASE + lookup("material"), 0)
        part_maps = np.stack(
            [np.where(has_object, np.where(flags["rim"], _RIM, _CORE), 0), np.where(flags["corner"], _CORNER, 0)],
            axis=1,
        )

        # Pixels: palette colour × scene modulation; objects are flat, their material pattern tinted.
        colors = len(COLOR_NAMES)
        palette = params["palette"].astype(f32).transpose(0, 2, 1).reshape(-1)  # (n · 3 · colours,)
        channel_base = (np.arange(n)[:, None] * 3 + np.arange(3)[None, :]) * colors
        rgb = palette[channel_base[:, :, None, None] + color_index[:, None]]  # (n, 3, S, S)
        rgb *= np.where(has_object, f32(1), modulation)[:, None]
        tinted = (has_object & flags["pattern"])[:, None]
        rgb = np.where(tinted, f32(0.5) * (rgb + _TINT_TARGET[color_index][:, None]), rgb)
        if self.noise:
            rgb += f32(self.noise) * noise[:, :3]
        images = np.rint(np.clip(rgb, 0, 255)).astype(np.uint8)

        # Landmarks: centre (analytic anchor, always inside the shape) + four points on the object's axes.
        landmarks = np.empty((n, len(LANDMARK_NAMES), 2), dtype=np.float64)
        landmarks[:, 0, 0], landmarks[:, 0, 1] = params["cx"], params["cy"]
        landmarks[:, 1:] = _axis_landmarks(params)
        landmarks = landmarks.astype(np.float32)  # visibility is judged on the coordinates handed out
        px, py = np.floor(landmarks[..., 0]).astype(np.int64), np.floor(landmarks[..., 1]).astype(np.int64)
        in_image = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        visible = in_image & (owner[np.arange(n)[:, None], np.clip(py, 0, size - 1), np.clip(px, 0, size - 1)] == 1)

        s, o = self.seg_scale, self.seg_scale // 2
        sample = lambda m: np.ascontiguousarray(m[..., o::s, o::s]).astype(np.int32)  # noqa: E731
        return Batch(
            index=index,
            images=images,
            pixel_labels={
                "color": sample(color_index[:, None] + _COLOR_BASE),
                "object": sample(object_map[:, None]),
                "part": sample(part_maps),
                "material": sample(material_map[:, None]),
            },
            image_labels={"scene": (_SCENE_BASE + params["scene"][:, None]).astype(np.int32)},
            landmarks=landmarks,
            landmark_visible=visible,
            class_label=self._class_label(params),
        )
