"""LIME for images (Ribeiro et al. 2016): superpixels, random on/off samples, a kernel, a weighted ridge surrogate.

``ξ(x) = argmin_g Σ_z π_x(z) (f(z) − g(z′))² + λ‖β‖²`` with ``g(z′) = b + z′ᵀβ``:

* superpixels: ``segments`` given per image, else by name (``segmentation``): ``"grid"``, a regular grid of
  ``cell × cell`` squares (:func:`grid_segments`), or ``"slic"``, SLIC superpixels (Achanta et al. 2012;
  :func:`~._slic.slic_segments`, ``n_segments`` of them, compactness ``compactness``) computed on each input
  image — both deterministic and dependency-free (lime uses scikit-image's quickshift; pass its labels as
  ``segments`` if you want them). SLIC segments follow colour edges, so a superpixel rarely straddles an
  object boundary (on 64-px piecewise-constant images of 12 rectangles, 96–98 % of the pixels lie in their
  segment's majority region with 49 SLIC segments vs 73–76 % with a grid of 64 squares; tested); the grid
  stays the default because it costs nothing (SLIC: ≈ 0.25 s per 64-px image on one core) and is what earlier
  cache entries hold;
* samples: ``z′ ∈ {0,1}^S`` uniform random bits, row 0 forced to all ones (the image itself), drawn from a
  generator seeded by ``(seed, image id)``; "off" superpixels take the superpixel's mean colour
  (``fill="mean"``, lime's ``hide_color=None``) or a constant;
* kernel: ``π = exp(−d²/(2w²))`` on the cosine distance ``d`` between ``z′`` and the all-ones vector (lime
  writes ``sqrt(exp(−d²/w²))``, the same; default width 0.25 as lime_image);
* surrogate: ridge with intercept, ``λ = ridge`` (lime's ``Ridge(alpha=1)``), solved in closed form on
  π-weighted centred data — one solve explains all T targets at once (every unit of a layer, or a class),
  because ``Z′`` and ``π`` are shared: ``β = (Z̃ᵀΠZ̃ + λI)⁻¹ Z̃ᵀΠỸ``. Tested equal to scikit-learn's
  ``Ridge(sample_weight=π)``.

captum's ``Lime`` differs by design (50 samples, Lasso surrogate, baseline 0, kernel width 1); lime's
"auto" feature selection is not done (all superpixels are kept).
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import StageInputError
from ._engine import RowUnitTarget, Target, UnitTarget, resolve_units, target_scores
from ._slic import slic_segments

__all__ = ["lime", "grid_segments", "ridge_surrogate", "lime_segments", "SEGMENTATIONS"]

SEGMENTATIONS = ("grid", "slic")


def grid_segments(height: int, width: int, cell: int) -> torch.Tensor:
    """``(H, W)`` int64 labels of a regular grid of ``cell × cell`` squares (row-major numbering)."""
    if cell < 1:
        raise StageInputError(f"LIME superpixel cell must be ≥ 1 pixel; got {cell}")
    rows = torch.arange(height) // cell
    cols = torch.arange(width) // cell
    per_row = (width + cell - 1) // cell
    return rows[:, None] * per_row + cols[None, :]


def lime_segments(x: torch.Tensor, segmentation: str = "grid", *, cell: int = 8, n_segments: int = 64,
                  compactness: float = 2.0) -> torch.Tensor:
    """``(N, H, W)`` int64 superpixel labels of the inputs ``(N, C, H, W)`` by method name (see module docstring)."""
    n, _, h, w = x.shape
    if segmentation == "grid":
        return grid_segments(h, w, cell).expand(n, h, w)
    if segmentation == "slic":
        return torch.stack([slic_segments(img, n_segments, compactness=compactness) for img in x])
    raise StageInputError(f"unknown LIME segmentation {segmentation!r}; use one of {', '.join(SEGMENTATIONS)}")


def ridge_surrogate(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge with unpenalised intercept: ``(coef (T, S), intercept (T,))`` for ``z (n, S)``, ``y (n, T)``."""
    z, y, wts = z.double(), y.double(), weights.double()
    total = wts.sum()
    zm = (wts[:, None] * z).sum(0) / total
    ym = (wts[:, None] * y).sum(0) / total
    zc, yc = z - zm, y - ym
    gram = zc.T @ (wts[:, None] * zc) + float(ridge) * torch.eye(z.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(gram, zc.T @ (wts[:, None] * yc))  # (S, T)
    return coef.T, ym - zm @ coef


def _one_target(target: Target, i: int) -> Target:
    """Image ``i``'s target (a per-image class list becomes that image's class)."""
    if isinstance(target, UnitTarget):
        return target
    if isinstance(target, RowUnitTarget):
        return RowUnitTarget(target.layer, [int(target.units[i])], target.reduce)
    t = torch.as_tensor(target).reshape(-1)
    return int(t[i] if t.numel() > 1 else t[0])


def lime(model: nn.Module, x: torch.Tensor, target: Target, *, segments: torch.Tensor | None = None, cell: int = 8,
         samples: int = 256, kernel_width: float = 0.25, ridge: float = 1.0, fill: str | float = "mean",
         seed: int = 0, image_ids: torch.Tensor | None = None, batch: int = 256, segmentation: str = "grid",
         n_segments: int = 64, compactness: float = 2.0) -> torch.Tensor:
    """LIME maps: each pixel gets its superpixel's surrogate coefficient.

    ``segmentation`` (``"grid"`` with ``cell``, or ``"slic"`` with ``n_segments`` and ``compactness``) is used
    when ``segments`` is not given. Returns ``(N, H, W)`` for a class target, ``(N, U, H, W)`` for unit targets.
    """
    x = x.detach()
    n, c, h, w = x.shape
    if samples < 2:
        raise StageInputError(f"LIME needs at least 2 samples; got {samples}")
    segs = (lime_segments(x, segmentation, cell=cell, n_segments=n_segments, compactness=compactness)
            if segments is None else torch.as_tensor(segments))
    if segs.shape != (n, h, w):
        raise StageInputError(f"LIME segments must be (N, H, W) = {(n, h, w)}; got {tuple(segs.shape)}")
    ids = torch.arange(n) if image_ids is None else torch.as_tensor(image_ids)
    units = resolve_units(model, x, target) if isinstance(target, UnitTarget) else None
    out = []
    for i in range(n):
        _, seg = torch.unique(segs[i], return_inverse=True)
        seg = seg.to(x.device)
        s = int(seg.max()) + 1
        onehot = torch.nn.functional.one_hot(seg.reshape(-1), s).to(x.dtype)  # (HW, S)
        img = x[i].reshape(c, -1)
        if fill == "mean":
            colour = (img @ onehot) / onehot.sum(0)  # (C, S)
            fill_img = (colour @ onehot.T).reshape(c, h, w)
        else:
            fill_img = torch.full_like(x[i], float(fill))
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(ids[i]))
        bits = torch.randint(0, 2, (samples, s), generator=gen).to(x.dtype).to(x.device)
        bits[0] = 1
        scores = []
        for start in range(0, samples, batch):
            on = (bits[start:start + batch] @ onehot.T).reshape(-1, 1, h, w)
            xp = on * x[i] + (1 - on) * fill_img
            scores.append(target_scores(model, xp, _one_target(target, i), units=units))
        y = torch.cat(scores)  # (samples, T)
        cos = bits.sum(1) / (bits.norm(dim=1) * s**0.5).clamp(min=1e-12)
        dist = 1 - cos
        pi = torch.exp(-(dist**2) / (2 * float(kernel_width) ** 2))
        coef, _ = ridge_surrogate(bits.cpu(), y.cpu(), pi.cpu(), ridge)  # (T, S)
        out.append(coef.to(x.dtype).to(x.device)[:, seg])  # (T, H, W)
    maps = torch.stack(out)
    return maps if units is not None else maps[:, 0]
