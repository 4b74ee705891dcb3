"""The architecture registry: ``builtin:<name>`` factories, torchvision classifiers by name, import strings.

:func:`register_model` adds a built-in family (a duplicate name raises); :func:`list_models` lists what can
be built; ``_factory_for(architecture)`` resolves any of the three accepted forms to a factory, or raises a
:class:`StageInputError` that names close matches and the command listing them.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Any, Callable

from torch import nn

from ._errors import StageInputError

__all__ = ["register_model", "list_models"]

_BUILTIN_PREFIX = "builtin:"
_TORCHVISION_PREFIX = "torchvision:"
_ACCEPTED_FORMS = "'builtin:<name>', 'torchvision:<name>' or an import string 'package.module:factory'"


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a built-in architecture factory as ``builtin:<name>``; a duplicate name raises.

    The factory is called with the spec's ``arch_kwargs`` plus ``num_classes`` when one is known.
    """
    key = name[len(_BUILTIN_PREFIX) :] if name.startswith(_BUILTIN_PREFIX) else name
    if not key or ":" in key:
        raise ValueError(f"register_model: invalid model name {name!r}; use a plain name such as 'cnn'")

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in _REGISTRY:
            raise ValueError(f"model {_BUILTIN_PREFIX}{key} is already registered ({_REGISTRY[key]!r})")
        _REGISTRY[key] = factory
        return factory

    return decorate


def _torchvision_models() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models(pattern: str = "*", *, torchvision: bool = True) -> list[str]:
    """Architecture strings matching a glob: the registered ``builtin:*`` ones, then ``torchvision:*`` classifiers."""
    names = [_BUILTIN_PREFIX + k for k in sorted(_REGISTRY)]
    if torchvision:
        names += [_TORCHVISION_PREFIX + k for k in _torchvision_models()]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def _factory_for(architecture: str) -> Callable[..., nn.Module]:
    if architecture.startswith(_BUILTIN_PREFIX):
        key = architecture[len(_BUILTIN_PREFIX) :]
        if key not in _REGISTRY:
            available = ", ".join(_BUILTIN_PREFIX + k for k in sorted(_REGISTRY))
            raise StageInputError(f"unknown built-in model {architecture!r}; available: {available}")
        return _REGISTRY[key]
    if architecture.startswith(_TORCHVISION_PREFIX):
        key = architecture[len(_TORCHVISION_PREFIX) :]
        available = _torchvision_models()
        if key not in available:
            close = difflib.get_close_matches(key, available, n=5)
            hint = f" (did you mean {', '.join(_TORCHVISION_PREFIX + c for c in close)}?)" if close else ""
            raise StageInputError(
                f"unknown torchvision model {architecture!r}{hint}; `repdissect models 'torchvision:*'` lists all "
                f"{len(available)} classification models"
            )

        def torchvision_factory(**kwargs: Any) -> nn.Module:
            import torchvision.models

            # weights=None: never download; trained weights come from ModelSpec.weights.
            return torchvision.models.get_model(key, weights=None, **kwargs)

        return torchvision_factory
    module_name, colon, attr_path = architecture.partition(":")
    if not colon or not module_name or not attr_path:
        available = ", ".join(list_models(torchvision=False))
        raise StageInputError(
            f"unknown model architecture {architecture!r}; use {_ACCEPTED_FORMS} "
            f"(built-in: {available}; all names: `repdissect models`)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise StageInputError(
            f"model architecture {architecture!r}: cannot import module {module_name!r} ({exc}); "
            "make the package importable (installed or on PYTHONPATH)"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise StageInputError(f"model architecture {architecture!r}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise StageInputError(f"model architecture {architecture!r}: {attr_path!r} is not callable (got {type(target).__name__})")
    return target
