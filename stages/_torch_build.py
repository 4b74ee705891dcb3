"""Which torch build computes here: its installed distribution's version, read without importing torch.

A network's bits depend on the torch that runs it: releases change kernels (oneDNN and cuDNN upgrades, new
default algorithms, other summation orders) and default initialisations. The network stages key on
:func:`torch_build` so a cache filled under one torch release is never served to another as identical. The
constraint is the one of the CPU kernel probe: the pipeline asks before it knows whether any work is left, so
reading the version must not import torch (a fully cached rerun would pay its half-second and 500 MB).
The version is the installed distribution's (``2.14.1``, ``2.14.1+cpu``, ``2.15.0a0+git…``): a CPU-only and
a CUDA wheel of one release differ in it where their indexes tag them.
"""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["torch_build"]


@functools.lru_cache(maxsize=1)
def torch_build() -> str:
    """``"torch <version>"`` of the installed torch distribution; ``"torch (not installed)"`` without one.
    Read once per process: the installed torch does not change under a running process."""
    try:
        return f"torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        return "torch (not installed)"
