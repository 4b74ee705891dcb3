"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019): ε and z⁺ rules.

With ``z_ij = a_i w_ij`` and ``z_j = Σ_i z_ij + b_j``:

* ε rule: ``R_i = Σ_j z_ij / (z_j + ε·sign(z_j)) · R_j`` (``sign(0) = +1``, captum's convention); relevance
  absorbed by biases and ε is lost, so on a bias-free net ``Σ R = f_c(x)`` as ε → 0.
* z⁺ rule: ``R_i = Σ_j a_i w⁺_ij / Σ_i a_i w⁺_ij · R_j`` (bias ignored): conservative, and ``R ≥ 0`` when the
  layer's inputs are ≥ 0 (post-ReLU) and ``R_j ≥ 0``. It is meant for layers with non-negative inputs;
  on the pixel layer of normalised images it is not (use ε there, ``input_rule="epsilon"``).

Implementation (the gradient trick of captum and zennit): every ``Conv2d``/``Linear`` (the rule's layers) and
every ``BatchNorm2d``, average and max pool (always ε, i.e. pools pass relevance proportionally and
winner-take-all) is run through a custom autograd function whose backward maps relevance ``R_j`` to
``R_i = a ⊙ J_z(a)ᵀ [R / stab(z)]`` (``J`` = Jacobian of the layer, or of its ``w⁺`` version for z⁺). ReLU,
dropout and flatten keep their ordinary backward. The backward is seeded with ``output ⊙ one-hot`` (a
class) or the unit's activation times ``∂φ/∂A`` (a unit), so relevance sums to the explained value.

Refused, with the reason: models whose forward has operations between modules other than flatten/reshape
and ReLU (residual additions, concatenations: the relevance would be copied, not split) — checked with a
``torch.fx`` trace — and leaf modules with no rule here.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StageInputError
from ._engine import Target, backward_maps
from ._relu import relu_rule

__all__ = ["lrp", "LRP_RULES"]

LRP_RULES = ("epsilon", "zplus")

_RULE_LAYERS = (nn.Conv2d, nn.Linear)
_EPS_LAYERS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_PASS = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity, nn.Unflatten)
_FX_FUNCTIONS = {torch.flatten, torch.relu, F.relu, getattr, operator.getitem, torch.reshape}
_FX_METHODS = {"flatten", "view", "reshape", "relu", "size", "contiguous", "float"}


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _plus_forward(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    w = module.weight.clamp(min=0)
    if isinstance(module, nn.Linear):
        return F.linear(a, w)
    return F.conv2d(a, w, None, module.stride, module.padding, module.dilation, module.groups)


class _LRPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, module: nn.Module, rule: str, eps: float) -> torch.Tensor:
        ctx.module, ctx.rule, ctx.eps = module, rule, eps
        ctx.save_for_backward(a)
        return module(a)

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (a,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            z = _plus_forward(ctx.module, leaf) if ctx.rule == "zplus" else ctx.module(leaf)
            eps = ctx.eps if ctx.rule == "epsilon" else 1e-12
            s = relevance / _stabilize(z.detach(), eps)
            c = torch.autograd.grad(z, leaf, grad_outputs=s)[0]
        return a * c, None, None, None


class _LRPLayer(nn.Module):
    def __init__(self, module: nn.Module, rule: str, eps: float) -> None:
        super().__init__()
        self.inner, self.rule, self.eps = module, rule, eps

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return _LRPFn.apply(a, self.inner, self.rule, self.eps)


def _check_graph(model: nn.Module) -> None:
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means we cannot vouch for the graph
        raise StageInputError(
            f"LRP needs a model whose forward is a chain of modules, and {type(model).__name__} could not be traced "
            f"({type(exc).__name__}: {str(exc)[:120]}); use guided_backprop or grad_cam for it"
        ) from None
    odd = [n.format_node() for n in graph.nodes
           if (n.op == "call_function" and n.target not in _FX_FUNCTIONS)
           or (n.op == "call_method" and n.target not in _FX_METHODS)]
    if odd:
        raise StageInputError(
            f"LRP cannot split relevance across operations between modules (residual additions, concatenations); "
            f"{type(model).__name__} has {odd[:3]}; use guided_backprop, grad_cam or occlusion for it"
        )
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    bad = [f"{name} ({type(m).__name__})" for name, m in leaves
           if not isinstance(m, _RULE_LAYERS + _EPS_LAYERS + _PASS)]
    if bad:
        raise StageInputError(f"LRP has no rule for module(s) {', '.join(bad[:6])}; supported: Conv2d, Linear, "
                              "BatchNorm, average/max pooling, ReLU, Dropout, Flatten")


@contextlib.contextmanager
def _lrp_rules(model: nn.Module, rule: str, eps: float, input_rule: str | None) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    first = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _RULE_LAYERS):
                layer_rule = input_rule if (first and input_rule) else rule
                first = False
                swapped.append((parent, name, child))
                setattr(parent, name, _LRPLayer(child, layer_rule, eps))
            elif isinstance(child, _EPS_LAYERS):
                swapped.append((parent, name, child))
                setattr(parent, name, _LRPLayer(child, "epsilon", eps))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def lrp(model: nn.Module, x: torch.Tensor, target: Target, *, rule: str = "epsilon", epsilon: float = 1e-9,
        input_rule: str | None = None, unit_chunk: int = 16) -> torch.Tensor:
    """Relevance at the input: ``(N, C, H, W)`` (class) or ``(N, U, C, H, W)`` (units); ``Σ R ≈`` the target value.

    Args:
        rule: ``"epsilon"`` or ``"zplus"`` for every conv/linear layer.
        epsilon: the ε of the ε rule (captum's default 1e-9).
        input_rule: a different rule for the first conv/linear layer (e.g. ``"epsilon"`` under z⁺, whose
            inputs are signed pixels). The layer order is module registration order.
    """
    for r in (rule, input_rule):
        if r is not None and r not in LRP_RULES:
            raise StageInputError(f"unknown LRP rule {r!r}; use one of {LRP_RULES}")
    _check_graph(model)
    # Module layers are swapped in the model's own tree, so the target layer names of the engine's hooks
    # point at the wrapped modules; capture hooks are registered on the same names afterwards.
    with relu_rule(model, "plain"), _lrp_rules(model, rule, float(epsilon), input_rule):
        return backward_maps(model, x, target, relevance=True, unit_chunk=unit_chunk)[0]
