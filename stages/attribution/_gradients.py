"""Gradient maps: vanilla saliency, SmoothGrad, guided backpropagation and deconvnet.

* saliency (Simonyan et al. 2013): ``g = ∇_x f_t(x)``; the raw signed gradient ``(N, C, H, W)`` is returned,
  and :func:`saliency_map` reduces it for display as ``max_c |g|`` (Simonyan's eq.; captum's
  ``Saliency(abs=True)`` returns ``|g|`` without the channel reduction).
* SmoothGrad (Smilkov et al. 2017): ``(1/n) Σ_i M(x + ε_i)``, ``ε_i ~ N(0, σ²I)``; ``kind`` ``"smoothgrad"``
  (mean of maps), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"`` (variance), as captum's
  ``NoiseTunnel``. ``stdev`` is in input units (set it: 1.0 on normalised images is huge). Noise is drawn from a
  generator seeded by ``(seed, sample)``, so reruns are bit-identical.
* guided backprop (Springenberg et al. 2015) and deconvnet (Zeiler & Fergus 2014): the gradient with the
  ReLU backward rule of :mod:`._relu`, which also covers in-place and functional ReLUs.

Saliency, guided backprop and deconvnet take a ``map_fn``: a row-wise reduction (e.g. :func:`saliency_map`,
``max_c |g|``) applied to the maps piece by piece as the engine makes them, so that a caller who needs only
the reduction never holds every unit's full map (see :func:`~._engine.backward_maps`).

Every function takes a model in ``eval()`` mode, float inputs and a target (class or
:class:`~._engine.UnitTarget`); class targets give ``(N, C, H, W)``, unit targets ``(N, U, C, H, W)``
(all units of a layer batched; see :mod:`._engine`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import StageInputError
from ._engine import MapFn, Target, backward_maps
from ._relu import relu_rule

__all__ = ["saliency", "smoothgrad", "guided_backprop", "deconvnet", "saliency_map"]


def saliency(model: nn.Module, x: torch.Tensor, target: Target, *, unit_chunk: int = 16,
             map_fn: MapFn | None = None) -> torch.Tensor:
    """Raw input gradient of the target; shape ``(N, C, H, W)`` (class) or ``(N, U, C, H, W)`` (units)."""
    with relu_rule(model, "plain"):
        return backward_maps(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)[0]


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target, *, unit_chunk: int = 16,
                    map_fn: MapFn | None = None) -> torch.Tensor:
    """Guided backpropagation: the gradient with ``I[x>0]·I[g>0]·g`` at every ReLU (signed RGB map)."""
    with relu_rule(model, "guided"):
        return backward_maps(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)[0]


def deconvnet(model: nn.Module, x: torch.Tensor, target: Target, *, unit_chunk: int = 16,
              map_fn: MapFn | None = None) -> torch.Tensor:
    """Deconvnet: the gradient with ``I[g>0]·g`` at every ReLU (the forward switches of max-pooling kept)."""
    with relu_rule(model, "deconvnet"):
        return backward_maps(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)[0]


_BASE = {"saliency": "plain", "guided_backprop": "guided", "deconvnet": "deconvnet"}


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    samples: int = 16,
    stdev: float = 0.15,
    kind: str = "smoothgrad",
    base: str = "saliency",
    seed: int = 0,
    unit_chunk: int = 16,
) -> torch.Tensor:
    """SmoothGrad of a gradient method ``base`` (``saliency``, ``guided_backprop`` or ``deconvnet``).

    Args:
        samples: noisy copies n (Smilkov et al. use ≈50).
        stdev: σ of the Gaussian noise in input units (10–20 % of the input range in the paper).
        kind: ``smoothgrad`` | ``smoothgrad_sq`` | ``vargrad`` (captum ``NoiseTunnel`` nt_type).
        seed: noise sample ``i`` comes from ``torch.Generator().manual_seed(seed * 1_000_003 + i)`` on the CPU.
    """
    if kind not in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        raise StageInputError(f"SmoothGrad kind {kind!r} is not one of smoothgrad, smoothgrad_sq, vargrad")
    if base not in _BASE:
        raise StageInputError(f"SmoothGrad base method {base!r} is not one of {sorted(_BASE)}")
    if samples < 1 or stdev < 0:
        raise StageInputError(f"SmoothGrad needs samples ≥ 1 and stdev ≥ 0; got samples={samples}, stdev={stdev}")
    total = total_sq = None
    with relu_rule(model, _BASE[base]):
        for i in range(int(samples)):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * float(stdev)
            g = backward_maps(model, x + noise, target, unit_chunk=unit_chunk)[0]
            total = g if total is None else total + g
            total_sq = g * g if total_sq is None else total_sq + g * g
    mean, mean_sq = total / samples, total_sq / samples
    if kind == "smoothgrad":
        return mean
    if kind == "smoothgrad_sq":
        return mean_sq
    return mean_sq - mean * mean


def saliency_map(grad: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
    """Display reduction of a raw gradient: ``max_c |g|`` over the colour axis (Simonyan et al. 2013)."""
    return grad.abs().amax(dim=channel_dim)
