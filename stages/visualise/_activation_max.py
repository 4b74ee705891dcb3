"""Activation maximisation and class-model visualisation, every unit of a layer in one batched optimisation.

Simonyan et al. (2014), "Deep Inside Convolutional Networks": ``x* = argmax_x S_c(x) − λ‖x‖²`` by gradient
ascent from noise, for a class score ``S_c`` (the unnormalised logit); Erhan et al. / Yosinski et al. (2015)
and Olah et al. (Distill 2017) apply the same to any unit, with regularisers: L2 decay, Gaussian blur of
the pixels every few steps, transformation robustness (random jitter), and a Fourier / colour-decorrelated
parameterisation (:mod:`._param`).

Objective per unit ``k`` of a layer with output ``A (B, K, h, w)``: ``"channel"`` = ``mean_ij A^k_ij`` (lucid's
channel objective) or ``"neuron"`` = ``A^k`` at the centre cell; a layer that ends in a ReLU is read
*before* it, so a unit that starts switched off still has a gradient. For class models the "layer" is the
network's output and the objective is the logit.

Batching: image ``b`` of the batch is optimised for unit ``units[b]``. The loss is a sum of per-image terms,
Adam is element-wise and the network runs in eval mode (no batch statistics), so image ``b`` receives
exactly the gradient it would alone: the batched optimisation equals one optimisation per unit (up to
floating-point rounding of batched convolutions). The randomness (initial noise, per-step jitter) of unit
``k`` comes from its own generator seeded by ``(seed, k)``, so it does not depend on which units share the
batch. On the CPU a rerun is bit-identical.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._errors import StageInputError
from .._optim import PlainAdam
from ._param import ImageParam

__all__ = ["AMSettings", "AMResult", "activation_maximisation", "layer_output"]


@dataclass(frozen=True)
class AMSettings:
    """Hyperparameters of activation maximisation (all part of the cache key).

    Args:
        steps: Adam steps.
        lr: Adam learning rate on the parameterisation.
        parameterisation: ``"fourier"`` (1/f-scaled spectrum) or ``"pixel"``.
        decorrelate: colour-decorrelated parameterisation.
        objective: ``"channel"`` (mean over positions) or ``"neuron"`` (the centre cell).
        jitter: maximum random shift (pixels, each axis) applied before every forward pass.
        blur_every: Gaussian blur of pixel parameters every this many steps (0 = never; pixel only).
        blur_sigma: the blur's standard deviation in pixels.
        decay: λ of the L2 penalty ``λ · mean((x − ½)²)`` on the [0, 1] image.
        seed: base seed; unit ``k`` draws from ``numpy.random.default_rng([seed, k])``.
        size: image size ``(H, W)``; ``None`` = the dataset's.
    """

    steps: int = 256
    lr: float = 0.05
    parameterisation: str = "fourier"
    decorrelate: bool = True
    objective: str = "neuron"
    jitter: int = 3
    blur_every: int = 0
    blur_sigma: float = 0.5
    decay: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "an integer ≥ 1"),
            (self.lr > 0, "lr", self.lr, "a positive number"),
            (self.parameterisation in ("fourier", "pixel"), "parameterisation", self.parameterisation, "'fourier' or 'pixel'"),
            (self.objective in ("channel", "neuron"), "objective", self.objective, "'channel' or 'neuron'"),
            (isinstance(self.jitter, int) and self.jitter >= 0, "jitter", self.jitter, "an integer ≥ 0"),
            (isinstance(self.blur_every, int) and self.blur_every >= 0, "blur_every", self.blur_every, "an integer ≥ 0"),
            (self.blur_sigma > 0, "blur_sigma", self.blur_sigma, "a positive number"),
            (self.decay >= 0, "decay", self.decay, "a number ≥ 0"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise StageInputError(f"activation maximisation: {name} = {value!r} is invalid; use {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AMResult:
    """Optimised images and how far they drove their units.

    ``images (U, H, W, 3)`` uint8; ``objective (U,)`` the final objective value (pre-ReLU, no penalty);
    ``activation_max (U,)`` the unit's spatial max of the layer output on the final (un-jittered) image;
    ``activation_mean (U,)`` its spatial mean (for a class model both are the logit).
    """

    units: np.ndarray
    images: np.ndarray
    objective: np.ndarray
    activation_max: np.ndarray
    activation_mean: np.ndarray


class _Stop(Exception):
    """Raised by the capture hook: nothing after the target layer needs computing."""


def _no_inplace(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose in-place activations (``ReLU(inplace=True)``) are out of place."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return net.eval()


def _target(net: nn.Module, layer: str | None, pre_activation: bool) -> tuple[nn.Module | None, bool]:
    """The module to hook and whether to read its input (the pre-activation of a trailing ReLU)."""
    if layer is None:
        return None, False
    modules = dict(net.named_modules())
    if layer not in modules:
        raise StageInputError(f"activation maximisation: unknown layer {layer!r}; see `repdissect layers MODEL`")
    module = modules[layer]
    children = list(module.children())
    if pre_activation and children and isinstance(children[-1], nn.ReLU):
        return children[-1], True
    if pre_activation and isinstance(module, nn.ReLU):
        return module, True
    return module, False


def _forward(model: nn.Module, hook_module: nn.Module | None, read_input: bool, pixels01: torch.Tensor) -> torch.Tensor:
    """The target tensor (layer output, its pre-activation, or the logits) for [0, 1] images."""
    if hook_module is None:
        return model(pixels01 * 255.0)
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: Any, output: Any = None) -> None:
        captured.append(inputs[0] if read_input else output)
        raise _Stop

    handle = hook_module.register_forward_pre_hook(hook) if read_input else hook_module.register_forward_hook(hook)
    try:
        model(pixels01 * 255.0)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise StageInputError("activation maximisation: the target layer did not run in the forward pass")
    return captured[0]


def layer_output(model: nn.Module, layer: str | None, images: torch.Tensor, *, pre_activation: bool = False) -> torch.Tensor:
    """The output (or pre-activation) of ``layer`` of a ``NormalizedModel`` for ``(B, 3, H, W)`` images in [0, 1]."""
    net_model = _no_inplace(model)
    module, read_input = _target(_unwrap(net_model), layer, pre_activation)
    return _forward(net_model, module, read_input, images)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "net", model)


def _unit_objective(target: torch.Tensor, units: torch.Tensor, objective: str) -> torch.Tensor:
    """``(B,)``: unit ``units[b]`` of image ``b`` (channel mean or centre neuron; logits when 2-D)."""
    rows = torch.arange(target.shape[0])
    if target.ndim == 2:
        return target[rows, units]
    maps = target[rows, units]  # (B, h, w)
    if objective == "neuron":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    return maps.mean(dim=(1, 2))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = nn.functional.conv2d(nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"),
                             kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"),
                                kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _roll_each(x: torch.Tensor, shifts: np.ndarray) -> torch.Tensor:
    """Roll image ``b`` by ``shifts[b] = (dy, dx)`` (a circular jitter)."""
    return torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])


def _optimise_chunk(model: nn.Module, module: nn.Module | None, read_input: bool, units: np.ndarray,
                    size: tuple[int, int], s: AMSettings, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rngs = [np.random.default_rng([int(s.seed), int(u)]) for u in units]
    init = np.stack([rng.standard_normal((3, *size)) for rng in rngs])
    shifts = np.stack([rng.integers(-s.jitter, s.jitter + 1, size=(s.steps, 2)) for rng in rngs])  # (U, steps, 2)
    param = ImageParam(init, s.parameterisation, decorrelate=s.decorrelate, dtype=dtype, device=device)
    opt = PlainAdam(param.parameters(), lr=s.lr)  # torch.optim.Adam's update without torch._dynamo (see _optim)
    target_units = torch.as_tensor(units, dtype=torch.long, device=device)
    for step in range(s.steps):
        opt.zero_grad()
        x = param.image()
        if s.jitter:
            x = _roll_each(x, shifts[:, step])
        value = _unit_objective(_forward(model, module, read_input, x), target_units, s.objective)
        loss = -value.sum()
        if s.decay:
            loss = loss + s.decay * ((x - 0.5) ** 2).mean(dim=(1, 2, 3)).sum()
        loss.backward()
        opt.step()
        if s.parameterisation == "pixel" and s.blur_every and (step + 1) % s.blur_every == 0:
            with torch.no_grad():
                param.param.copy_(_gaussian_blur(param.param, s.blur_sigma))
    with torch.no_grad():
        return param.image()


def activation_maximisation(model: nn.Module, layer: str | None, units: Sequence[int], size: tuple[int, int],
                            settings: AMSettings = AMSettings(), *, batch_units: int = 0, pre_activation: bool = True,
                            dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AMResult:
    """Optimise one image per unit of ``layer`` (or per class logit when ``layer`` is ``None``).

    Args:
        model: a ``NormalizedModel`` (uint8-range input); it is copied, put in eval mode, never modified.
        layer: module name of the unwrapped network, or ``None`` for the network's output (class models).
        units: unit (channel) or class indexes, one image each.
        size: ``(H, W)`` of the images.
        settings: :class:`AMSettings`.
        batch_units: images optimised together (0 = all units in one batch; 1 = one optimisation per unit).
        pre_activation: read a layer that ends in a ReLU before the ReLU.
        dtype: float32 (default) or float64 (tests).
        device: where the optimisation runs.

    Returns:
        :class:`AMResult` in the order of ``units``.
    """
    units = np.asarray(list(units), dtype=np.int64)
    if units.size == 0:
        raise StageInputError("activation maximisation: no units given")
    device = torch.device(device)
    net_model = _no_inplace(model).to(device=device, dtype=dtype)
    for p in net_model.parameters():
        p.requires_grad_(False)
    module, read_input = _target(_unwrap(net_model), layer, pre_activation)
    out_module, out_input = _target(_unwrap(net_model), layer, False)
    chunk = int(batch_units) or units.size
    images, objective, amax, amean = [], [], [], []
    for start in range(0, units.size, chunk):
        part = units[start:start + chunk]
        x = _optimise_chunk(net_model, module, read_input, part, tuple(size), settings, dtype, device)
        with torch.no_grad():
            rows = torch.arange(len(part))
            idx = torch.as_tensor(part, device=device)
            pre = _forward(net_model, module, read_input, x)
            objective.append(_unit_objective(pre, idx, settings.objective).double().cpu().numpy())
            out = _forward(net_model, out_module, out_input, x)
            sel = out[rows, idx]
            if sel.ndim == 1:
                amax.append(sel.double().cpu().numpy())
                amean.append(sel.double().cpu().numpy())
            else:
                amax.append(sel.flatten(1).max(dim=1).values.double().cpu().numpy())
                amean.append(sel.flatten(1).mean(dim=1).double().cpu().numpy())
        images.append((x.double().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    return AMResult(units=units, images=np.concatenate(images), objective=np.concatenate(objective),
                    activation_max=np.concatenate(amax), activation_mean=np.concatenate(amean))
