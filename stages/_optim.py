"""SGD and Adam(W) steps through ``torch.optim``'s functional kernels, without ``torch.optim.Optimizer``.

Why: every method of ``torch.optim.Optimizer`` that a training loop calls (``zero_grad``, ``step``,
``add_param_group``) imports ``torch._dynamo`` on its first call (the ``torch._disable_dynamo`` and
``_use_grad_for_differentiable`` wrappers), and with it sympy, triton and the FX machinery: measured +150 MB
resident on torch 2.14 — more than everything else a quick run holds of its own. The update rules
themselves are plain functions (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``) that only touch
``torch._dynamo`` when called inside ``torch.compile``. These classes keep the optimizer's bookkeeping —
parameter groups, per-parameter state, the learning rate schedule — and call exactly those functions with
exactly the arguments ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` pass on (``foreach``/``fused`` left to
torch's default choice, so CUDA still gets the multi-tensor kernels). The results are the same bits as the
``torch.optim`` classes give (tested step by step against them, SGD with Nesterov momentum, Adam and AdamW,
with two parameter groups and a changing learning rate).

A ``LambdaLR`` schedule is :meth:`set_lr_factor`: every group's ``lr`` becomes its initial ``lr`` times the
factor (the same float product ``LambdaLR`` computes).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

__all__ = ["PlainSGD", "PlainAdam"]


class _PlainOptimizer:
    """Parameter groups (each a dict with ``params`` and its hyper-parameters) and per-parameter state."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]], defaults: dict[str, Any]):
        items = list(params)
        if not items:
            raise ValueError("the optimizer got an empty parameter list")
        groups = items if isinstance(items[0], Mapping) else [{"params": items}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one parameter group")
                seen.add(id(p))
            group["initial_lr"] = group["lr"]
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        """Drop every gradient (``Optimizer.zero_grad(set_to_none=True)``)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def set_lr_factor(self, factor: float) -> None:
        """``lr = initial lr × factor`` in every group (what ``LambdaLR`` sets at each step)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                self._update(group, [p for p in group["params"] if p.grad is not None])

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError


class PlainSGD(_PlainOptimizer):
    """``torch.optim.SGD``'s update (momentum, Nesterov, L2 weight decay) without ``torch._dynamo``."""

    def __init__(self, params: Iterable[Any], *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        momentum = group["momentum"]
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params] if momentum != 0 else []
        _sgd(params, [p.grad for p in params], buffers, has_sparse_grad=any(p.grad.is_sparse for p in params),
             foreach=None, fused=None, grad_scale=None, found_inf=None, weight_decay=group["weight_decay"],
             momentum=momentum, lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
             maximize=False)
        for p, buffer in zip(params, buffers):
            self.state.setdefault(p, {})["momentum_buffer"] = buffer


class PlainAdam(_PlainOptimizer):
    """``torch.optim.Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``) without ``torch._dynamo``."""

    def __init__(self, params: Iterable[Any], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": (float(betas[0]), float(betas[1])), "eps": eps,
                                  "weight_decay": weight_decay, "decoupled": decoupled})

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("Adam does not support sparse gradients")
        for p in params:
            if p not in self.state:
                # as torch.optim.Adam: the step count is a float32 CPU scalar, the moments zeros like p
                self.state[p] = {"step": torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu"),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        _adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], foreach=None, capturable=False, differentiable=False, fused=None,
              grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(p) for p in params),
              decoupled_weight_decay=group["decoupled"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
