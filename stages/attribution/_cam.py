"""Class activation maps: CAM, Grad-CAM and guided Grad-CAM, raw at layer resolution.

* CAM (Zhou et al. 2016) needs ``conv → global average pool → linear``: ``M_c = Σ_k w_ck A^k``. The head is
  checked numerically on the given inputs (``model(x) ≈ head(mean_ij A)``); a model whose output is not that
  (max-pooling head, hidden FC layers, anything after the head) is refused with the reason — use Grad-CAM.
  With ``target=None`` every class comes out of one einsum: ``(N, classes, h, w)``.
* Grad-CAM (Selvaraju et al. 2017): ``α_k = (1/Z) Σ_ij ∂y/∂A^k_ij``, ``L = Σ_k α_k A^k``. The map is
  returned **raw** (no ReLU, no upsampling, no normalisation), which is captum ``LayerGradCam``'s default
  (``relu_attributions=False``); ``relu=True`` gives the paper's ``ReLU(L)`` (captum
  ``relu_attributions=True``). pytorch-grad-cam additionally min–max normalises each image, which makes maps
  incomparable across images, so that is a display step only (:func:`upsample`). Unit targets work as class
  targets do (``y`` = the unit's reduced activation), at a ``layer`` below the unit's.
* Guided Grad-CAM = guided backprop ⊙ upsample(ReLU(Grad-CAM)); upsampling ``"nearest"`` as captum's
  ``GuidedGradCam`` or ``"bilinear"`` (``align_corners=False``).

On a GAP + linear net, ``∂y_c/∂A^k_ij = w_ck / Z`` so Grad-CAM × Z equals CAM exactly (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StageInputError
from ._engine import RowUnitTarget, Target, UnitTarget, _forward, backward_maps, class_indices, module_by_name
from ._relu import relu_rule

__all__ = ["cam", "grad_cam", "guided_grad_cam", "upsample"]


def cam(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None, *, layer: str, head: str,
        rtol: float = 1e-4) -> torch.Tensor:
    """CAM ``Σ_k w_ck A^k`` at ``layer``'s resolution: ``(N, h, w)`` for a target, ``(N, classes, h, w)`` for None."""
    fc = module_by_name(model, head)
    if not isinstance(fc, nn.Linear):
        raise StageInputError(f"CAM needs a linear head; module {head!r} is {type(fc).__name__}")
    with torch.no_grad():
        out, store = _forward(model, x, [layer], stop=False)
        a = store[layer]
        if a.ndim != 4 or a.shape[1] != fc.in_features:
            raise StageInputError(f"CAM: layer {layer!r} outputs {tuple(a.shape)}, but head {head!r} takes "
                                  f"{fc.in_features} features; give the last conv layer before the pooled head")
        pooled = fc(a.mean(dim=(2, 3)))
        scale = float(out.abs().max()) if out.numel() else 1.0
        if out.shape != pooled.shape or not torch.allclose(out, pooled, rtol=rtol, atol=rtol * max(scale, 1e-12)):
            raise StageInputError(
                f"CAM needs model(x) = {head}(global average of {layer}) and this model's output differs (e.g. a "
                "max-pool head, a hidden layer or an op after the head); use grad_cam, which needs no such head"
            )
        maps = torch.einsum("ck,nkhw->nchw", fc.weight, a)
        if target is None:
            return maps
        t = class_indices(target, x.shape[0], maps.shape[1]).to(maps.device)
        return maps[torch.arange(x.shape[0], device=maps.device), t]


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target, *, layer: str, relu: bool = False,
             unit_chunk: int = 16) -> torch.Tensor:
    """Grad-CAM at ``layer``: ``(N, h, w)`` (class) or ``(N, U, h, w)`` (units), raw unless ``relu``."""
    if isinstance(target, (UnitTarget, RowUnitTarget)) and target.layer == layer:
        raise StageInputError(f"Grad-CAM of a unit of {layer!r} must be taken at a layer below it, not {layer!r}")
    with relu_rule(model, "plain"):
        g, a = backward_maps(model, x, target, wrt=layer, unit_chunk=unit_chunk)
    if a.ndim < 4:
        raise StageInputError(f"Grad-CAM needs a spatial layer; {layer!r} outputs {tuple(a.shape)}")
    alpha = g.mean(dim=(-2, -1), keepdim=True)
    out = (alpha * a).sum(dim=-3)
    return out.clamp(min=0) if relu else out


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(..., h, w)`` maps to ``size`` (``bilinear`` with ``align_corners=False``, or ``nearest``)."""
    if mode not in ("bilinear", "nearest"):
        raise StageInputError(f"interpolation {mode!r} is not 'bilinear' or 'nearest'")
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(flat, size=tuple(size), mode=mode, **kwargs).reshape(*lead, *size)


def guided_grad_cam(model: nn.Module, x: torch.Tensor, target: Target, *, layer: str, interpolate: str = "nearest",
                    unit_chunk: int = 16) -> torch.Tensor:
    """Guided backprop ⊙ upsampled ReLU(Grad-CAM): ``(N, C, H, W)`` (class) or ``(N, U, C, H, W)`` (units)."""
    from ._gradients import guided_backprop

    heat = upsample(grad_cam(model, x, target, layer=layer, relu=True, unit_chunk=unit_chunk), tuple(x.shape[-2:]),
                    interpolate)
    return guided_backprop(model, x, target, unit_chunk=unit_chunk) * heat.unsqueeze(-3)
