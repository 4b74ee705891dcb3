"""A :class:`Node`: one unit of cached work, and its cache key.

The constraint: the key holds everything that can change a result (stage name and version, cache format,
result parameters, upstream keys, data/weights digests) and nothing else; execution settings travel in
``exec_params`` and are recorded, never keyed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ._hashing import CACHE_FORMAT_VERSION, digest

__all__ = ["Node"]


@dataclass(frozen=True)
class Node:
    """One unit of cached work: a stage applied to one partition (model, layer, pair, …).

    ``key`` = sha256 of the canonical JSON of (stage, stage version, cache format, params, upstream keys,
    digests). ``label`` names the partition for people; it is not part of the key (content decides).
    """

    stage: str
    label: Mapping[str, str]
    params: Mapping[str, Any]
    upstream: Mapping[str, "Node"] = field(default_factory=dict)
    digests: Mapping[str, str] = field(default_factory=dict)
    exec_params: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", digest(self.key_components()))

    def key_components(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stage_version": self.version,
            "cache_format_version": CACHE_FORMAT_VERSION,
            "params": dict(self.params),
            "upstream": {role: node.key for role, node in sorted(self.upstream.items())},
            "digests": dict(self.digests),
        }

    @property
    def node_id(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.label.items())
        return f"{self.stage}[{inner}]"

    def __dask_tokenize__(self) -> str:
        return self.key

    def __hash__(self) -> int:
        return hash(self.key)
