"""The one protocol every dataset-wide statistic follows: ``update``, ``merge``, ``to_table``/``from_table``.

A statistic is computed per shard of images, merged pairwise (the Dask tree reduction does this), and
serialised as a single Arrow table so it can travel between workers and live in the Parquet cache. The
constraint that shaped it: memory must be independent of the number of images, so a statistic holds
only what it needs to merge exactly (sums, counts, bounded candidate sets) — never the raw samples.

``pack_arrays``/``unpack_arrays`` turn a dict of named numpy arrays into a one-row Arrow table with
shapes and dtypes in the schema metadata; most statistics implement ``to_table``/``from_table`` with them.
"""

from __future__ import annotations

import abc
import json
from typing import Any, Mapping, Self

import numpy as np
import pyarrow as pa

__all__ = ["StreamingStatistic", "ShardRanges", "pack_arrays", "unpack_arrays"]

_META_KEY = b"repdissect.arrays"


class StreamingStatistic(abc.ABC):
    """Base class of mergeable statistics.

    Life cycle: construct empty (or ``from_table`` a saved state) → ``update`` with batches → ``merge``
    with the states of other shards → read results. ``merge`` must be associative and commutative up to
    floating-point rounding (exact for integer counts), so any reduction tree gives the same answer.
    """

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Fold one batch of samples into the state."""

    @abc.abstractmethod
    def merge(self, other: Self) -> Self:
        """Fold another shard's state into this one, in place; returns ``self``."""

    @abc.abstractmethod
    def to_table(self) -> pa.Table:
        """Serialise the full state (enough to merge and to read every result)."""

    @classmethod
    @abc.abstractmethod
    def from_table(cls, table: pa.Table) -> Self:
        """Rebuild a statistic from ``to_table``'s output."""

    def result(self) -> Any:
        """The statistic's read-out (a table or an array; each statistic documents which)."""
        raise NotImplementedError(f"{type(self).__name__} has no single read-out; use its named accessors")

    # Multi-pass statistics (exact radix selection) override the two below. Protocol: once every shard of a
    # pass is merged and the state is not ``done``, ``next_pass()`` resolves that pass; what it returns is
    # either ``done`` (it holds the answer) or the empty state of another pass, which every shard updates
    # again. The driver (:class:`~repdissect.core.StatisticStage`) runs that loop.
    @property
    def done(self) -> bool:
        """Whether the state holds the final answer (single-pass statistics: always)."""
        return True

    def next_pass(self) -> Self:
        """Resolve this fully merged pass: a finished state, or the empty state of the next pass."""
        raise NotImplementedError(f"{type(self).__name__} is a single-pass statistic")


class ShardRanges(StreamingStatistic):
    """Which image range each shard covered: rows ``shard, start, stop`` (int64); merge = concatenation.

    Bounded by the number of shards, not images. :meth:`result` is the table sorted by shard.
    """

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []

    def update(self, shard: int, start: int, stop: int) -> None:  # type: ignore[override]
        self._tables.append(pa.table({"shard": [int(shard)], "start": [int(start)], "stop": [int(stop)]}))

    def merge(self, other: Self) -> Self:
        self._tables.extend(other._tables)
        return self

    def to_table(self) -> pa.Table:
        if not self._tables:
            return pa.table({name: pa.array([], pa.int64()) for name in ("shard", "start", "stop")})
        return pa.concat_tables(self._tables)

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        stat = cls()
        if table.num_rows:
            stat._tables.append(table)
        return stat

    def result(self) -> pa.Table:
        return self.to_table().sort_by("shard")


def pack_arrays(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> pa.Table:
    """Pack named numpy arrays (any shape, numeric or bool dtype) into a one-row Arrow table.

    Each array becomes a ``large_list`` column of its flattened values; shapes, dtypes and the JSON-able
    ``attrs`` go into the schema metadata, so the table round-trips exactly through Parquet.
    """
    columns, meta = {}, {"arrays": {}, "attrs": dict(attrs or {})}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"pack_arrays: array {name!r} has dtype {arr.dtype}; only bool/int/uint/float pack")
        flat = arr.reshape(-1)
        # from_arrays wraps the values buffer as is; ``pa.array([pa.array(flat)])`` would convert every element
        # through Python (0.6 s for a 2-million-value co-moment stack, on every shard of a statistic stage).
        columns[name] = pa.LargeListArray.from_arrays(pa.array([0, flat.size], pa.int64()), pa.array(flat))
        meta["arrays"][name] = {"shape": list(arr.shape), "dtype": arr.dtype.str}
    table = pa.table(columns) if columns else pa.table({"_empty": pa.array([0], pa.int8())})
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def unpack_arrays(table: pa.Table) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`pack_arrays`: returns ``(arrays, attrs)``."""
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError("unpack_arrays: table carries no 'repdissect.arrays' metadata; it was not written by pack_arrays")
    meta = json.loads(raw)
    arrays = {}
    for name, info in meta["arrays"].items():
        column = table.column(name).combine_chunks()
        values = column.values if len(column) else pa.array([], pa.from_numpy_dtype(np.dtype(info["dtype"])))
        flat = values.to_numpy(zero_copy_only=False)
        arrays[name] = np.asarray(flat, dtype=np.dtype(info["dtype"])).reshape(info["shape"])
    return arrays, meta["attrs"]
