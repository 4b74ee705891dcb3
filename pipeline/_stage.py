"""The stage contract: what a stage declares, what it receives, what it returns.

A stage is a class with a ``name``, a hand-bumped integer ``version`` (bump it when its results change),
and either one ``run`` function (small stages) or the sharded quartet ``shards`` / ``map`` / ``combine`` /
``finalize`` (dataset-wide stages: ``map`` turns one shard into a mergeable partial state, ``combine``
merges two partials — a Dask tree reduction — and ``finalize`` turns the merged state into tables). Which
parameters affect the result is declared by the DAG when it builds a :class:`Node`: ``params`` are keyed,
``exec_params`` (batch size, device, workers) are recorded in the manifest but never keyed.

Stages do no cache I/O themselves: they read upstream entries through :class:`Context` and return
:class:`StageOutput`; the executor publishes. Big per-shard outputs (activations) are staged with
``ctx.write_part`` so they never travel through the scheduler.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import pandas as pd
import pyarrow as pa

from ._hashing import CACHE_FORMAT_VERSION, canonical_json, digest
from ._part_writers import PartWriter, open_part_writer
from ._store import CacheStore, Entry, write_parquet_atomic

__all__ = [
    "Stage",
    "ShardedStage",
    "StageOutput",
    "Node",
    "Context",
    "register_stage",
    "get_stage",
    "list_stages",
]


@dataclass
class StageOutput:
    """What a stage returns: named tables (pandas or Arrow), extra files, and small JSON metadata."""

    tables: dict[str, pa.Table | pd.DataFrame] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def arrow_tables(self) -> dict[str, pa.Table]:
        out = {}
        for name, table in self.tables.items():
            if isinstance(table, pd.DataFrame):
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
    if name not in _REGISTRY:
        import repdissect.stages  # noqa: F401  (registers the built-in stages)
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_stages(pattern: str = "*") -> list[str]:
    import repdissect.stages  # noqa: F401

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


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


@dataclass
class Context:
    """Everything a stage function may use; picklable so it travels to Dask workers."""

    node: Node
    cache_root: str
    inputs: dict[str, Entry]
    dataset_spec: dict[str, Any]
    execution: dict[str, Any]
    #: digest of a sharded node's shard layout; its staged shards live in their own directory per layout
    layout: str = ""

    @property
    def params(self) -> Mapping[str, Any]:
        return self.node.params

    @property
    def store(self) -> CacheStore:
        return CacheStore(self.cache_root)

    @property
    def staging(self) -> Path:
        """Where this node's shards are staged: one directory per shard layout (``shard_size`` is an
        execution setting, not part of the key), so runs cutting one node differently never mix shards."""
        base = self.store.staging_path(self.node.stage, self.node.key)
        return base / f"layout-{self.layout}" if self.layout else base

    def dataset(self):
        """The configured dataset, built once per process."""
        return _dataset_for(canonical_json(self.dataset_spec))

    def device(self) -> str:
        return self.execution.get("resolved_device", "cpu")

    def write_part(self, table_name: str, shard_index: int, table: pa.Table, **options: Any) -> Path:
        """Stage one part of a big table; the executor moves every staged part into the entry.

        ``options`` go to the Parquet writer (e.g. a faster codec for activations).
        """
        path = self.staging / table_name / f"part-{shard_index:05d}.parquet"
        write_parquet_atomic(table, path, **options)
        return path

    def open_part(self, table_name: str, shard_index: int, schema: pa.Schema, *, engine: str = "auto",
                  row_group_size: int | None = None, **options: Any) -> PartWriter:
        """Stage one part of a big table row group by row group (e.g. from a writer thread as batches finish).

        The part appears, like one from :meth:`write_part`, only when the returned writer's ``close()``
        succeeds; ``abort()`` (or an exception inside its ``with`` block) leaves nothing. ``engine``
        (``"auto"``, ``"polars"`` or ``"pyarrow"``) picks the encoder, see :func:`open_part_writer`;
        ``options`` go to the Parquet writer.
        """
        return open_part_writer(self.staging / table_name / f"part-{shard_index:05d}.parquet", schema,
                                engine=engine, row_group_size=row_group_size, **options)

    def staged_parts(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        if self.staging.is_dir():
            for table_dir in sorted(self.staging.iterdir()):
                if table_dir.is_dir() and not table_dir.name.startswith("_"):
                    out[table_dir.name] = sorted(table_dir.glob("part-*.parquet"))
        return out


@functools.lru_cache(maxsize=4)
def _dataset_for(spec_json: str):
    import json

    from ..datasets import create_dataset

    spec = json.loads(spec_json)
    return create_dataset(spec["kind"], **spec["params"])
