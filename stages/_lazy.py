"""Modules imported on first attribute access, for the stage declarations.

Registering the stages must stay cheap: a fully cached rerun looks up keys and never needs torch or scipy,
so the science modules behind the stage declarations load only when a stage actually computes.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["LazyModule", "torch"]


class LazyModule:
    """``import_module(name, package)`` on the first attribute access."""

    def __init__(self, name: str, package: str = __package__) -> None:
        self._name = name
        self._package = package
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name, self._package)
        return getattr(self._module, attr)


def torch() -> ModuleType:
    return importlib.import_module("torch")
