"""Which torch device a stage computes on: ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``."""

from __future__ import annotations

import torch

from ._errors import StageInputError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when available, else the CPU; other names are checked.

    Raises:
        StageInputError: for an unparseable name or a CUDA device this process cannot see.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StageInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StageInputError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= count:
            raise StageInputError(f"device {device!r} requested but only {count} CUDA device(s) are visible")
    return resolved
