"""Canonical JSON and SHA-256 digests for cache keys.

The constraint: a cache key must be identical across processes, machines and Python versions for the same
recipe, so it is computed from a canonical JSON text of plain values — never from Python ``hash()``,
pickles or Dask tokens (which are stable only within one interpreter). Anything that cannot be normalised
unambiguously raises instead of silently falling back to something random.

Normalisation: dicts (string keys, sorted), lists/tuples → lists, str, bool, int, None, finite floats
(non-finite raise: they have no JSON form), ``pathlib`` paths → POSIX strings, enums → their name,
dataclasses → dicts of their fields, numpy scalars → Python scalars.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from pathlib import PurePath
from typing import Any

__all__ = ["CACHE_FORMAT_VERSION", "normalize", "canonical_json", "digest", "UnhashableValueError"]

#: Bump when the normaliser, key recipe or entry layout changes: every old entry becomes a miss.
CACHE_FORMAT_VERSION = 1


class UnhashableValueError(TypeError):
    """A value reached the hasher that has no canonical form."""


def normalize(value: Any, _path: str = "$") -> Any:
    """Return a JSON-able canonical copy of ``value`` or raise :class:`UnhashableValueError`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnhashableValueError(f"cannot hash non-finite float {value!r} at {_path}")
        return float(value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: normalize(getattr(value, f.name), f"{_path}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnhashableValueError(f"cannot hash dict key {key!r} of type {type(key).__name__} at {_path}")
            out[key] = normalize(item, f"{_path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [normalize(item, f"{_path}[{i}]") for i, item in enumerate(value)]
    type_name = type(value).__module__ + "." + type(value).__qualname__
    if type_name.startswith("numpy.") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return normalize(value.item(), _path)
    raise UnhashableValueError(
        f"cannot hash value of type {type_name} at {_path}: only None, bool, int, float, str, paths, enums, "
        "dataclasses, dicts with string keys and lists are allowed in cache keys"
    )


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys of the normalised value."""
    return json.dumps(normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    """Hex SHA-256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
