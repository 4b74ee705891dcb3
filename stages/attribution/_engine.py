"""Targets and the one backward engine every gradient-family method shares.

A *target* says which scalar per example is explained:

* a class: an ``int`` (the same class for every example) or a ``(N,)`` integer tensor (one class per
  example) — the model's **logit** (Simonyan et al. 2013 and Grad-CAM use logits, not probabilities);
* a unit: :class:`UnitTarget` (``layer``, ``units``, ``reduce``) — channel ``k`` of a named layer, reduced
  over space by ``"mean"`` or ``"max"``. ``units=None`` means every unit of the layer.

Unit targets for many units are computed **batched, not one call per unit** (the replication trick):
each input is repeated ``m`` times (one copy per unit of a chunk of ``m`` units, batch ``N·m``), the forward
pass stops at the target layer (a hook raises once the layer's output is captured, so nothing above the
layer is computed), the objective ``Σ_{b,k} φ(A[copy(b,k), k])`` is built and **one** backward pass gives
every copy its own unit's gradient, because copies never interact in an ``eval()`` network (no batch
statistics, no dropout). Cost: one truncated forward + one backward on ``N·m`` images per chunk, i.e. the
same arithmetic as ``m`` separate calls but in one autograd graph with large kernels, no per-call hook
registration, no forward beyond the layer, and memory ``m×`` that of one call (bounded by ``unit_chunk``).

The engine returns the gradient (or, for LRP, the relevance) of the objective at the input or at an
intermediate layer, plus that layer's activation — which is what Grad-CAM needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .._errors import StageInputError

__all__ = ["UnitTarget", "RowUnitTarget", "Target", "module_by_name", "class_indices", "backward_maps", "target_scores"]


@dataclass(frozen=True)
class UnitTarget:
    """Explain unit(s) of ``layer``: channel ``k``'s spatial ``reduce`` (``"mean"`` or ``"max"``).

    ``units=None`` explains every unit of the layer; maps then have a unit axis after the batch axis.
    """

    layer: str
    units: Sequence[int] | None = None
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise StageInputError(f"UnitTarget.reduce must be 'mean' or 'max'; got {self.reduce!r}")


@dataclass(frozen=True)
class RowUnitTarget:
    """One unit per input row: row ``i`` explains unit ``units[i]`` of ``layer`` (e.g. each unit's own exemplars
    stacked into one batch). Maps have no unit axis: ``(N, ...)`` like a class target."""

    layer: str
    units: Sequence[int]
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise StageInputError(f"RowUnitTarget.reduce must be 'mean' or 'max'; got {self.reduce!r}")


Target = int | Sequence[int] | torch.Tensor | UnitTarget | RowUnitTarget


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once every needed layer has run."""


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` (``dict(model.named_modules())[name]``), or one clear error."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        shown = ", ".join(n for n in modules if n)[:400]
        raise StageInputError(f"layer {name!r} is not a module of {type(model).__name__}; modules: {shown}")
    return modules[name]


def class_indices(target: int | Sequence[int] | torch.Tensor, n: int, num_outputs: int) -> torch.Tensor:
    """``(n,)`` int64 class index per example, checked against the model's ``num_outputs``."""
    t = torch.as_tensor(target, dtype=torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise StageInputError(f"target has {t.numel()} class indices for {n} inputs; give one int or one per input")
    if n and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
        raise StageInputError(f"target class {t.tolist()} out of range for a model with {num_outputs} outputs")
    return t


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str], stop_after: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``names`` during forward; raise :class:`_Stop` right after ``stop_after`` runs."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        module = module_by_name(model, name)

        def hook(_m: nn.Module, _i: object, output: torch.Tensor, name: str = name) -> None:
            if not isinstance(output, torch.Tensor):
                raise StageInputError(f"layer {name!r} does not output one tensor; pick a conv block or linear layer")
            store[name] = output
            if stop_after is not None and all(n in store for n in names):
                raise _Stop

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, x: torch.Tensor, names: Sequence[str], stop: bool) -> tuple[torch.Tensor | None, dict]:
    with _capture(model, names, "stop" if stop else None) as store:
        try:
            out = model(x)
        except _Stop:
            out = None
    return out, dict(store)


def _reduce(a: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, h, w)`` or ``(B,)`` → ``(B,)``: spatial mean or max (``amax``: ties share the gradient, as captum)."""
    if a.ndim == 1:
        return a
    return a.flatten(1).mean(1) if how == "mean" else a.flatten(1).amax(1)


def _units(target: UnitTarget, channels: int) -> list[int]:
    units = list(range(channels)) if target.units is None else [int(u) for u in target.units]
    bad = [u for u in units if not 0 <= u < channels]
    if bad:
        raise StageInputError(f"units {bad} out of range for layer {target.layer!r} with {channels} units")
    return units


def _layer_channels(model: nn.Module, x: torch.Tensor, layer: str) -> int:
    with torch.no_grad():
        _, store = _forward(model, x[:1], [layer], stop=True)
    return int(store[layer].shape[1])


def backward_maps(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    wrt: str | None = None,
    relevance: bool = False,
    unit_chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the target at the input (``wrt=None``) or at layer ``wrt``'s output, and what it was taken at.

    Args:
        model: in ``eval()`` mode; any gradient rules (guided backprop, LRP) are already installed.
        x: ``(N, C, H, W)`` float input.
        target: class index(es) or a :class:`UnitTarget`.
        wrt: ``None`` for the input, else a layer name below the target.
        relevance: seed the backward with ``output ⊙ ∂φ/∂output`` (LRP: relevance = the explained value)
            instead of ``∂φ/∂output``.
        unit_chunk: units per replicated batch (memory: ``unit_chunk×`` one call's).

    Returns:
        ``(grad, at)``: for a class target ``(N, *shape)``; for a unit target ``(N, U, *shape)`` where shape is
        the input's or the layer's; ``at`` is the input or the layer's activation with the same layout.
    """
    if x.ndim < 2:
        raise StageInputError(f"inputs must be batched (N, C, H, W); got shape {tuple(x.shape)}")
    x = x.detach()
    if isinstance(target, RowUnitTarget):
        cols = [int(u) for u in target.units]
        if len(cols) != x.shape[0]:
            raise StageInputError(f"RowUnitTarget has {len(cols)} units for {x.shape[0]} inputs; give one per input")
        _units(UnitTarget(target.layer, cols), _layer_channels(model, x, target.layer))
        return _unit_rows(model, x, cols, target.layer, target.reduce, wrt, relevance)
    if isinstance(target, UnitTarget):
        units = _units(target, _layer_channels(model, x, target.layer))
        grads, ats = [], []
        for start in range(0, len(units), max(1, int(unit_chunk))):
            chunk = units[start:start + max(1, int(unit_chunk))]
            m = len(chunk)
            g, at = _unit_rows(model, x.repeat_interleave(m, dim=0), chunk * x.shape[0], target.layer,
                               target.reduce, wrt, relevance)
            grads.append(g.reshape(x.shape[0], m, *g.shape[1:]))
            ats.append(at.reshape(x.shape[0], m, *at.shape[1:]))
        return torch.cat(grads, 1), torch.cat(ats, 1)
    xr = x.clone().requires_grad_(True)
    out, store = _forward(model, xr, [wrt] if wrt else [], stop=False)
    if out is None or out.ndim != 2:
        raise StageInputError(f"a class target needs a model that outputs (N, classes) logits; got "
                              f"{None if out is None else tuple(out.shape)}")
    t = class_indices(target, x.shape[0], out.shape[1]).to(out.device)
    seed = torch.zeros_like(out)
    seed[torch.arange(out.shape[0], device=out.device), t] = 1.0
    if relevance:
        seed = seed * out.detach()
    wrt_t = store[wrt] if wrt else xr
    g = torch.autograd.grad(out, wrt_t, grad_outputs=seed)[0]
    return g, wrt_t.detach()


def _unit_rows(model: nn.Module, xr: torch.Tensor, cols: list[int], layer: str, reduce: str, wrt: str | None,
               relevance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``i`` of ``xr`` explains unit ``cols[i]``: one truncated forward, one backward for all rows."""
    xr = xr.detach().clone().requires_grad_(True)
    _, store = _forward(model, xr, [layer] + ([wrt] if wrt else []), stop=True)
    a = store[layer]
    rows = torch.arange(a.shape[0], device=a.device)
    phi = _reduce(a[rows, torch.as_tensor(cols, device=a.device)], reduce)
    wrt_t = store[wrt] if wrt else xr
    seed = torch.autograd.grad(phi.sum(), a, retain_graph=True)[0]
    if relevance:
        seed = seed * a.detach()
    return torch.autograd.grad(a, wrt_t, grad_outputs=seed)[0], wrt_t.detach()


def target_scores(model: nn.Module, x: torch.Tensor, target: Target, *, units: list[int] | None = None) -> torch.Tensor:
    """``(N, T)`` explained values without gradients: the target logit(s) (T = 1) or every unit's φ (T = U).

    For a unit target the forward stops at the layer. ``units`` fixes the unit list (else from the target).
    """
    with torch.no_grad():
        if isinstance(target, RowUnitTarget):
            _, store = _forward(model, x, [target.layer], stop=True)
            a = store[target.layer]
            cols = torch.as_tensor([int(u) for u in target.units], device=a.device)
            if cols.numel() != a.shape[0]:  # a batch of stacked copies (occlusion, LIME): repeat the unit list
                cols = cols.repeat(a.shape[0] // max(cols.numel(), 1))
            return _reduce(a[torch.arange(a.shape[0], device=a.device), cols], target.reduce)[:, None]
        if isinstance(target, UnitTarget):
            _, store = _forward(model, x, [target.layer], stop=True)
            a = store[target.layer]
            chosen = units if units is not None else _units(target, a.shape[1])
            a = a[:, chosen]
            if a.ndim == 2:
                return a
            return a.flatten(2).mean(2) if target.reduce == "mean" else a.flatten(2).amax(2)
        out = model(x)
        t = class_indices(target, x.shape[0], out.shape[1]).to(out.device)
        return out.gather(1, t[:, None])


def resolve_units(model: nn.Module, x: torch.Tensor, target: UnitTarget) -> list[int]:
    """The unit list a :class:`UnitTarget` means for this model (``None`` → every unit of the layer)."""
    return _units(target, _layer_channels(model, x, target.layer))


ScoreFn = Callable[[torch.Tensor], torch.Tensor]
