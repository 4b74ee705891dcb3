"""Building networks: any network from a :class:`ModelSpec`, with its weights; naming and shaping its layers.

Public names: :class:`ModelSpec`, :func:`build_model`, :func:`load_weights`, :class:`NormalizedModel`,
:func:`unwrap`, :func:`layer_shapes`, :func:`resolve_layers`; re-exported for convenience:
:func:`register_model`, :func:`list_models` (the registry, ``_model_registry``), :func:`read_state_dict`
(``_checkpoints``) and the built-in family :class:`SmallCNN` (``builtin:cnn``, ``_cnn``).

The constraint that shaped it: three kinds of network (the built-in CNN family, torchvision classifiers by name,
any ``nn.Module`` factory given as an import string) must look identical to training, extraction and the
cache. So every network is wrapped in a :class:`NormalizedModel` that takes the datasets' ``uint8`` RGB images
and normalises them itself; layer names are the inner network's own dotted module names (``conv3``,
``layer4.1``); weights are always a plain state dict of the inner network, read with
``torch.load(..., weights_only=True)`` so no checkpoint can run code; and construction is seeded and
side-effect free (the global RNG is left untouched), so ``build_model(spec, seed=s)`` *is* the untrained
random-init baseline of seed ``s``.

Architecture strings:

* ``builtin:<name>`` — a family registered with :func:`register_model` (``builtin:cnn``);
* ``torchvision:<name>`` — a torchvision classification model (``torchvision:resnet18``), never pretrained by
  download: weights come from ``ModelSpec.weights``;
* ``package.module:factory`` — a callable (dotted attribute path allowed after the colon) returning an
  ``nn.Module``; it receives ``arch_kwargs`` and, when known, ``num_classes``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from . import _cnn  # noqa: F401  (registers builtin:cnn)
from ._checkpoints import _short_list, _strip_prefix, read_state_dict
from ._cnn import SmallCNN
from ._errors import StageInputError
from ._model_registry import _ACCEPTED_FORMS, _factory_for, list_models, register_model

__all__ = [
    "ModelSpec",
    "NormalizedModel",
    "SmallCNN",
    "LayerShape",
    "build_model",
    "load_weights",
    "read_state_dict",
    "register_model",
    "list_models",
    "unwrap",
    "layer_shapes",
    "resolve_layers",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@dataclass(frozen=True)
class ModelSpec:
    """What network to build: architecture, its keyword arguments, head size, weights and input normalisation.

    Attributes:
        architecture: ``builtin:cnn``, ``torchvision:resnet18`` or ``package.module:factory``.
        arch_kwargs: keyword arguments for the architecture's constructor (``{"depth": 5, "width": 16}``).
        num_classes: classifier outputs; ``None`` lets :func:`build_model`'s argument (usually the dataset's
            class count) or the architecture's default decide.
        weights: path of a state dict / checkpoint file to load; ``None`` keeps the seeded random init.
        input_mean: per-channel RGB mean on the 0..1 scale, subtracted after dividing uint8 pixels by 255.
        input_std: per-channel RGB standard deviation on the 0..1 scale.
    """

    architecture: str = "builtin:cnn"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    weights: str | None = None
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise StageInputError(f"model architecture must be a non-empty string like {_ACCEPTED_FORMS}; got {self.architecture!r}")
        if not isinstance(self.arch_kwargs, Mapping):
            raise StageInputError(f"model arch_kwargs must be a table of keyword arguments; got {self.arch_kwargs!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise StageInputError(f"model num_classes must be a positive integer or absent; got {self.num_classes!r}")
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))
        for name in ("input_mean", "input_std"):
            value = getattr(self, name)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                triple = ()
            if len(triple) != 3:
                raise StageInputError(f"model {name} must be 3 numbers (R, G, B on the 0..1 scale); got {value!r}")
            object.__setattr__(self, name, triple)
        if any(s <= 0 for s in self.input_std):
            raise StageInputError(f"model input_std must be positive; got {self.input_std!r}")

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from a config table, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise StageInputError(f"unknown model setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**dict(params))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able field dict (the inverse of :meth:`from_dict`)."""
        return {
            "architecture": self.architecture,
            "arch_kwargs": dict(self.arch_kwargs),
            "num_classes": self.num_classes,
            "weights": self.weights,
            "input_mean": list(self.input_mean),
            "input_std": list(self.input_std),
        }


class NormalizedModel(nn.Module):
    """A network behind its input normalisation: ``uint8`` (or 0..255 float) RGB in, the network's output out.

    ``net`` is the wrapped network; layer names and state dicts always refer to it, never to the wrapper. The
    mean/std buffers are not persistent, so ``state_dict()`` of the wrapper is ``net``'s with a ``net.`` prefix.
    With ``channels_last`` the input is converted to that memory format (2–3× faster convolutions on CPU);
    build the network with it once so plain and hooked forward passes take the same kernels.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images / 255 − mean) / std`` in float32, in the wrapper's memory format."""
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


def unwrap(model: nn.Module) -> nn.Module:
    """The network whose module names are the layer names: ``model.net`` for a :class:`NormalizedModel`."""
    return model.net if isinstance(model, NormalizedModel) else model


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | str | Path, *, source: str = "") -> nn.Module:
    """Load a state dict (or a weights file) into the (unwrapped) network strictly; returns ``model``.

    Raises:
        StageInputError: listing the missing keys, the unexpected keys and the keys whose shapes differ.
    """
    if isinstance(weights, (str, Path)):
        source = source or str(weights)
        state = read_state_dict(weights)
    else:
        state = _strip_prefix(weights, "module.")
    net = unwrap(model)
    expected = net.state_dict()
    # BatchNorm fills in a missing counter itself (old checkpoints predate it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (weights {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_short_list(mismatched)}")
        where = f" from {source!r}" if source else ""
        raise StageInputError(
            f"weights{where} do not fit {type(net).__name__}: " + "; ".join(parts)
            + ". Check the architecture, its arch_kwargs and num_classes"
        )
    net.load_state_dict(state, strict=False)
    return model


# --------------------------------------------------------------------------------------------- build


def build_model(
    spec: ModelSpec,
    *,
    seed: int,
    num_classes: int | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    channels_last: bool = True,
) -> NormalizedModel:
    """Build the network of ``spec``, seeded, with weights, behind its input normalisation (in eval mode).

    Construction runs under a forked, seeded torch RNG, so the same ``(spec, seed)`` always gives the same
    initial weights and the caller's RNG state is untouched: without weights this is the random-init baseline.

    Args:
        spec: what to build.
        seed: initialisation seed.
        num_classes: head size when ``spec.num_classes`` is unset (typically the dataset's class count).
        state_dict: weights to load instead of ``spec.weights`` (e.g. a trained checkpoint).
        channels_last: store conv weights and inputs channels-last (faster on CPU; numerically a different
            but deterministic kernel choice — keep the default unless comparing with outside code).

    Returns:
        A :class:`NormalizedModel` on the CPU in eval mode; its input is ``(N, 3, H, W)`` uint8 RGB.
    """
    if not isinstance(spec, ModelSpec):
        raise StageInputError(f"build_model needs a ModelSpec; got {type(spec).__name__}")
    factory = _factory_for(spec.architecture)
    kwargs = dict(spec.arch_kwargs)
    classes = spec.num_classes if spec.num_classes is not None else num_classes
    if classes is not None:
        kwargs["num_classes"] = int(classes)
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: construction happens on the CPU, and CUDA RNG state stays untouched.
        torch.default_generator.manual_seed(int(seed))
        try:
            net = factory(**kwargs)
        except TypeError as exc:
            raise StageInputError(
                f"model {spec.architecture!r} rejected its arguments {sorted(kwargs)}: {exc}; fix arch_kwargs"
            ) from exc
    if not isinstance(net, nn.Module):
        raise StageInputError(f"model factory {spec.architecture!r} returned {type(net).__name__}, not a torch.nn.Module")
    model = NormalizedModel(net, spec.input_mean, spec.input_std, channels_last=channels_last)
    if state_dict is not None:
        load_weights(model, state_dict, source="state_dict")
    elif spec.weights is not None:
        load_weights(model, spec.weights)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


# --------------------------------------------------------------------------------------------- layers


class LayerShape(NamedTuple):
    """One hookable module: dotted name and output shape without the batch axis (``None``: not a tensor/not run)."""

    name: str
    shape: tuple[int, ...] | None


def layer_shapes(model: nn.Module, input_size: tuple[int, int] = (64, 64)) -> list[LayerShape]:
    """Every named module of the (unwrapped) network with its output shape, from one dummy forward pass.

    Args:
        model: a :class:`NormalizedModel` (or a plain module taking normalised float input).
        input_size: ``(H, W)`` of the images.

    Returns:
        ``LayerShape(name, shape)`` in module registration order; shape is ``(C, H, W)``/``(C,)``, the last
        call's shape for a module run several times, ``None`` for modules never run or returning non-tensors.
    """
    net = unwrap(model)
    h, w = (int(v) for v in input_size)
    shapes: dict[str, tuple[int, ...] | None] = {}
    handles = []
    for name, module in net.named_modules():
        if not name:
            continue

        def record(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.inference_mode():
            if isinstance(model, NormalizedModel):
                model(torch.zeros((1, 3, h, w), dtype=torch.uint8, device=device))
            else:
                model(torch.zeros((1, 3, h, w), device=device))
    except RuntimeError as exc:
        raise StageInputError(f"a forward pass at input size {h}×{w} fails ({exc}); try a larger input size") from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [LayerShape(name, shapes.get(name)) for name, _ in net.named_modules() if name]


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Look up layer names (dotted module names of the unwrapped network), in the given order.

    Raises:
        StageInputError: for an empty or duplicated list, or an unknown name — listing close matches and the
            available layer names.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise StageInputError("no layers given; name at least one layer (see `repdissect layers MODEL`)")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise StageInputError(f"layer(s) {duplicates} are listed more than once; list each layer once")
    modules = dict(unwrap(model).named_modules())
    modules.pop("", None)
    unknown = [n for n in names if n not in modules]
    if unknown:
        available = list(modules)
        close = {n: difflib.get_close_matches(n, available, n=3) for n in unknown}
        hints = "; ".join(f"{n!r} (did you mean {', '.join(c)}?)" if c else repr(n) for n, c in close.items())
        raise StageInputError(
            f"unknown layer(s) {hints} in {type(unwrap(model)).__name__}; available layers: {_short_list(available, 200)}"
        )
    return {n: modules[n] for n in names}


