"""First-layer filters as an image grid (Zeiler & Fergus; Krizhevsky et al.): only layer 1 is directly readable."""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from .._errors import StageInputError

__all__ = ["first_conv", "filter_grid"]


def first_conv(model: nn.Module) -> tuple[str, np.ndarray]:
    """``(name, weights (K, 3, k, k))`` of the first ``Conv2d`` with 3 input channels of a network."""
    net = getattr(model, "net", model)
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module.weight.detach().cpu().double().numpy()
    raise StageInputError(f"{type(net).__name__} has no Conv2d with 3 input channels; there are no RGB filters to show")


def filter_grid(weights: np.ndarray, *, zoom: int = 8, gap: int = 1, columns: int | None = None) -> np.ndarray:
    """``(K, 3, k, k)`` filters → one ``uint8 (H, W, 3)`` grid image, each filter min–max scaled on its own.

    Args:
        weights: RGB filters.
        zoom: nearest-neighbour magnification of each tile.
        gap: white pixels between tiles (before zoom).
        columns: tiles per row (default ⌈√K⌉).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise StageInputError(f"filter_grid: weights must be (K, 3, k, k); got shape {w.shape}")
    k, _, kh, kw = w.shape
    cols = int(columns or math.ceil(math.sqrt(k)))
    rows = math.ceil(k / cols)
    lo = w.reshape(k, -1).min(axis=1)[:, None, None, None]
    hi = w.reshape(k, -1).max(axis=1)[:, None, None, None]
    tiles = (w - lo) / np.where(hi > lo, hi - lo, 1.0)
    grid = np.ones((rows * (kh + gap) + gap, cols * (kw + gap) + gap, 3))
    for i in range(k):
        r, c = divmod(i, cols)
        y, x = gap + r * (kh + gap), gap + c * (kw + gap)
        grid[y : y + kh, x : x + kw] = tiles[i].transpose(1, 2, 0)
    grid = np.kron(grid, np.ones((zoom, zoom, 1)))
    return (grid * 255).round().astype(np.uint8)
