"""IoU tally of Network Dissection: per (unit, concept) intersection, unit on-area and concept area.

Per image, each unit's H×W map is upsampled bilinearly to the label resolution (sh, sw), binarised with the
unit's threshold (``> T``, strict as in the reference), and counted against the pixel labels
(Bau et al., CVPR 2017):

* ``I[u, l]`` (intersection): on-pixels of ``u`` carrying label ``l``, summed over every label layer of every
  pixel-level category; a whole-image label counts every on-pixel of the image (a full mask).
* ``A[u, c]`` (activation): on-pixels of ``u`` over the images *relevant* to category ``c`` — those where any
  label whose category (``Concept.category``, its primary category) is ``c`` is present. This is the
  original NetDissect / quick-netdissect rule, not NetDissect-Lite's intersection test.
* ``G[l]`` (truth): pixels carrying ``l``; a whole-image label adds sh·sw per image. Label 0 is "unlabelled".
* ``IoU[u, l] = I / (A[u, cat(l)] + G[l] − I)``, 0 where the union is empty (never NaN).

Upsampling (:func:`upsample_bilinear`) is bilinear with half-pixel centres and edge clamping — the geometry
and weights of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` — evaluated by one
fixed float32 formula, so results are the same on CPU and GPU; it agrees with ``interpolate`` to float
rounding (a pixel within an ulp of ``T`` can differ).

The constraint that shaped it: the reference loops over images and units in Python and upsamples every map;
here upsampling is *sparse* and the counting runs in one of two kernels that count the same pixels. A
bilinear pixel is a convex combination of the 2×2 cells around it, so it can only exceed ``T`` when one of
those cells does: only such "quads" are evaluated (a 2⁻¹⁸ relative safety margin makes the pruning exact),
which at the usual top-0.5 % threshold skips ~98 % of the pixels. A quad whose pixels all carry one label (in
a layer) adds its on-count to that label; only mixed quads look up labels per on-pixel. All counts are int64
and merge by addition, exactly.

* ``compiled`` (the CPU default, ``_iou_kernels``): Numba loops that read each activation once, visit only
  the quads around cells above the bound, skip (or take whole) quad rows whose two ends are below (or
  safely above) ``T``, and increment the counters in place; one core, no temporaries per pixel.
* ``torch`` (GPUs): the same quads as index tensors — hot-quad ``nonzero``, gathered corners, a bincount
  over (unit, label) for mixed quads, scatter-adds — in blocks of ``block_pixels``. On a CPU it is several
  times slower than the compiled loops (it materialises every evaluated pixel); the tests hold the two to
  exact equality. Its many medium-sized tensor operations gain little from intra-op threads and suffer on
  an oversubscribed CPU; CPU workers run with ``torch.set_num_threads(1)``.

Public: :class:`IoUTally` (the mergeable statistic), :func:`iou_tables` (unit_label / units / summary
tables), :func:`upsample_bilinear` (the upsampling the tally thresholds).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from repdissect.datasets import Batch, Concept

from ._errors import StageInputError
from ._streaming import StreamingStatistic, pack_arrays, unpack_arrays

__all__ = ["DEFAULT_IOU_THRESHOLD", "IoUTally", "iou_tables", "upsample_bilinear"]

DEFAULT_IOU_THRESHOLD = 0.04
# Relative margin of the quad pre-filter: a float32 convex combination of corners ≤ T·(1 − 2⁻¹⁸) cannot exceed T.
_PRUNE_MARGIN = 2.0**-18


# ------------------------------------------------------------------------------------------- upsampling


@dataclass(frozen=True)
class _Axis:
    """Bilinear geometry along one axis, ``n_in`` cells → ``n_out`` pixels (align_corners=False).

    Pixels sharing a lower corner cell form runs; runs are cut into *segments* of at most
    ⌈n_out / n_in⌉ pixels so that a padded (segments × slots) layout wastes little. A 2-D quad is a
    (row segment, column segment) pair: its pixels depend on the 2×2 cells (lower, upper) of both.
    """

    base: np.ndarray  # (n_out,) lower corner cell of each pixel
    upper: np.ndarray  # (n_in,) upper corner cell of a lower corner: min(a + 1, n_in − 1)
    w_lo: np.ndarray  # (n_out,) float32 weight of the lower corner
    w_hi: np.ndarray  # (n_out,) float32 weight of the upper corner
    seg_base: np.ndarray  # (S,) lower corner cell of each segment
    seg_start: np.ndarray  # (S,) first pixel of each segment (segments are consecutive pixel runs)
    seg_count: np.ndarray  # (S,) pixels in each segment
    seg_pixels: np.ndarray  # (S, m) pixel indexes; padding repeats the segment's first pixel
    seg_w_lo: np.ndarray  # (S, m) float32 weights, NaN in padding (a NaN value is never "on")
    seg_w_hi: np.ndarray  # (S, m)


@lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int) -> _Axis:
    # torch's area_pixel_compute_source_index: scale · (dst + 0.5) − 0.5, clamped at 0, in float32.
    scale = np.float32(n_in) / np.float32(n_out)
    source = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    base = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    w_hi = np.clip(source - base.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w_lo = (np.float32(1) - w_hi).astype(np.float32)
    upper = np.minimum(np.arange(n_in) + 1, n_in - 1)
    slots = -(-n_out // n_in)
    # A new segment starts where the lower corner changes or the current one is full.
    run_start = np.r_[True, base[1:] != base[:-1]]
    run_id = np.cumsum(run_start) - 1
    offset = np.arange(n_out) - np.flatnonzero(run_start)[run_id]
    starts = np.flatnonzero(run_start | (offset % slots == 0))
    counts = np.diff(np.r_[starts, n_out])
    position = np.arange(slots)
    valid = position[None, :] < counts[:, None]
    pixels = np.where(valid, starts[:, None] + position[None, :], starts[:, None])
    nan = np.float32(np.nan)
    return _Axis(
        base, upper, w_lo, w_hi, base[starts], starts, counts, pixels,
        np.where(valid, w_lo[pixels], nan), np.where(valid, w_hi[pixels], nan),
    )


def _bilinear(lo_lo, hi_lo, lo_hi, hi_hi, wy_lo, wy_hi, wx_lo, wx_hi):
    """The single float32 formula of the dense and the sparse path (same operations, hence the same bits).

    Corners are named (row corner, column corner); rows are interpolated first, then columns.
    """
    left = lo_lo * wy_lo + hi_lo * wy_hi
    right = lo_hi * wy_lo + hi_hi * wy_hi
    return left * wx_lo + right * wx_hi


def upsample_bilinear(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(..., H, W)`` maps to ``(..., sh, sw)``, exactly as the IoU tally sees them.

    Geometry of ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres, edge clamp),
    computed in float32 by a fixed formula (equal to ``interpolate`` up to float rounding).

    Args:
        maps: ``(..., H, W)`` real array or tensor.
        size: ``(sh, sw)``.

    Returns:
        float32 tensor ``(..., sh, sw)`` on the input's device.
    """
    x = torch.as_tensor(maps).to(torch.float32)
    h, w = x.shape[-2:]
    ay, ax = _axis(int(h), int(size[0])), _axis(int(w), int(size[1]))
    dev = x.device

    def t(a):
        return torch.as_tensor(a, device=dev)

    rows_lo, rows_hi = x[..., t(ay.base), :], x[..., t(ay.upper[ay.base]), :]
    x_lo, x_hi = t(ax.base), t(ax.upper[ax.base])
    return _bilinear(
        rows_lo[..., x_lo], rows_hi[..., x_lo], rows_lo[..., x_hi], rows_hi[..., x_hi],
        t(ay.w_lo)[:, None], t(ay.w_hi)[:, None], t(ax.w_lo), t(ax.w_hi),
    )


def _prune_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """float32 bound below each threshold: a cell at or under it cannot make a neighbouring pixel exceed T."""
    t = thresholds.astype(np.float64)
    lower = (t - np.abs(t) * _PRUNE_MARGIN).astype(np.float32)
    return np.nextafter(lower, np.float32(-np.inf))


def _full_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """float32 bound above each threshold ``T ≥ 0``: a quad row whose two ends are ≥ it is on at every pixel.

    Every term is non-negative there, so float32 rounding (three roundings, relative 2⁻²⁴ each, weights
    summing to ≥ 1 − 2⁻²⁴) keeps a convex combination above ``bound · (1 − 2⁻²²)``, far above ``T`` given the
    2⁻¹⁸ margin. Negative thresholds get +inf (no shortcut): their rounding error is not relative to ``T``.
    """
    t = thresholds.astype(np.float64)
    upper = np.nextafter((t + np.abs(t) * _PRUNE_MARGIN).astype(np.float32), np.float32(np.inf))
    # Above float32's normal range floor, so no product of a value and its larger weight underflows.
    upper = np.maximum(upper, np.float32(2.0**-100))
    return np.where(t >= 0, upper, np.float32(np.inf)).astype(np.float32)


@dataclass(frozen=True)
class _QuadGeometry:
    """Segment-quad layout of one (H, W) → (sh, sw) upsampling, as tensors on the counting device."""

    y_lo: torch.Tensor  # (Sy,) lower / upper corner row of each row segment
    y_hi: torch.Tensor
    x_lo: torch.Tensor  # (Sx,)
    x_hi: torch.Tensor
    wy_lo: torch.Tensor  # (Sy, my), NaN padded
    wy_hi: torch.Tensor
    wx_lo: torch.Tensor  # (Sx, mx), NaN padded
    wx_hi: torch.Tensor
    quad_pixels: torch.Tensor  # (Sy, Sx, my·mx) flat pixel index of each quad slot (padding: a real pixel)

    @classmethod
    def build(cls, ay: _Axis, ax: _Axis, dev: torch.device) -> "_QuadGeometry":
        def t(a):
            return torch.as_tensor(a, device=dev)

        sw = len(ax.base)
        quad_pixels = ay.seg_pixels[:, None, :, None] * sw + ax.seg_pixels[None, :, None, :]  # Sy, Sx, my, mx
        return cls(
            t(ay.seg_base), t(ay.upper[ay.seg_base]), t(ax.seg_base), t(ax.upper[ax.seg_base]),
            t(ay.seg_w_lo), t(ay.seg_w_hi), t(ax.seg_w_lo), t(ax.seg_w_hi),
            t(quad_pixels.reshape(len(ay.seg_base), len(ax.seg_base), -1)),
        )

    @property
    def quad_size(self) -> int:
        return self.quad_pixels.shape[2]

    def count(self, quads, x, thresholds, cols_by_layer, uniform, width, on_count, pair_counts) -> None:
        """Evaluate a block of quads, add on-pixel counts per (image, unit) and per (unit, label column)."""
        n, c, h, w = x.shape
        image, unit, sy, sx = quads.unbind(1)
        flat = x.reshape(-1)
        plane = (image * c + unit) * (h * w)
        ylo, yhi, xlo, xhi = self.y_lo[sy] * w, self.y_hi[sy] * w, self.x_lo[sx], self.x_hi[sx]

        def corner(offset):
            return flat.index_select(0, plane + offset)[:, None, None]

        values = _bilinear(
            corner(ylo + xlo), corner(yhi + xlo), corner(ylo + xhi), corner(yhi + xhi),
            self.wy_lo[sy][:, :, None], self.wy_hi[sy][:, :, None],
            self.wx_lo[sx][:, None, :], self.wx_hi[sx][:, None, :],
        )
        on = (values > thresholds[unit][:, None, None]).reshape(len(quads), -1)  # NaN padding is never on
        per_quad = on.view(torch.uint8).sum(dim=1, dtype=torch.int32).to(torch.int64)  # ≈6× faster than bool sum
        on_count.index_add_(0, image * c + unit, per_quad)
        if uniform is None:
            return
        # One-label quads: the on-count goes to that label, no per-pixel work.
        label = uniform[image, :, sy, sx]  # (K, layers)
        uniform_mask = label >= 0
        keys = unit[:, None] * width + label
        pair_counts.index_add_(0, keys[uniform_mask], per_quad[:, None].expand_as(keys)[uniform_mask])
        # Mixed quads: per on-pixel labels, layer by layer (a quad is usually mixed in one layer only).
        slots = self.quad_size
        quad_base = (sy * self.quad_pixels.shape[1] + sx) * slots  # into the flat slot → pixel table
        image_base = image * (cols_by_layer.shape[1] // n)  # rows of one image: its pixels
        keys = []
        for layer in range(cols_by_layer.shape[0]):
            mixed = torch.nonzero(~uniform_mask[:, layer])[:, 0]
            if not len(mixed):
                continue
            k, slot = torch.nonzero(on[mixed]).unbind(1)
            k = mixed[k]
            pixel = self.quad_pixels.reshape(-1)[quad_base[k] + slot]
            labels = cols_by_layer[layer].index_select(0, image_base[k] + pixel)
            keys.append(unit[k] * width + labels)
        if keys:
            pair_counts += torch.bincount(torch.cat(keys), minlength=pair_counts.numel())


def _uniform_quads(pixel: np.ndarray, ay: _Axis, ax: _Axis) -> np.ndarray:
    """``(N, layers, Sy, Sx)``: each quad's label column when the whole quad carries one label, else −1."""
    rows, cols = ay.seg_start, ax.seg_start
    low = np.minimum.reduceat(np.minimum.reduceat(pixel, cols, axis=3), rows, axis=2)
    high = np.maximum.reduceat(np.maximum.reduceat(pixel, cols, axis=3), rows, axis=2)
    return np.where(low == high, low, -1).astype(np.int64)


# ------------------------------------------------------------------------------------------- the tally


def _check_concepts(concepts: Sequence[Concept]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not concepts:
        raise StageInputError("IoUTally: the concept list is empty; the dataset must describe its labels")
    labels = np.array([c.label for c in concepts], dtype=np.int64)
    if (labels < 1).any() or len(np.unique(labels)) != len(labels):
        raise StageInputError(f"IoUTally: concept labels must be unique numbers ≥ 1; got {labels.tolist()[:20]}")
    order = np.argsort(labels, kind="stable")
    categories: list[str] = []
    for c in concepts:
        if c.category not in categories:
            categories.append(c.category)
    label_category = np.array([categories.index(concepts[i].category) for i in order], dtype=np.int64)
    return labels[order], label_category, categories


def _nonfinite_error() -> StageInputError:
    return StageInputError("IoUTally.update: activations contain NaN/inf values; fix the extraction")


class IoUTally(StreamingStatistic):
    """Integer counts ``I (C, L)``, ``A (C, categories)``, ``G (L,)`` of Network Dissection, mergeable.

    Columns follow the concepts sorted by label number; categories are in first-appearance order of the
    concept list. The number of units is fixed by the first batch.

    Args:
        concepts: the dataset's concepts (label numbers ≥ 1, one category each).
        seg_size: ``(sh, sw)`` of the pixel label maps (the dataset's ``seg_size``); maps are upsampled to it.
        device: torch device for the counting (``"cpu"``, ``"cuda"``); execution only, not part of the state.
        chunk_images: torch kernel: images per step (memory ∝ chunk · (C·H·W + layers·sh·sw)). The compiled
            kernel takes a batch at once (extra memory: a float32 copy of non-float32 activations and an int32
            copy of the labels).
        block_pixels: torch kernel: upper bound on pixel evaluations held at once (float32 + bool each).
        kernel: ``"compiled"`` (the Numba loops of ``_iou_kernels``, CPU only), ``"torch"`` (vectorised torch,
            any device) or ``"auto"``: compiled on the CPU (torch where Numba is not installed), torch on a
            GPU. Both count the same pixels.
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        seg_size: tuple[int, int],
        device: str | torch.device = "cpu",
        chunk_images: int = 32,
        block_pixels: int = 2**22,
        kernel: str = "auto",
    ):
        self.labels, self.label_category, self.categories = _check_concepts(concepts)
        sh, sw = (int(s) for s in seg_size)
        if sh < 1 or sw < 1:
            raise StageInputError(f"IoUTally: seg_size must be two positive sizes; got {seg_size}")
        self.seg_size = (sh, sw)
        self.device = torch.device(device)
        if kernel not in ("auto", "compiled", "torch"):
            raise StageInputError(f"IoUTally: kernel must be 'auto', 'compiled' or 'torch'; got {kernel!r}")
        if kernel == "compiled" and self.device.type != "cpu":
            raise StageInputError(
                f"IoUTally: the compiled kernel runs on the CPU, not on {self.device}; use kernel='torch' or 'auto'"
            )
        if kernel == "auto":
            # Numba is a dependency; a platform without a wheel for it still counts, on the slower torch path.
            compiled = self.device.type == "cpu" and importlib.util.find_spec("numba") is not None
            kernel = "compiled" if compiled else "torch"
        self.kernel = kernel
        self.chunk_images = max(1, int(chunk_images))
        self.block_pixels = max(1, int(block_pixels))
        self.num_units: int | None = None
        self.images = 0
        num_labels = len(self.labels)
        self.truth = np.zeros(num_labels, dtype=np.int64)
        self.intersection: np.ndarray | None = None  # (C, L)
        self.activation: np.ndarray | None = None  # (C, categories)
        lookup = np.full(int(self.labels.max()) + 1, -1, dtype=np.int32)
        lookup[self.labels] = np.arange(num_labels)
        lookup[0] = num_labels  # the "no label" column, dropped at the end
        self._lookup = lookup

    # -- input handling
    def _columns(self, values: np.ndarray, where: str) -> np.ndarray:
        """Label numbers → int32 column indexes (``L`` for 0); unknown numbers raise."""
        values = np.asarray(values)
        if values.dtype.kind not in "iu":
            raise StageInputError(f"IoUTally: {where} labels must be integers; got dtype {values.dtype}")
        columns = None
        if values.size == 0 or (values.min() >= 0 and values.max() < len(self._lookup)):
            columns = self._lookup[values]
        if columns is None or (columns.size and columns.min() < 0):
            values = values.astype(np.int64)
            known = (values >= 0) & (values < len(self._lookup))
            known[known] = self._lookup[values[known]] >= 0
            unknown = np.unique(values[~known])[:8].tolist()
            raise StageInputError(
                f"IoUTally: {where} holds label numbers {unknown} that are not among the dataset's concepts; "
                "pass the dataset's full concept list"
            )
        return columns

    def _prepare(self, acts, thresholds, batch: Batch, image_ids):
        acts = np.asarray(acts)
        if acts.ndim == 2:
            acts = acts[:, :, None, None]
        if acts.ndim != 4 or acts.dtype.kind != "f":
            raise StageInputError(
                f"IoUTally.update: activations must be float (N, C, H, W) or (N, C); got {acts.dtype} {acts.shape}"
            )
        n, c = acts.shape[:2]
        # The compiled kernel checks while it reads the values (one memory pass instead of two).
        if self.kernel != "compiled" and not np.isfinite(acts).all():
            raise _nonfinite_error()
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (c,) or not np.isfinite(thresholds).all():
            raise StageInputError(
                f"IoUTally.update: thresholds must be {c} finite values (one per unit); got shape {thresholds.shape}"
            )
        if len(batch) != n:
            raise StageInputError(f"IoUTally.update: the batch has {len(batch)} images but activations have {n}")
        if image_ids is not None and not np.array_equal(np.asarray(image_ids), batch.index):
            raise StageInputError("IoUTally.update: image_ids differ from batch.index; load the batch for the same ids")
        if self.num_units is None:
            self.num_units = c
            self.intersection = np.zeros((c, len(self.labels)), dtype=np.int64)
            self.activation = np.zeros((c, len(self.categories)), dtype=np.int64)
        elif c != self.num_units:
            raise StageInputError(f"IoUTally.update: this batch has {c} units, earlier batches {self.num_units}")
        pixel_maps = []
        for category, maps in batch.pixel_labels.items():
            maps = np.asarray(maps)
            if maps.ndim != 4 or maps.shape[0] != n or tuple(maps.shape[2:]) != self.seg_size:
                raise StageInputError(
                    f"IoUTally.update: pixel labels of {category!r} must be (N={n}, L, {self.seg_size[0]}, "
                    f"{self.seg_size[1]}); got {maps.shape} (is seg_size the dataset's?)"
                )
            if maps.dtype.kind not in "iu":
                raise StageInputError(
                    f"IoUTally: pixel_labels[{category!r}] labels must be integers; got dtype {maps.dtype}"
                )
            pixel_maps.append((category, maps))
        scalar = [
            self._columns(np.asarray(v).reshape(n, -1), f"image_labels[{k!r}]") for k, v in batch.image_labels.items()
        ]
        scalar = np.concatenate(scalar, axis=1).astype(np.int64) if scalar else np.zeros((n, 0), np.int64)
        return acts, thresholds, pixel_maps, scalar

    # -- protocol
    def update(
        self, acts: np.ndarray, thresholds: np.ndarray, batch: Batch, image_ids: np.ndarray | None = None
    ) -> None:
        """Count one shard.

        Args:
            acts: ``(N, C, H, W)`` (or ``(N, C)``) activations, any float dtype.
            thresholds: ``(C,)`` per-unit thresholds (the ``threshold`` column of the thresholds stage).
            batch: the dataset batch of the same N images (pixel and whole-image labels are read).
            image_ids: optional ``(N,)`` ids of the activation rows, checked against ``batch.index``.
        """
        acts, thresholds, pixel_maps, scalar = self._prepare(acts, thresholds, batch, image_ids)
        if self.kernel == "compiled":
            self._update_compiled(acts, thresholds, pixel_maps, scalar)
        else:
            # Every label is mapped (and checked) before the first count: a bad batch leaves the tally unchanged.
            pixel = self._torch_labels(pixel_maps, acts.shape)
            for start in range(0, acts.shape[0], self.chunk_images):
                stop = min(acts.shape[0], start + self.chunk_images)
                self._count_torch(acts[start:stop], thresholds, pixel[start:stop], scalar[start:stop])
        self.images += acts.shape[0]

    def _count_labels(self, per_image: np.ndarray, scalar: np.ndarray):
        """Add G; return the whole-image label (rows, columns) and the (N, categories) relevance of each image."""
        n = len(per_image)
        num_pixels, num_labels = self.seg_size[0] * self.seg_size[1], len(self.labels)
        scalar_rows = np.repeat(np.arange(n), scalar.shape[1])
        scalar_cols = scalar.reshape(-1)
        keep = scalar_cols < num_labels
        scalar_rows, scalar_cols = scalar_rows[keep], scalar_cols[keep]
        scalar_count = np.zeros((n, num_labels + 1), dtype=np.int64)
        np.add.at(scalar_count, (scalar_rows, scalar_cols), 1)
        self.truth += per_image[:, :num_labels].sum(axis=0) + num_pixels * scalar_count[:, :num_labels].sum(axis=0)
        present = (per_image[:, :num_labels] + scalar_count[:, :num_labels]) > 0
        category_of = np.zeros((num_labels, len(self.categories)), dtype=np.int64)
        category_of[np.arange(num_labels), self.label_category] = 1
        relevant = ((present.astype(np.int64) @ category_of) > 0).astype(np.int64)
        return scalar_rows, scalar_cols, relevant

    def _add_units(self, on_count: np.ndarray, scalar_rows, scalar_cols, relevant) -> None:
        """Whole-image labels intersect every on-pixel of their image; A sums on-pixels over relevant images."""
        np.add.at(self.intersection.T, scalar_cols, on_count[scalar_rows])
        self.activation += on_count.T @ relevant

    def _update_compiled(self, acts: np.ndarray, thresholds: np.ndarray, pixel_maps, scalar: np.ndarray) -> None:
        """The whole batch in one pass of each compiled kernel; checks come first, the state changes last."""
        from ._iou_kernels import count_quads, prepare_labels

        n, c, h, w = acts.shape
        sh, sw = self.seg_size
        ay, ax = _axis(h, sh), _axis(w, sw)
        layers = sum(maps.shape[1] for _, maps in pixel_maps)
        columns = np.empty((n, layers, sh, sw), np.int32)
        uniform = np.empty((n, layers, len(ay.seg_base), len(ax.seg_base)), np.int32)
        per_image = np.zeros((n, len(self.labels) + 1), np.int64)
        first = 0
        for category, maps in pixel_maps:
            unknown = prepare_labels(
                maps, self._lookup, ay.seg_start, ay.seg_count, ax.seg_start, ax.seg_count,
                columns, per_image, uniform, first,
            )
            if unknown:
                self._columns(maps, f"pixel_labels[{category!r}]")  # raises, naming the unknown numbers
            first += maps.shape[1]

        on_count = np.zeros((n, c), np.int64)
        nonfinite = count_quads(
            np.ascontiguousarray(acts, dtype=np.float32), thresholds.astype(np.float32),
            _prune_thresholds(thresholds), _full_thresholds(thresholds),
            ay.seg_base, ay.upper[ay.seg_base], ay.seg_start, ay.seg_count, ay.w_lo, ay.w_hi,
            ax.seg_base, ax.upper[ax.seg_base], ax.seg_start, ax.seg_count, ax.w_lo, ax.w_hi,
            columns, uniform, on_count, self.intersection,
        )
        if nonfinite:
            raise _nonfinite_error()
        scalar_rows, scalar_cols, relevant = self._count_labels(per_image, scalar)
        self._add_units(on_count, scalar_rows, scalar_cols, relevant)

    def _torch_labels(self, pixel_maps, shape) -> np.ndarray:
        """Label columns ``(N, layers, sh, sw)`` of every pixel category, concatenated."""
        layers = [self._columns(maps, f"pixel_labels[{category!r}]") for category, maps in pixel_maps]
        return np.concatenate(layers, axis=1) if layers else np.zeros((shape[0], 0, *self.seg_size), np.int32)

    def _count_torch(self, acts: np.ndarray, thresholds: np.ndarray, pixel: np.ndarray, scalar: np.ndarray) -> None:
        dev = self.device
        n, c, h, w = acts.shape
        sh, sw = self.seg_size
        num_pixels, num_labels = sh * sw, len(self.labels)
        width = num_labels + 1  # the extra column collects label 0
        ay, ax = _axis(h, sh), _axis(w, sw)
        layers = pixel.shape[1]

        # Labels (numpy): per-image histograms give G and which labels, hence categories, each image has.
        per_image = np.zeros((n, width), dtype=np.int64)
        if layers:
            keys = np.arange(n, dtype=np.int64)[:, None, None, None] * width + pixel
            per_image += np.bincount(keys.reshape(-1), minlength=n * width).reshape(n, width)
        scalar_rows, scalar_cols, relevant = self._count_labels(per_image, scalar)

        # Units (torch): evaluate only the quads with a corner near or above the threshold.
        x = torch.tensor(np.asarray(acts, dtype=np.float32), device=dev)  # a copy: Arrow-backed arrays are read-only
        geometry = _QuadGeometry.build(ay, ax, dev)
        hot = x > torch.as_tensor(_prune_thresholds(thresholds), device=dev)[None, :, None, None]
        # A quad's corners are its lower cell and the next one (the last cell is its own upper corner).
        hot_rows = hot.clone()
        hot_rows[:, :, :-1] |= hot[:, :, 1:]
        hot_quads = hot_rows.clone()
        hot_quads[:, :, :, :-1] |= hot_rows[:, :, :, 1:]
        hot_quads = hot_quads.index_select(2, geometry.y_lo).index_select(3, geometry.x_lo)
        quads = torch.nonzero(hot_quads)  # (K, 4): image, unit, row segment, column segment

        on_count = torch.zeros(n * c, dtype=torch.int64, device=dev)
        pair_counts = torch.zeros(c * width, dtype=torch.int64, device=dev)
        if len(quads):
            uniform = cols_by_layer = None
            if layers:
                uniform = torch.as_tensor(_uniform_quads(pixel, ay, ax), device=dev)
                # (layers, image · pixel): one contiguous label row per layer
                cols_by_layer = torch.as_tensor(np.ascontiguousarray(pixel.transpose(1, 0, 2, 3)), device=dev)
                cols_by_layer = cols_by_layer.reshape(layers, n * num_pixels)
            t = torch.as_tensor(thresholds.astype(np.float32), device=dev)
            step = max(1, self.block_pixels // geometry.quad_size)
            for begin in range(0, len(quads), step):
                geometry.count(quads[begin : begin + step], x, t, cols_by_layer, uniform, width, on_count, pair_counts)
        self.intersection += pair_counts.reshape(c, width)[:, :num_labels].cpu().numpy()
        self._add_units(on_count.reshape(n, c).cpu().numpy(), scalar_rows, scalar_cols, relevant)

    def merge(self, other: Self) -> Self:
        if (
            not np.array_equal(self.labels, other.labels)
            or not np.array_equal(self.label_category, other.label_category)
            or self.categories != other.categories
            or self.seg_size != other.seg_size
        ):
            raise StageInputError("IoUTally.merge: tallies over different concepts or seg sizes cannot be merged")
        if other.num_units is None:
            return self
        if self.num_units is None:
            self.num_units = other.num_units
            self.intersection = other.intersection.copy()
            self.activation = other.activation.copy()
        elif other.num_units != self.num_units:
            raise StageInputError(f"IoUTally.merge: {self.num_units} units vs {other.num_units} units")
        else:
            self.intersection += other.intersection
            self.activation += other.activation
        self.truth += other.truth
        self.images += other.images
        return self

    def to_table(self) -> pa.Table:
        arrays = {"labels": self.labels, "label_category": self.label_category, "truth": self.truth}
        if self.num_units is not None:
            arrays |= {"intersection": self.intersection, "activation": self.activation}
        attrs = {
            "kind": "IoUTally",
            "categories": self.categories,
            "seg_size": list(self.seg_size),
            "num_units": self.num_units,
            "images": self.images,
        }
        return pack_arrays(arrays, attrs)

    @classmethod
    def from_table(cls, table: pa.Table, device: str | torch.device = "cpu") -> Self:
        arrays, attrs = unpack_arrays(table)
        arrays = {name: array.copy() for name, array in arrays.items()}  # unpacked arrays are read-only views
        if attrs.get("kind") != "IoUTally":
            raise StageInputError(f"IoUTally.from_table: table holds a {attrs.get('kind')!r} state")
        categories = attrs["categories"]
        concepts = [
            Concept(int(label), str(label), categories[int(cat)], True)
            for label, cat in zip(arrays["labels"], arrays["label_category"])
        ]
        stat = cls(concepts, tuple(attrs["seg_size"]), device=device)
        stat.categories = list(categories)  # keep the saved order even if a category has no label
        stat.label_category = arrays["label_category"]
        stat.truth = arrays["truth"]
        stat.images = int(attrs["images"])
        stat.num_units = attrs["num_units"]
        if stat.num_units is not None:
            stat.intersection, stat.activation = arrays["intersection"], arrays["activation"]
        return stat

    # -- results
    def iou(self) -> np.ndarray:
        """``(C, L)`` float64 IoU, 0 where the union is empty."""
        if self.num_units is None:
            raise StageInputError("IoUTally.iou: no activations were counted")
        inter = self.intersection.astype(np.float64)
        union = self.activation[:, self.label_category] + self.truth[None, :] - self.intersection
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _best(iou: np.ndarray, columns: np.ndarray):
    """Per unit, the column (of ``columns``) with the highest IoU (first on ties) and that IoU."""
    sub = iou[:, columns]
    pick = np.argmax(sub, axis=1)
    return columns[pick], sub[np.arange(len(sub)), pick]


def iou_tables(
    tally: IoUTally, concepts: Sequence[Concept], iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> dict[str, pd.DataFrame]:
    """Result tables of one layer.

    Definitions: a unit's best label overall is its highest-IoU label (ties: smaller label number); per
    category, the best among that category's labels. A unit with IoU 0 for every label of a scope has label 0
    and empty name/category there. A unit is *interpretable* when its best IoU is ``> iou_threshold``
    (strict, as the paper's figures). Detectors of category ``c``: interpretable units whose best category
    is ``c``; unique detectors: their distinct best labels (the total is over all categories).

    Args:
        tally: the merged tally of the layer.
        concepts: the dataset's concepts (for names; must cover the tally's labels).
        iou_threshold: the interpretability cut (0.04 in the paper).

    Returns:
        ``unit_label``: one row per (unit, label) — ``unit, label, name, category, intersection, activation,
        truth, iou``. ``units``: one row per unit — ``unit, label, name, category, iou, interpretable`` then
        ``<cat>_label, <cat>_name, <cat>_iou`` per category. ``summary``: one row — ``units,
        interpretable_units, unique_detectors_total, iou_threshold`` then ``detectors_<cat>,
        unique_detectors_<cat>`` per category.
    """
    by_label = {c.label: c for c in concepts}
    missing = [int(l) for l in tally.labels if int(l) not in by_label]
    if missing:
        raise StageInputError(f"iou_tables: concepts lack labels {missing[:8]} that the tally counted")
    iou = tally.iou()
    num_units, num_labels = iou.shape
    names = np.array([by_label[int(l)].name for l in tally.labels], dtype=object)
    cats = np.array(tally.categories, dtype=object)[tally.label_category]

    unit_label = pd.DataFrame(
        {
            "unit": np.repeat(np.arange(num_units, dtype=np.int64), num_labels),
            "label": np.tile(tally.labels, num_units),
            "name": np.tile(names, num_units),
            "category": np.tile(cats, num_units),
            "intersection": tally.intersection.reshape(-1),
            "activation": tally.activation[:, tally.label_category].reshape(-1),
            "truth": np.tile(tally.truth, num_units),
            "iou": iou.reshape(-1),
        }
    )

    def describe(columns: np.ndarray):
        col, score = _best(iou, columns)
        found = score > 0
        label = np.where(found, tally.labels[col], 0)
        name = np.where(found, names[col], "")
        category = np.where(found, cats[col], "")
        return label, name, category, score

    label, name, category, score = describe(np.arange(num_labels))
    interpretable = score > iou_threshold
    units = {
        "unit": np.arange(num_units, dtype=np.int64),
        "label": label.astype(np.int64),
        "name": name,
        "category": category,
        "iou": score,
        "interpretable": interpretable,
    }
    summary = {
        "units": num_units,
        "interpretable_units": int(interpretable.sum()),
        "unique_detectors_total": int(len(np.unique(label[interpretable]))),
        "iou_threshold": float(iou_threshold),
    }
    for index, cat in enumerate(tally.categories):
        columns = np.flatnonzero(tally.label_category == index)
        if len(columns):
            c_label, c_name, _, c_score = describe(columns)
        else:
            c_label, c_name = np.zeros(num_units, np.int64), np.full(num_units, "", object)
            c_score = np.zeros(num_units)
        units[f"{cat}_label"] = c_label.astype(np.int64)
        units[f"{cat}_name"] = c_name
        units[f"{cat}_iou"] = c_score
        detectors = interpretable & (category == cat)
        summary[f"detectors_{cat}"] = int(detectors.sum())
        summary[f"unique_detectors_{cat}"] = int(len(np.unique(label[detectors])))
    return {"unit_label": unit_label, "units": pd.DataFrame(units), "summary": pd.DataFrame([summary])}
