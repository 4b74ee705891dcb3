"""Deep dream (Mordvintsev et al. 2015): gradient ascent on ½‖A_l(x)‖² of a chosen image, coarse to fine.

Setting the gradient at layer ``l`` to the layer's own activations and backpropagating is gradient ascent
on ``½‖A_l(x)‖²``. The reference loop: at each of ``octaves`` scales (factor ``octave_scale``, smallest
first) the image is the base image at that scale plus the "detail" dreamed so far, upsampled; each step
rolls the image by a random jitter, takes ``x += step_size / mean|g| · g`` in 0–255 pixel units, rolls back
and clips to [0, 255]. The jitter comes from ``numpy.random.default_rng(seed)``, so a rerun is identical.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StageInputError
from ._activation_max import _forward, _no_inplace, _target, _unwrap

__all__ = ["deep_dream"]


def deep_dream(model: nn.Module, layer: str, image: np.ndarray, *, octaves: int = 4, octave_scale: float = 1.4,
               steps: int = 10, step_size: float = 1.5, jitter: int = 4, seed: int = 0,
               device: str | torch.device = "cpu") -> np.ndarray:
    """Dream ``image`` (``(3, H, W)`` or ``(H, W, 3)`` uint8) at ``layer`` of a ``NormalizedModel``.

    Returns:
        ``(H, W, 3)`` uint8, the dreamed image.
    """
    img = np.asarray(image)
    if img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1]):
        raise StageInputError(f"deep_dream: image must be (3, H, W) or (H, W, 3); got shape {img.shape}")
    if img.shape[0] != 3:
        img = img.transpose(2, 0, 1)
    if octaves < 1 or octave_scale <= 1 or steps < 1:
        raise StageInputError(f"deep_dream: need octaves ≥ 1, octave_scale > 1, steps ≥ 1; got {octaves}, "
                              f"{octave_scale}, {steps}")
    device = torch.device(device)
    net_model = _no_inplace(model).to(device)
    for p in net_model.parameters():
        p.requires_grad_(False)
    module, read_input = _target(_unwrap(net_model), layer, False)
    rng = np.random.default_rng(int(seed))
    base = torch.as_tensor(img, dtype=torch.float32, device=device)[None]
    h, w = base.shape[-2:]
    sizes = [(max(1, round(h / octave_scale ** i)), max(1, round(w / octave_scale ** i))) for i in range(octaves)][::-1]
    detail = torch.zeros_like(base[..., : sizes[0][0], : sizes[0][1]])
    for size in sizes:
        octave_base = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
        detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        x = octave_base + detail
        for _ in range(steps):
            dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            x = torch.roll(x, (dy, dx), dims=(2, 3)).detach().requires_grad_(True)
            act = _forward(net_model, module, read_input, x / 255.0)
            (0.5 * (act ** 2).sum()).backward()
            g = x.grad
            with torch.no_grad():
                x = x + step_size / (g.abs().mean() + 1e-8) * g
                x = torch.roll(x, (-dy, -dx), dims=(2, 3)).clamp(0, 255)
        detail = x.detach() - octave_base
    return x.detach()[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
