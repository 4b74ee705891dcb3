"""Bilinear upsampling as the IoU tally evaluates it, and the segment-quad geometry behind its pruning.

:func:`upsample_bilinear` is ``interpolate(mode="bilinear", align_corners=False)``'s geometry and weights in
one fixed float32 formula (the same on CPU and GPU). A bilinear pixel is a convex combination of the 2×2
cells around it, so the tally evaluates only the "quads" around cells above a threshold bound
(:func:`_prune_thresholds`, exact thanks to a 2⁻¹⁸ relative margin) and takes whole quad rows above
:func:`_full_thresholds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["upsample_bilinear"]

# Relative margin of the quad pre-filter: a float32 convex combination of corners ≤ T·(1 − 2⁻¹⁸) cannot exceed T.
_PRUNE_MARGIN = 2.0**-18


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
    cell_start: np.ndarray  # (n_in + 1,) int64: pixels cell_start[a] : cell_start[a + 1] have lower corner a
    base_upper: np.ndarray  # (n_out,) upper corner cell of each pixel: upper[base]


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
        np.searchsorted(base, np.arange(n_in + 1), side="left").astype(np.int64), upper[base],
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

    rows_lo, rows_hi = x[..., t(ay.base), :], x[..., t(ay.base_upper), :]
    x_lo, x_hi = t(ax.base), t(ax.base_upper)
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
