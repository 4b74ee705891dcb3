"""Turn two layers' activation maps into aligned (samples × channels) matrices for the comparison moments.

The constraint: every comparison metric treats a *sample* as one observation of all channels of both nets at
once, so the two maps must be cut into the same samples. Two conventions (Li et al. 2016 use positions for
regression; Raghu et al. 2017 §3 fold positions into samples for same-layer comparisons and pool otherwise):

* ``"positions"`` — every (image, y, x) is a sample: (N, C, H, W) → (N·H·W, C), image-major. When the grids
  differ, ``resize="smaller"`` average-pools the larger map onto the smaller grid (adaptive average pooling,
  ``torch.nn.functional.adaptive_avg_pool2d``, i.e. each target cell is the mean of the input cells it covers —
  exact block means when the sizes divide); ``resize="none"`` refuses.
* ``"pooled"`` — one sample per image, the spatial mean of each channel: (N, C, H, W) → (N, C). Works for any
  grid sizes and for fully-connected layers.

Fully-connected activations (N, C) are treated as (N, C, 1, 1).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .._errors import StageInputError

__all__ = ["samples_from_maps"]

_MODES = ("positions", "pooled")
_RESIZES = ("smaller", "none")


def _as_maps(x: Any, name: str) -> Any:
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim != 4:
        raise StageInputError(
            f"{name} must be (N, C, H, W) maps or (N, C) vectors; got shape {tuple(x.shape)}"
        )
    return x


def samples_from_maps(
    acts_a: Any,
    acts_b: Any,
    mode: Literal["positions", "pooled"] = "positions",
    resize: Literal["smaller", "none"] = "smaller",
) -> tuple[Any, Any]:
    """Aligned sample matrices of two nets' activations of the same N images.

    Args:
        acts_a: net A's activations, (N, Ca, Ha, Wa) or (N, Ca); numpy array or torch tensor.
        acts_b: net B's activations, (N, Cb, Hb, Wb) or (N, Cb).
        mode: ``"positions"`` (sample = image × position) or ``"pooled"`` (sample = image, spatial mean).
        resize: for ``"positions"`` with different grids: ``"smaller"`` average-pools each map onto the grid
            (min(Ha, Hb), min(Wa, Wb)); ``"none"`` raises :class:`StageInputError`.

    Returns:
        ``(a, b)`` with a (n, Ca) and b (n, Cb), n = N·H·W (positions) or N (pooled); same array type as the
        inputs (float16 is upcast to float32).
    """
    if mode not in _MODES:
        raise StageInputError(f"unknown sample mode {mode!r}; use one of {list(_MODES)}")
    if resize not in _RESIZES:
        raise StageInputError(f"unknown resize rule {resize!r}; use one of {list(_RESIZES)}")
    maps_a, maps_b = _as_maps(acts_a, "acts_a"), _as_maps(acts_b, "acts_b")
    if maps_a.shape[0] != maps_b.shape[0]:
        raise StageInputError(
            f"acts_a holds {maps_a.shape[0]} images but acts_b holds {maps_b.shape[0]}; "
            "pass the activations of the same images to both"
        )
    is_tensor = type(acts_a).__module__.split(".")[0] == "torch"
    if mode == "pooled":
        a, b = maps_a.mean(axis=(2, 3)), maps_b.mean(axis=(2, 3))
        return _upcast(a, is_tensor), _upcast(b, is_tensor)
    grid_a, grid_b = tuple(maps_a.shape[2:]), tuple(maps_b.shape[2:])
    if grid_a != grid_b:
        if resize == "none":
            raise StageInputError(
                f"spatial sizes differ: acts_a {tuple(maps_a.shape)} vs acts_b {tuple(maps_b.shape)}; "
                "set resize='smaller' to average-pool onto the smaller grid, or use mode='pooled'"
            )
        grid = (min(grid_a[0], grid_b[0]), min(grid_a[1], grid_b[1]))
        maps_a, maps_b = _pool_to(maps_a, grid), _pool_to(maps_b, grid)
    return _positions(maps_a), _positions(maps_b)


def _upcast(x: Any, is_tensor: bool) -> Any:
    if is_tensor:
        return x.float() if x.dtype.itemsize < 4 else x
    return x.astype(np.float32) if x.dtype.itemsize < 4 else x


def _pool_to(maps: Any, grid: tuple[int, int]) -> Any:
    if tuple(maps.shape[2:]) == grid:
        return maps
    import torch
    import torch.nn.functional as F

    if isinstance(maps, torch.Tensor):
        source = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
        return F.adaptive_avg_pool2d(source, grid)
    dtype = maps.dtype if maps.dtype in (np.float32, np.float64) else np.float32
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps, dtype=dtype)), grid)
    return pooled.numpy()


def _positions(maps: Any) -> Any:
    n, c, h, w = maps.shape
    is_tensor = type(maps).__module__.split(".")[0] == "torch"
    channels_last = maps.permute(0, 2, 3, 1) if is_tensor else maps.transpose(0, 2, 3, 1)
    flat = channels_last.reshape(n * h * w, c)
    return _upcast(flat, is_tensor)
