"""The stage contract: what a stage declares and what it returns, and the stage registry.

A stage is a class with a ``name``, a hand-bumped integer ``version`` (bump it when its results change),
and either one ``run`` function (small stages) or the sharded quartet ``shards`` / ``map`` / ``combine`` /
``finalize`` (dataset-wide stages: ``map`` turns one shard into a mergeable partial state, ``combine``
merges two partials — a Dask tree reduction — and ``finalize`` turns the merged state into tables). A
sharded stage over one mergeable statistic does not write that quartet: it declares the statistic
(:class:`~repdissect.core.StatisticStage`). Which parameters affect the result is declared by the DAG
when it builds a :class:`~repdissect.core.Node`.

Stages do no cache I/O themselves: they read upstream entries through :class:`~repdissect.core.Context`
and return :class:`StageOutput`; the executor publishes. Stages register themselves by name
(:func:`register_stage`, a duplicate raises); the orchestration layer looks them up (:func:`get_stage`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:  # pandas loads only when a stage hands over a DataFrame (a warm rerun never does)
    import pandas as pd

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["Stage", "ShardedStage", "StageOutput", "register_stage", "get_stage", "list_stages"]


@dataclass
class StageOutput:
    """What a stage returns: named tables (pandas or Arrow), extra files, and small JSON metadata."""

    tables: dict[str, pa.Table | pd.DataFrame] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def arrow_tables(self) -> dict[str, pa.Table]:
        out = {}
        for name, table in self.tables.items():
            if not isinstance(table, pa.Table):
                table = pa.Table.from_pandas(table, preserve_index=False)
            out[name] = table
        return out


class Stage:
    """A single-task stage. Subclasses set ``name``, ``version`` and implement :meth:`run`."""

    name: ClassVar[str]
    version: ClassVar[int]
    #: runs on an accelerator when one is configured (asks Dask for the ``GPU`` resource)
    uses_device: ClassVar[bool] = False
    sharded: ClassVar[bool] = False

    def run(self, ctx: "Context") -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def source_hash(cls) -> str:
        """sha256 of the stage's module source: recorded so ``status`` can warn "source changed, version not"."""
        try:
            source = inspect.getsource(inspect.getmodule(cls))
        except (OSError, TypeError):
            return ""
        return hashlib.sha256(source.encode()).hexdigest()


class ShardedStage(Stage):
    """A dataset-wide stage computed as map over shards → tree-combine → finalize."""

    sharded: ClassVar[bool] = True

    def shards(self, ctx: "Context") -> list[Any]:  # pragma: no cover - abstract
        """JSON-able shard descriptors, in a deterministic order."""
        raise NotImplementedError

    def map(self, ctx: "Context", shard_index: int, shard: Any) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, ctx: "Context", a: pa.Table, b: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, ctx: "Context", merged: pa.Table) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator; a duplicate stage name raises."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_stage(name: str) -> Stage:
    """A fresh instance of the stage registered as ``name`` (importing :mod:`repdissect.stages` registers
    the built-in ones; :mod:`repdissect.pipeline` does that)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_stages(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
