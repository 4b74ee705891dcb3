"""What a running stage may use: :class:`Context` (its node, upstream entries, dataset, staging area).

A context is picklable so it travels to Dask workers. The dataset is built from its JSON spec by the
factory the datasets package registers (:func:`set_dataset_factory`), once per process, so the core never
imports the data adapters above it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa

from ._atomic import write_parquet_atomic
from ._hashing import canonical_json
from ._node import Node
from ._part_writers import PartWriter, open_part_writer
from ._store import CacheStore, Entry

__all__ = ["Context", "load_dataset", "set_dataset_factory"]

_DATASET_FACTORY: list[Callable[..., Any]] = []


def set_dataset_factory(factory: Callable[..., Any]) -> None:
    """Register ``factory(kind, **params) -> dataset``: called by :mod:`repdissect.datasets` on import."""
    _DATASET_FACTORY[:] = [factory]
    _dataset_for.cache_clear()


def load_dataset(spec: Mapping[str, Any]) -> Any:
    """The dataset ``{"kind": ..., "params": {...}}`` describes, built once per process (an LRU of 4)."""
    return _dataset_for(canonical_json(dict(spec)))


@functools.lru_cache(maxsize=4)
def _dataset_for(spec_json: str) -> Any:
    if not _DATASET_FACTORY:
        raise RuntimeError("no dataset factory registered; import repdissect.datasets first")
    spec = json.loads(spec_json)
    return _DATASET_FACTORY[0](spec["kind"], **spec["params"])


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
        return load_dataset(self.dataset_spec)

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
