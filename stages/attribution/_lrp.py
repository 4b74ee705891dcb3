"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019): ε, z⁺ and αβ rules.

With ``z_ij = a_i w_ij`` and ``z_j = Σ_i z_ij + b_j``:

* ε rule: ``R_i = Σ_j z_ij / (z_j + ε·sign(z_j)) · R_j`` (``sign(0) = +1``, captum's convention); relevance
  absorbed by biases and ε is lost, so on a bias-free net ``Σ R = f_c(x)`` as ε → 0.
* z⁺ rule: ``R_i = Σ_j a_i w⁺_ij / Σ_i a_i w⁺_ij · R_j`` (bias ignored): conservative, and ``R ≥ 0`` when the
  layer's inputs are ≥ 0 (post-ReLU) and ``R_j ≥ 0``. It is meant for layers with non-negative inputs;
  on the pixel layer of normalised images it is not (use ε there, ``input_rule="epsilon"``).
* αβ rule (Bach et al. 2015, eq. 60): with ``z⁺_ij = (a_i w_ij)⁺``, ``z⁻_ij = (a_i w_ij)⁻``,
  ``R_i = Σ_j [α·z⁺_ij / Σ_i z⁺_ij − β·z⁻_ij / Σ_i z⁻_ij] · R_j`` with ``α − β = 1`` (α2β1, α1β0, ...);
  biases are left out of both denominators (Bach et al.'s variant without the bias split; captum's
  ``Alpha1_Beta0_Rule(set_bias_to_zero=True)``), so each layer is conservative, ``Σ_i R_i = (α − β) Σ_j R_j``,
  wherever ``z⁺_j > 0`` and ``z⁻_j < 0``. Unlike z⁺ it is defined for signed inputs: the four sign
  combinations are computed separately, ``Σ_i z⁺_ij = a⁺·w⁺ + a⁻·w⁻`` and ``Σ_i z⁻_ij = a⁺·w⁻ + a⁻·w⁺``. A
  denominator that is exactly 0 (no contribution of that sign) passes nothing (stabilised by ±1e-12), as in
  zennit/captum; α1β0 on non-negative inputs is exactly z⁺.

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

LRP_RULES = ("epsilon", "zplus", "alphabeta")

_RULE_LAYERS = (nn.Conv2d, nn.Linear)
_EPS_LAYERS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_PASS = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity, nn.Unflatten)
_FX_FUNCTIONS = {torch.flatten, torch.relu, F.relu, getattr, operator.getitem, torch.reshape}
_FX_METHODS = {"flatten", "view", "reshape", "relu", "size", "contiguous", "float"}


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _weighted(module: nn.Module, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's linear map with weight ``w`` and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(a, w)
    return F.conv2d(a, w, None, module.stride, module.padding, module.dilation, module.groups)


def _plus_forward(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return _weighted(module, a, module.weight.clamp(min=0))


def _alpha_beta(module: nn.Module, a: torch.Tensor, relevance: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``R_i`` of the αβ rule (module docstring) for one conv/linear layer: input ``a``, output relevance ``R_j``."""
    wp, wn = module.weight.clamp(min=0), module.weight.clamp(max=0)
    with torch.enable_grad():
        ap = a.detach().clamp(min=0).requires_grad_(True)
        an = a.detach().clamp(max=0).requires_grad_(True)
        zp = _weighted(module, ap, wp) + _weighted(module, an, wn)  # Σ_i z⁺_ij ≥ 0
        zn = _weighted(module, ap, wn) + _weighted(module, an, wp)  # Σ_i z⁻_ij ≤ 0
        gp = torch.autograd.grad(zp, (ap, an), grad_outputs=relevance / (zp.detach() + 1e-12), retain_graph=False)
        gn = torch.autograd.grad(zn, (ap, an), grad_outputs=relevance / (zn.detach() - 1e-12))
    return alpha * (ap.detach() * gp[0] + an.detach() * gp[1]) - beta * (ap.detach() * gn[0] + an.detach() * gn[1])


class _LRPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, module: nn.Module, rule: str, eps: float,
                alpha_beta: tuple[float, float]) -> torch.Tensor:
        ctx.module, ctx.rule, ctx.eps, ctx.alpha_beta = module, rule, eps, alpha_beta
        ctx.save_for_backward(a)
        return module(a)

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (a,) = ctx.saved_tensors
        if ctx.rule == "alphabeta":
            return _alpha_beta(ctx.module, a, relevance, *ctx.alpha_beta), None, None, None, None
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            z = _plus_forward(ctx.module, leaf) if ctx.rule == "zplus" else ctx.module(leaf)
            eps = ctx.eps if ctx.rule == "epsilon" else 1e-12
            s = relevance / _stabilize(z.detach(), eps)
            c = torch.autograd.grad(z, leaf, grad_outputs=s)[0]
        return a * c, None, None, None, None


class _LRPLayer(nn.Module):
    def __init__(self, module: nn.Module, rule: str, eps: float, alpha_beta: tuple[float, float] = (1.0, 0.0)) -> None:
        super().__init__()
        self.inner, self.rule, self.eps, self.alpha_beta = module, rule, eps, alpha_beta

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return _LRPFn.apply(a, self.inner, self.rule, self.eps, self.alpha_beta)


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
def _lrp_rules(model: nn.Module, rule: str, eps: float, input_rule: str | None,
               alpha_beta: tuple[float, float] = (1.0, 0.0)) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    first = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _RULE_LAYERS):
                layer_rule = input_rule if (first and input_rule) else rule
                first = False
                swapped.append((parent, name, child))
                setattr(parent, name, _LRPLayer(child, layer_rule, eps, alpha_beta))
            elif isinstance(child, _EPS_LAYERS):
                swapped.append((parent, name, child))
                setattr(parent, name, _LRPLayer(child, "epsilon", eps))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def lrp(model: nn.Module, x: torch.Tensor, target: Target, *, rule: str = "epsilon", epsilon: float = 1e-9,
        input_rule: str | None = None, alpha: float = 2.0, beta: float = 1.0, unit_chunk: int = 16) -> torch.Tensor:
    """Relevance at the input: ``(N, C, H, W)`` (class) or ``(N, U, C, H, W)`` (units); ``Σ R ≈`` the target value.

    Args:
        rule: ``"epsilon"``, ``"zplus"`` or ``"alphabeta"`` for every conv/linear layer.
        epsilon: the ε of the ε rule (captum's default 1e-9).
        input_rule: a different rule for the first conv/linear layer (e.g. ``"epsilon"`` under z⁺, whose
            inputs are signed pixels). The layer order is module registration order.
        alpha, beta: the αβ rule's weights (used when ``rule`` or ``input_rule`` is ``"alphabeta"``); they
            must satisfy ``α − β = 1`` and ``β ≥ 0`` (α2β1 by default; α1β0 is z⁺ on non-negative inputs).
    """
    for r in (rule, input_rule):
        if r is not None and r not in LRP_RULES:
            raise StageInputError(f"unknown LRP rule {r!r}; use one of {LRP_RULES}")
    if "alphabeta" in (rule, input_rule) and not (beta >= 0 and abs(float(alpha) - float(beta) - 1.0) <= 1e-9):
        raise StageInputError(f"the LRP αβ rule needs α − β = 1 and β ≥ 0 (conservation); got α={alpha}, β={beta}: "
                              "use e.g. α=2, β=1 or α=1, β=0")
    _check_graph(model)
    # Module layers are swapped in the model's own tree, so the target layer names of the engine's hooks
    # point at the wrapped modules; capture hooks are registered on the same names afterwards.
    with relu_rule(model, "plain"), _lrp_rules(model, rule, float(epsilon), input_rule, (float(alpha), float(beta))):
        return backward_maps(model, x, target, relevance=True, unit_chunk=unit_chunk)[0]
