"""Interpretable CNN training (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018).

One conv layer of any network is made interpretable: each of its filters is pushed to fire on one part of one
category. Two pieces, both attached to the chosen layer's (post-ReLU) output ``x`` of shape ``(B, C, H, W)``
by a forward hook, so any registry network whose layer is a named module can take them:

* **Forward: the template mask.** ``μ̂ = argmax_ij x_ij`` per image and filter (or the activation-weighted
  centroid, rounded to a cell), treated as a constant (no gradient through the choice), and
  ``x_masked = max(x ∘ m_μ̂, 0)`` goes on to the next layer, where ``m_μ(i, j) = max(1 − β·d_μ(i, j), −1)`` is
  the positive template divided by τ (the mask the authors' code applies) and
  ``d_μ(i, j) = |i − μ_i|/H + |j − μ_j|/W`` (the paper's ``‖[i, j] − μ‖₁ / n`` for an n×n map).
* **Backward: the filter loss** ``Loss_f = −MI(X; T)`` between the batch's feature maps of filter f and the
  templates ``T ∈ {T⁻, T_μ1 … T_μHW}``: positive templates ``t⁺_μ = τ·m_μ`` (one per location) and the
  negative template ``T⁻ ≡ −τ``; priors ``p(T_μ) = α/HW``, ``p(T⁻) = 1 − α`` with the paper's
  ``α = HW/(1 + HW)``, i.e. the uniform prior ``1/(1 + HW)`` over the ``1 + HW`` templates; likelihood
  ``p(x|T) = exp(tr(x·T)) / Z_T`` with ``Z_T`` summed over the mini-batch (log-sum-exp). A filter belongs to
  one category: its positive templates range over the batch images of that category only, T⁻ over all
  images. Computed with autograd on the **pre-mask** map (the reference implementations inject a
  hand-derived approximate gradient instead; the exact loss is logged here, with its decomposition

      −MI = −H(T) + H(T′|X) + Σ_x p(T⁺, x)·H(T⁺|X = x),

  T′ = {T⁻, T⁺}: a constant, the inter-category term — each image either clearly fires or is silent — and
  the spatial term — when it fires, at one location).

Filters are assigned to the category on which they respond most: an exponential moving average, per class,
of the batch mean of the filter's maximum activation over that class's images (the authors' code), updated
from every training batch before its loss; the final map is saved with the model.

Finite everywhere by construction: a dead filter (all zeros) has uniform likelihoods and MI 0; a filter whose
category is absent from the batch keeps only T⁻ (MI 0); an empty batch gives 0; large activations stay in
log-space. Masked entries never produce ``0·∞`` in the forward or backward pass.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._errors import StageInputError

__all__ = [
    "LOCATE_METHODS",
    "FILTER_LOSS_COLUMNS",
    "template_masks",
    "positive_templates",
    "locate_parts",
    "mask_feature_map",
    "filter_mi_terms",
    "FilterCategories",
    "InterpretableLayer",
    "iter_layers_after",
]

LOCATE_METHODS = ("argmax", "centroid")

#: extra history columns of an interpretable training run (batch means over the epoch, summed over filters)
FILTER_LOSS_COLUMNS = ("filter_loss", "filter_inter_category", "filter_spatial")


def _l1_distance(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``(H·W, H, W)``: ``|i − μ_i|/H + |j − μ_j|/W`` for every location μ (row-major) and cell (i, j)."""
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    dr = (rows.view(-1, 1) - rows.view(1, -1)).abs() / height  # (μ_i, i)
    dc = (cols.view(-1, 1) - cols.view(1, -1)).abs() / width  # (μ_j, j)
    dist = dr.view(height, 1, height, 1) + dc.view(1, width, 1, width)  # (μ_i, μ_j, i, j)
    return dist.reshape(height * width, height, width)


def template_masks(height: int, width: int, beta: float, *, device: torch.device | None = None) -> torch.Tensor:
    """The mask shapes ``m_μ = max(1 − β·d_μ, −1)``, one per location μ (row-major).

    Args:
        height, width: the feature map's size H × W.
        beta: the template's slope β (paper: 4).

    Returns:
        ``(H·W, H, W)`` float32; ``m_μ(μ) = 1``, and ``m_μ ≤ 0`` where ``d_μ ≥ 1/β``.
    """
    if height < 1 or width < 1:
        raise StageInputError(f"template masks need a map of at least 1×1; got {height}×{width}")
    if not beta > 0:
        raise StageInputError(f"template slope beta must be positive; got {beta!r}")
    return torch.clamp(1.0 - float(beta) * _l1_distance(height, width, device), min=-1.0)


def positive_templates(height: int, width: int, tau: float, beta: float, *,
                       device: torch.device | None = None) -> torch.Tensor:
    """The paper's positive templates ``t⁺_μ = τ·max(1 − β·‖[i, j] − μ‖₁/n, −1)`` (generalised to H × W).

    Returns:
        ``(H·W, H, W)`` float32: τ at μ, decreasing linearly in L1 distance, saturating at −τ.
    """
    return float(tau) * template_masks(height, width, beta, device=device)


def locate_parts(x: torch.Tensor, method: str = "argmax") -> torch.Tensor:
    """The part location μ̂ of every (image, filter) map, as a flat row-major index, without gradient.

    Args:
        x: ``(B, C, H, W)`` feature maps (post-ReLU).
        method: ``"argmax"`` (the paper; first maximum on ties) or ``"centroid"`` (the authors' code: the
            activation-weighted mean position, rounded to the nearest cell; an all-zero map falls back to
            its argmax, cell 0).

    Returns:
        ``(B, C)`` int64.
    """
    if method not in LOCATE_METHODS:
        raise StageInputError(f"part location method must be one of {LOCATE_METHODS}; got {method!r}")
    x = x.detach()
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    if method == "argmax":
        return flat.argmax(dim=2)
    weights = flat.clamp(min=0).to(torch.float64)
    total = weights.sum(dim=2)
    rows = torch.arange(h, dtype=torch.float64, device=x.device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=x.device).repeat(h)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    r = torch.round((weights * rows).sum(dim=2) / safe).clamp(0, h - 1)
    cc = torch.round((weights * cols).sum(dim=2) / safe).clamp(0, w - 1)
    centroid = (r * w + cc).to(torch.int64)
    return torch.where(total > 0, centroid, flat.argmax(dim=2))


def mask_feature_map(x: torch.Tensor, mu: torch.Tensor, beta: float, masks: torch.Tensor | None = None) -> torch.Tensor:
    """``max(x ∘ m_μ̂, 0)`` per image and filter: zero wherever the template is ≤ 0.

    Args:
        x: ``(B, C, H, W)`` feature maps.
        mu: ``(B, C)`` flat part locations (:func:`locate_parts`), constants.
        beta: template slope.
        masks: precomputed :func:`template_masks` for this H × W (optional).

    Returns:
        ``(B, C, H, W)``; the gradient w.r.t. ``x`` is the incoming gradient times ``max(m_μ̂, 0)``.
    """
    if x.ndim != 4:
        raise StageInputError(f"the interpretable layer must output (B, C, H, W) feature maps; got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if masks is None:
        masks = template_masks(h, w, beta, device=x.device)
    chosen = masks.to(device=x.device, dtype=x.dtype)[mu.reshape(-1)].reshape(x.shape)
    return torch.relu(x * chosen)


def _default_alpha(cells: int) -> float:
    return cells / (1.0 + cells)


def filter_mi_terms(x: torch.Tensor, positives: torch.Tensor, *, tau: float = 0.5, beta: float = 4.0,
                    alpha: float = 0.0, templates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The filter loss ``−MI(X; T)`` of every filter over a batch, and its three-term decomposition.

    Args:
        x: ``(B, C, H, W)`` pre-mask, post-ReLU feature maps of the interpretable layer.
        positives: ``(B, C)`` bool: image b belongs to filter c's category (its positive templates range over
            these images; T⁻ ranges over all of them).
        tau: τ·(H·W): the templates' magnitude is ``τ = tau / (H·W)`` (paper: 0.5/n²).
        beta: template slope β (paper: 4).
        alpha: the paper's α, the prior mass of the positive templates: ``p(T_μ) = α/HW`` and
            ``p(T⁻) = 1 − α``; 0 means the paper's ``HW / (1 + HW)`` (every template ``1/(1 + HW)``).
        templates: precomputed :func:`positive_templates` (optional).

    Returns:
        ``(C,)`` tensors: ``loss`` (= −MI ≤ 0), ``mi``, ``neg_entropy`` (−H(T)), ``inter_category``
        (H(T′|X)) and ``spatial`` (Σ_x p(T⁺, x) H(T⁺|x)); ``loss = neg_entropy + inter_category + spatial``.
        Differentiable in ``x``; finite for dead filters, filters without positives and empty batches.
    """
    if x.ndim != 4:
        raise StageInputError(f"filter loss needs (B, C, H, W) feature maps; got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if tuple(positives.shape) != (b, c):
        raise StageInputError(f"filter loss positives must be (B, C) = {(b, c)}; got {tuple(positives.shape)}")
    cells = h * w
    zero = x.sum(dim=(0, 2, 3)) * 0.0  # (C,), keeps the graph
    if b == 0:
        return {k: zero for k in ("loss", "mi", "neg_entropy", "inter_category", "spatial")}
    alpha = float(alpha) if alpha else _default_alpha(cells)
    if not 0 < alpha < 1:
        raise StageInputError(f"positive-template prior mass alpha must be in (0, 1); got {alpha!r}")
    tau_abs = float(tau) / cells
    if templates is None:
        templates = positive_templates(h, w, tau_abs, beta, device=x.device)
    x32 = x.to(torch.float32)
    positives = positives.to(torch.bool)
    has_pos = positives.any(dim=0)  # (C,)
    # Scores tr(x·T): (B, C, 1 + HW), template 0 = T⁻.
    s_pos = torch.einsum("bchw,mhw->bcm", x32, templates.to(x32))
    s_neg = -tau_abs * x32.sum(dim=(2, 3))
    scores = torch.cat([s_neg.unsqueeze(2), s_pos], dim=2)
    # Support of each template: T⁻ every image; T_μ the filter's positives. A filter without positives in the
    # batch gets prior 0 on its positive templates (support kept full there so every log-sum-exp is finite).
    support_pos = positives | ~has_pos.unsqueeze(0)  # (B, C)
    support = torch.cat([torch.ones_like(support_pos).unsqueeze(2),
                         support_pos.unsqueeze(2).expand(b, c, cells)], dim=2)
    neg_inf = torch.tensor(float("-inf"), dtype=x32.dtype, device=x.device)
    masked = torch.where(support, scores, neg_inf)
    log_lik = masked - torch.logsumexp(masked, dim=0, keepdim=True)  # log p(x_b | T), −inf off the support
    prior = torch.cat([torch.full((c, 1), 1 - alpha, device=x.device),
                       torch.full((c, cells), alpha / cells, device=x.device)], dim=1)
    prior = torch.where(has_pos.unsqueeze(1), prior, torch.cat(
        [torch.ones((c, 1), device=x.device), torch.zeros((c, cells), device=x.device)], dim=1))
    valid = support & (prior > 0).unsqueeze(0)  # (B, C, T): p(T, x_b) > 0
    log_prior = torch.log(torch.where(prior > 0, prior, torch.ones_like(prior)))  # 0 where unused
    log_joint = torch.where(valid, log_prior.unsqueeze(0) + torch.where(valid, log_lik, 0.0), 0.0)
    log_px = torch.logsumexp(torch.where(valid, log_joint, neg_inf), dim=2)  # (B, C): log p(x_b); T⁻ always valid
    joint = torch.where(valid, torch.exp(log_joint), 0.0)
    pointwise = torch.where(valid, log_joint - log_prior.unsqueeze(0) - log_px.unsqueeze(2), 0.0)  # log p(x|T)/p(x)
    mi = (joint * pointwise).sum(dim=(0, 2))
    # Decomposition.
    plogp_prior = torch.where(prior > 0, prior * log_prior, 0.0)
    neg_entropy = plogp_prior.sum(dim=1)  # −H(T)
    log_pos_x = torch.logsumexp(torch.where(valid[:, :, 1:], log_joint[:, :, 1:], neg_inf), dim=2)  # log p(T⁺, x)
    any_pos = valid[:, :, 1:].any(dim=2)
    log_pos_x_safe = torch.where(any_pos, log_pos_x, 0.0)
    p_pos_given = torch.where(any_pos, torch.exp(log_pos_x_safe - log_px), 0.0)  # p(T⁺|x)
    log_p_pos_given = torch.where(any_pos, log_pos_x_safe - log_px, 0.0)
    log_p_neg_given = log_joint[:, :, 0] - log_px
    p_neg_given = torch.exp(log_p_neg_given)
    px = torch.exp(log_px)
    inter = -(px * (p_pos_given * log_p_pos_given + p_neg_given * log_p_neg_given)).sum(dim=0)  # H(T′|X)
    log_q = torch.where(valid[:, :, 1:], log_joint[:, :, 1:] - log_pos_x_safe.unsqueeze(2), 0.0)  # log p(T_μ|x, T⁺)
    q = torch.where(valid[:, :, 1:], torch.exp(log_q), 0.0)
    h_pos = -(q * log_q).sum(dim=2)  # H(T⁺|X = x_b)
    p_joint_pos = torch.where(any_pos, torch.exp(log_pos_x_safe), 0.0)
    spatial = (p_joint_pos * h_pos).sum(dim=0)
    return {"loss": -mi + zero, "mi": mi + zero, "neg_entropy": neg_entropy + zero,
            "inter_category": inter + zero, "spatial": spatial + zero}


class FilterCategories:
    """Each filter's category: argmax over classes of an exponential moving average (per class) of the
    batch mean of the filter's maximum activation over that class's images.

    Deterministic given the batches; before any update every image is a positive of every filter.

    Args:
        num_classes: classes of the task.
        num_filters: filters of the interpretable layer.
        momentum: EMA momentum (the authors' code: 0.9); a class's first observation sets its value.
    """

    def __init__(self, num_classes: int, num_filters: int, momentum: float = 0.9) -> None:
        self.momentum = float(momentum)
        self.response = torch.zeros(num_classes, num_filters, dtype=torch.float64)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in a batch: ``x`` ``(B, C, H, W)`` feature maps, ``labels`` ``(B,)`` class indices."""
        peak = x.detach().amax(dim=(2, 3)).to(torch.float64).cpu()
        labels = labels.detach().cpu()
        for cls in torch.unique(labels).tolist():
            if not 0 <= cls < self.response.shape[0]:
                continue
            mean = peak[labels == cls].mean(dim=0)
            if self.seen[cls]:
                self.response[cls] = self.momentum * self.response[cls] + (1 - self.momentum) * mean
            else:
                self.response[cls] = mean
                self.seen[cls] = True

    def assigned(self) -> torch.Tensor:
        """``(C,)`` int64 category of every filter (lowest class index on ties)."""
        scores = torch.where(self.seen.unsqueeze(1), self.response, torch.tensor(float("-inf"), dtype=torch.float64))
        return scores.argmax(dim=0)

    def positives(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` bool: image b is of filter c's category (all True before the first update)."""
        if not bool(self.seen.any()):
            return torch.ones(labels.shape[0], self.response.shape[1], dtype=torch.bool, device=labels.device)
        return labels.view(-1, 1) == self.assigned().to(labels.device).view(1, -1)

    def table(self, class_names: list[str] | None = None) -> pd.DataFrame:
        """``unit, category, category_name, response`` (the EMA of the assigned class) per filter."""
        assigned = self.assigned().numpy()
        names = class_names or []
        response = self.response.numpy()[assigned, np.arange(len(assigned))] if len(assigned) else np.zeros(0)
        return pd.DataFrame({
            "unit": np.arange(len(assigned), dtype=np.int64),
            "category": assigned.astype(np.int64),
            "category_name": [names[a] if a < len(names) else str(a) for a in assigned],
            "response": response.astype(np.float64),
        })


class InterpretableLayer:
    """The forward hook that makes one named layer interpretable: it keeps the pre-mask map (for the filter
    loss) and passes on the masked map in training, and at evaluation when ``mask_eval``.

    Use as a context manager (or call :meth:`close`) so the hook is removed afterwards.

    Args:
        model: the network (or its :class:`NormalizedModel` wrapper; names refer to the inner network).
        layer: dotted module name of a layer with ``(B, C, H, W)`` output (the built-in CNN: ``conv4``).
        beta: template slope.
        locate: ``"argmax"`` or ``"centroid"``.
        mask_eval: mask in eval mode too (the mask is part of the model, as in the authors' code).
    """

    def __init__(self, model: nn.Module, layer: str, *, beta: float = 4.0, locate: str = "argmax",
                 mask_eval: bool = True) -> None:
        from ._models import resolve_layers

        if locate not in LOCATE_METHODS:
            raise StageInputError(f"interpretable_locate must be one of {LOCATE_METHODS}; got {locate!r}")
        self.module = resolve_layers(model, [layer])[layer]
        self.layer = layer
        self.beta = float(beta)
        self.locate = locate
        self.mask_eval = bool(mask_eval)
        self.features: torch.Tensor | None = None
        self.capture = True
        self._masks: dict[tuple[int, int, str], torch.Tensor] = {}
        self._handle = self.module.register_forward_hook(self._hook)

    def masks(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._masks:
            self._masks[key] = template_masks(height, width, self.beta, device=device)
        return self._masks[key]

    def _hook(self, module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise StageInputError(
                f"interpretable layer {self.layer!r} must output (B, C, H, W) feature maps; got "
                f"{type(output).__name__}{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}; "
                "pick a conv layer (see `repdissect layers`)"
            )
        if self.capture and module.training:
            self.features = output
        if not (module.training or self.mask_eval):
            return None
        mu = locate_parts(output, self.locate)
        return mask_feature_map(output, mu, self.beta, self.masks(*output.shape[-2:], output.device))

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        self._handle.remove()
        self.features = None

    def __enter__(self) -> InterpretableLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_layers_after(model: nn.Module, layer: str, image_size: tuple[int, int]) -> Iterator[str]:
    """Names of the modules that run after ``layer`` in one forward pass (excluding its own submodules)."""
    from ._models import unwrap

    net = unwrap(model)
    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n))
               for name, m in net.named_modules() if name]
    try:
        with torch.inference_mode():
            model.eval()
            model(torch.zeros(1, 3, *image_size, dtype=torch.uint8))
    finally:
        for h in handles:
            h.remove()
    if layer not in order:
        return
    done = order.index(layer)
    for name in order[done + 1:]:
        if not name.startswith(layer + "."):
            yield name
