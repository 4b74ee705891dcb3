"""One entry point by method name: :func:`attribute` — what the pipeline stages and the config call.

Parameters a method does not take are ignored, so one parameter dict can drive several methods; the
caller's cache key should hold exactly the parameters of the methods it runs (the stages key them all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import StageInputError
from ._cam import cam, grad_cam, guided_grad_cam
from ._engine import MapFn, Target
from ._gradients import deconvnet, guided_backprop, saliency, smoothgrad
from ._lime import lime
from ._lrp import lrp
from ._occlusion import occlusion

__all__ = ["METHODS", "attribute"]

METHODS = ("saliency", "smoothgrad", "guided_backprop", "deconvnet", "occlusion", "cam", "grad_cam",
           "guided_grad_cam", "lrp", "lime")


def attribute(method: str, model: nn.Module, x: torch.Tensor, target: Target, *, cam_layer: str = "",
              head: str = "fc", smoothgrad_samples: int = 16, smoothgrad_stdev: float = 0.15,
              occlusion_window: int = 8, occlusion_stride: int = 4, occlusion_baseline: Any = 0.0,
              lrp_rule: str = "epsilon", lrp_epsilon: float = 1e-6, lime_cell: int = 8, lime_samples: int = 256,
              image_ids: torch.Tensor | None = None, unit_chunk: int = 16, seed: int = 0, lrp_alpha: float = 2.0,
              lime_segmentation: str = "grid", lime_segments: int = 64, lime_compactness: float = 2.0,
              map_fn: MapFn | None = None, **_ignored: Any) -> torch.Tensor:
    """Raw map(s) of ``method`` for ``target`` (shapes as the method's own function documents).

    ``cam_layer`` is where CAM / Grad-CAM / guided Grad-CAM are taken; ``head`` is CAM's linear layer.
    SmoothGrad's and LIME's randomness derives from ``seed`` (LIME also from ``image_ids``). ``lrp_alpha`` is the
    αβ rule's α (β = α − 1); ``lime_segmentation`` is ``"grid"`` (``lime_cell``) or ``"slic"`` (``lime_segments``,
    ``lime_compactness``). ``map_fn`` (saliency, guided backprop and deconvnet only): a row-wise reduction the
    engine applies to the maps piece by piece (:data:`~._engine.MapFn`), so only the reduced maps are held.
    """
    if method not in METHODS:
        raise StageInputError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    if method in ("cam", "grad_cam", "guided_grad_cam") and not cam_layer:
        raise StageInputError(f"{method} needs the layer it is taken at (cam_layer)")
    if map_fn is not None and method not in ("saliency", "guided_backprop", "deconvnet"):
        raise StageInputError(f"{method} maps cannot be reduced piece by piece (map_fn); use saliency, "
                              "guided_backprop or deconvnet, or reduce the returned maps")
    if method == "saliency":
        return saliency(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)
    if method == "smoothgrad":
        return smoothgrad(model, x, target, samples=smoothgrad_samples, stdev=smoothgrad_stdev, seed=seed,
                          unit_chunk=unit_chunk)
    if method == "guided_backprop":
        return guided_backprop(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)
    if method == "deconvnet":
        return deconvnet(model, x, target, unit_chunk=unit_chunk, map_fn=map_fn)
    if method == "occlusion":
        return occlusion(model, x, target, window=(occlusion_window,) * 2, stride=(occlusion_stride,) * 2,
                         baseline=occlusion_baseline)
    if method == "cam":
        if not isinstance(target, (int, torch.Tensor)) and not isinstance(target, (list, tuple)):
            raise StageInputError("CAM explains classes only (it reads the classifier head's weights)")
        return cam(model, x, target, layer=cam_layer, head=head)
    if method == "grad_cam":
        return grad_cam(model, x, target, layer=cam_layer, unit_chunk=unit_chunk)
    if method == "guided_grad_cam":
        return guided_grad_cam(model, x, target, layer=cam_layer, interpolate="bilinear", unit_chunk=unit_chunk)
    if method == "lrp":
        return lrp(model, x, target, rule=lrp_rule, epsilon=lrp_epsilon, alpha=lrp_alpha, beta=lrp_alpha - 1.0,
                   unit_chunk=unit_chunk)
    return lime(model, x, target, cell=lime_cell, samples=lime_samples, seed=seed, image_ids=image_ids,
                segmentation=lime_segmentation, n_segments=lime_segments, compactness=lime_compactness)
