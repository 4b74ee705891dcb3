"""Reading weight files safely: ``read_state_dict(path)`` → a plain tensor state dict, or one clear error.

The constraint: a checkpoint is untrusted input, so it is read with ``torch.load(..., weights_only=True)``
(no pickled code runs); a ``DataParallel`` ``module.`` prefix is stripped; anything that is not a flat
tensor state dict is refused with a message naming the file and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ._errors import StageInputError

__all__ = ["read_state_dict"]


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _load_failure(exc: BaseException) -> str:
    """One line of ``torch.load``'s (multi-line, ANSI-coloured) error: the offending global when it names one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    line = (named or lines or [type(exc).__name__])[0]
    line = line.split("WeightsUnpickler error: ", 1)[-1].split(". Please use", 1)[0]  # never advise allow-listing
    return f"{type(exc).__name__}: {line[:200]}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely (``weights_only=True``) and return a plain ``name -> tensor`` dict.

    Accepts a raw state dict or a checkpoint dict holding it under ``state_dict``/``model``/
    ``model_state_dict``; strips the ``module.`` prefix that ``DataParallel`` adds.
    """
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"model weights file {str(path)!r} does not exist; check ModelSpec.weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StageInputError(
            f"model weights file {str(path)!r} cannot be read as a safe (weights_only) checkpoint "
            f"({_load_failure(exc)}); only plain tensor state dicts are accepted, since unpickling anything else "
            "could run code. "
            "Save it as a state dict: torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {sorted(obj)[:8]}"
        raise StageInputError(
            f"model weights file {str(path)!r} holds a {kind}, not a state dict of tensors "
            "(nor a checkpoint dict with a 'state_dict' or 'model' entry)"
        )
    return _strip_prefix(obj, "module.")


def _short_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, … ({len(names) - limit} more)" if len(names) > limit else shown
