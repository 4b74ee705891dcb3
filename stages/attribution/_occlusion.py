"""Occlusion sensitivity (Zeiler & Fergus 2014) in captum's per-pixel convention.

A ``window = (wh, ww)`` patch (all channels) slides with ``stride = (sh, sw)``; positions per axis are
``⌈(D − w)/s⌉ + 1`` starting at ``i·s``, the last window clipped at the border (captum ``Occlusion``). Each
pixel's attribution is the mean, over the windows covering it, of ``f(x) − f(x with the window set to
baseline)`` — positive = important (the opposite sign of S2's probability-of-true-class map).

``baseline`` is a value **in the model's input space**: 0 on normalised input is the dataset-mean colour,
not grey; the pipeline converts a pixel-space grey (e.g. 0.5) through the model's normalisation.

The same forwards give every target at once (free batching): a unit target with U units costs exactly as
many forwards as a class target — ``N × positions`` images in ``batch``-sized chunks, stopping at the
unit's layer. ``batch`` (64 by default) bounds the working set: the occluded copies and every layer's output
for that many images are alive at once, and with the pipeline's allocator settings (freed memory kept for
reuse) repeated forwards of 256 images at 64 px left a process 250–450 MiB above its start, forwards of 64
about 60 MiB, at less CPU time per image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._errors import StageInputError
from ._engine import RowUnitTarget, Target, UnitTarget, resolve_units, target_scores

__all__ = ["occlusion", "occlusion_positions"]


def occlusion_positions(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every window along one axis (``⌈(D − w)/s⌉ + 1`` windows, the last clipped)."""
    if not 1 <= window <= size or not 1 <= stride <= window:
        raise StageInputError(f"occlusion needs 1 ≤ stride ≤ window ≤ image size; got window={window}, "
                              f"stride={stride}, size={size}")
    count = math.ceil((size - window) / stride) + 1
    return [(i * stride, min(i * stride + window, size)) for i in range(count)]


def _repeat(target: Target, times: int) -> Target:
    """A per-example class list repeated for ``times`` stacked copies of the batch (copies outermost)."""
    if isinstance(target, (UnitTarget, RowUnitTarget)):
        return target
    t = torch.as_tensor(target).reshape(-1)
    return t if t.numel() == 1 else t.repeat(times)


def occlusion(model: nn.Module, x: torch.Tensor, target: Target, *, window: tuple[int, int] = (8, 8),
              stride: tuple[int, int] = (4, 4), baseline: float | torch.Tensor = 0.0, batch: int = 64) -> torch.Tensor:
    """Per-pixel occlusion attribution: ``(N, C, H, W)`` for a class, ``(N, U, C, H, W)`` for unit targets."""
    x = x.detach()
    n, c, h, w = x.shape
    ys = occlusion_positions(h, int(window[0]), int(stride[0]))
    xs = occlusion_positions(w, int(window[1]), int(stride[1]))
    units = resolve_units(model, x, target) if isinstance(target, UnitTarget) else None
    base = target_scores(model, x, target, units=units)  # (N, T)
    t = base.shape[1]
    fill = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    fill = fill.reshape(1, -1, 1, 1) if fill.numel() == c else fill.reshape(1, 1, 1, 1)
    attr = torch.zeros(n, t, h, w, dtype=base.dtype, device=x.device)
    count = torch.zeros(h, w, dtype=base.dtype, device=x.device)
    windows = [(y0, y1, x0, x1) for (y0, y1) in ys for (x0, x1) in xs]
    per = max(1, int(batch) // max(n, 1))
    for start in range(0, len(windows), per):
        chunk = windows[start:start + per]
        xp = x.unsqueeze(0).repeat(len(chunk), 1, 1, 1, 1)  # (p, N, C, H, W)
        for j, (y0, y1, x0, x1) in enumerate(chunk):
            xp[j, :, :, y0:y1, x0:x1] = fill.expand(n, c, y1 - y0, x1 - x0)
        scores = target_scores(model, xp.reshape(-1, c, h, w), _repeat(target, len(chunk)), units=units)
        scores = scores.reshape(len(chunk), n, t)
        diff = base.unsqueeze(0) - scores
        for j, (y0, y1, x0, x1) in enumerate(chunk):
            attr[:, :, y0:y1, x0:x1] += diff[j][:, :, None, None]
            count[y0:y1, x0:x1] += 1
    attr = (attr / count).unsqueeze(2).expand(n, t, c, h, w).contiguous()
    return attr if units is not None else attr[:, 0]
