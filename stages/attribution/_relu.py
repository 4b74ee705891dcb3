"""Modified ReLU backward rules (guided backpropagation, deconvnet) that also catch in-place and functional ReLUs.

Backward rule at a ReLU with forward input ``x`` and incoming gradient ``g``:

=============================  =====================
plain backprop                 ``I[x>0]·g``
deconvnet (Zeiler & Fergus)    ``I[g>0]·g``
guided backprop (Springenberg)  ``I[x>0]·I[g>0]·g``
=============================  =====================

captum installs these rules as backward hooks on ``nn.ReLU`` modules only, so ReLUs written as
``torch.relu``/``F.relu``/``x.relu()`` in ``forward`` silently keep the plain rule, and in-place ReLUs are
refused by full backward hooks. Here the rule is a custom :class:`torch.autograd.Function` (forward = relu,
backward = the rule), so it works wherever the ReLU is and whatever instance is reused:

* every ``nn.ReLU`` module (in-place or not) is swapped for a rule module for the duration of the
  ``with`` block and put back afterwards;
* the functional forms ``torch.relu``, ``torch.relu_``, ``torch.nn.functional.relu``/``relu_`` and
  ``Tensor.relu``/``relu_`` are replaced for the duration of the block; the replacement applies the rule only
  in the thread that opened the block (a thread-local flag), so other threads' forward passes are
  untouched.

What cannot be honoured is refused, in one message naming the modules: other activations
(``LeakyReLU``, ``PReLU``, ``ReLU6``, ``GELU``, ``SiLU``, ``ELU``, ``Hardtanh``, ...) have no guided rule here.
A ReLU reached through a path the patch cannot see (a C++ extension, ``torch.clamp(min=0)``) keeps the plain
rule — the same limit every hook-based implementation has.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StageInputError

__all__ = ["RULES", "relu_rule", "relu_backward_rule"]

RULES = ("plain", "guided", "deconvnet")

_UNSUPPORTED = (nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh,
                nn.Hardswish, nn.Mish, nn.Softplus, nn.RReLU, nn.Hardsigmoid, nn.Tanh, nn.Sigmoid)


def relu_backward_rule(x: torch.Tensor, g: torch.Tensor, rule: str) -> torch.Tensor:
    """The table above: the gradient a ReLU with input ``x`` passes back for incoming gradient ``g``."""
    # threshold_backward(g, x, 0) = I[x>0]·g in one fused pass (what autograd's own ReLU backward runs)
    if rule == "plain":
        return torch.ops.aten.threshold_backward(g, x, 0)
    if rule == "deconvnet":
        return g.clamp(min=0)
    if rule == "guided":
        return torch.ops.aten.threshold_backward(g.clamp(min=0), x, 0)
    if rule == "linear":  # internal: receptive-field probing (every path counts)
        return g
    raise StageInputError(f"unknown ReLU rule {rule!r}; use one of {RULES}")


class _RuleReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        ctx.rule = rule
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return relu_backward_rule(x, g, ctx.rule), None


class _RuleReLU(nn.Module):
    """Stand-in for an ``nn.ReLU`` while a rule is active (always out of place)."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule

    @property
    def effective_rule(self) -> str:
        """The rule this ReLU applies now: the innermost active :func:`relu_rule` context's, else its own."""
        return _active_rule() or self.rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RuleReLUFn.apply(x, self.effective_rule)


_STATE = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]
_ORIGINALS: dict[str, Any] = {}


def _active_rule() -> str | None:
    return getattr(_STATE, "rule", None)


def _functional(name: str) -> Any:
    original = _ORIGINALS[name]

    def relu(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rule = _active_rule()
        if rule is None or not isinstance(x, torch.Tensor):
            return original(x, *args, **kwargs)
        inplace = name.endswith("_") or bool(kwargs.get("inplace", args[0] if args else False))
        out = _RuleReLUFn.apply(x, rule)
        if inplace and not x.requires_grad:
            return x.copy_(out)
        return out  # an in-place ReLU on a tensor in the graph becomes out of place (same values)

    relu.__name__ = name
    return relu


_TARGETS = {
    "torch.relu": (torch, "relu"),
    "torch.relu_": (torch, "relu_"),
    "F.relu": (F, "relu"),
    "F.relu_": (F, "relu_"),
    "Tensor.relu": (torch.Tensor, "relu"),
    "Tensor.relu_": (torch.Tensor, "relu_"),
}


def _install() -> None:
    with _PATCH_LOCK:
        if _PATCH_DEPTH[0] == 0:
            for key, (owner, attr) in _TARGETS.items():
                _ORIGINALS[key] = getattr(owner, attr)
            for key, (owner, attr) in _TARGETS.items():
                setattr(owner, attr, _functional(key))
        _PATCH_DEPTH[0] += 1


def _uninstall() -> None:
    with _PATCH_LOCK:
        _PATCH_DEPTH[0] -= 1
        if _PATCH_DEPTH[0] == 0:
            for key, (owner, attr) in _TARGETS.items():
                setattr(owner, attr, _ORIGINALS.pop(key))


def _check_activations(model: nn.Module, rule: str) -> None:
    bad = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, _UNSUPPORTED)]
    if bad:
        raise StageInputError(
            f"the {rule} rule is defined for ReLU only, and this model has other activations: {', '.join(bad[:8])}"
            f"{' …' if len(bad) > 8 else ''}; use saliency, Grad-CAM, occlusion or LIME for it"
        )


@contextlib.contextmanager
def relu_rule(model: nn.Module, rule: str) -> Iterator[nn.Module]:
    """Within the block, every ReLU of ``model`` (module, in-place or functional) back-propagates by ``rule``.

    The model is modified in place (its ``nn.ReLU`` children swapped) and restored on exit, even on error.
    Not safe for two threads using the *same* model object at once: give each its own copy.
    """
    if rule not in RULES + ("linear",):
        raise StageInputError(f"unknown ReLU rule {rule!r}; use one of {RULES}")
    if rule in ("guided", "deconvnet"):
        _check_activations(model, rule)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                swapped.append((parent, name, child))
                setattr(parent, name, _RuleReLU(rule))
    previous = _active_rule()
    _install()
    _STATE.rule = rule
    try:
        yield model
    finally:
        _STATE.rule = previous
        _uninstall()
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
