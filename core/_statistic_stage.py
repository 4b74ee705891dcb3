"""The one driver of every dataset-wide statistic: :class:`StatisticStage`.

A sharded stage over a mergeable statistic declares only the science — which empty statistic to start
from (:meth:`~StatisticStage.new_statistic`), how one shard updates it (:meth:`~StatisticStage.update`)
and how the merged statistic becomes tables (:meth:`~StatisticStage.publish`). The driver does the rest,
in one place: map = ``update`` on a fresh statistic, combine = ``merge`` of two decoded states, publish =
``to_table`` for transport and ``publish`` at the end. A stage that tracks several statistics (one per
layer, one per split) returns a ``{name: statistic}`` dict; the driver bundles their states into one
table so the Dask tree reduction still moves a single object.

Multi-pass statistics (exact radix selection) say so through the protocol's ``done`` / ``next_pass``:
after every shard of a pass is merged, the driver asks ``next_pass()`` for the next pass's empty state
and streams every shard through it again, in-process and memory-bounded, until the statistic is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Union

import pyarrow as pa

from ._bundle import bundle, unbundle
from ._stage import ShardedStage, StageOutput
from ._statistic import StreamingStatistic

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["StatisticStage", "StatisticState"]

#: one statistic, or several by name (bundled into one table between workers)
StatisticState = Union[StreamingStatistic, dict[str, StreamingStatistic]]


class StatisticStage(ShardedStage):
    """A sharded stage declared by its statistic: ``new_statistic``, ``update`` per shard, ``publish``.

    Subclasses also implement ``shards`` (JSON-able shard descriptors in a deterministic order). They may
    override :meth:`statistic_types` when building an empty statistic is costly (the driver only needs the
    classes to decode states in ``combine``/``finalize``).
    """

    def new_statistic(self, ctx: "Context") -> StatisticState:  # pragma: no cover - abstract
        """The empty statistic (or ``{name: statistic}``) one shard is folded into."""
        raise NotImplementedError

    def update(self, ctx: "Context", stat: StatisticState, shard_index: int, shard: Any) -> None:  # pragma: no cover
        """Fold shard ``shard`` (number ``shard_index``) into ``stat``, in place."""
        raise NotImplementedError

    def publish(self, ctx: "Context", stat: StatisticState) -> StageOutput:  # pragma: no cover - abstract
        """Turn the fully merged (and, if multi-pass, finished) statistic into the stage's tables."""
        raise NotImplementedError

    def statistic_types(self, ctx: "Context") -> type[StreamingStatistic] | dict[str, type[StreamingStatistic]]:
        """The statistic's class (or ``{name: class}``), used to decode transported states."""
        stat = self.new_statistic(ctx)
        if isinstance(stat, Mapping):
            return {name: type(s) for name, s in stat.items()}
        return type(stat)

    # --- the driver -------------------------------------------------------------------------------------

    def map(self, ctx: "Context", shard_index: int, shard: Any) -> pa.Table:
        stat = self.new_statistic(ctx)
        self.update(ctx, stat, shard_index, shard)
        return _encode(stat)

    def combine(self, ctx: "Context", a: pa.Table, b: pa.Table) -> pa.Table:
        types = self.statistic_types(ctx)
        left, right = _decode(types, a), _decode(types, b)
        if isinstance(left, dict):
            return _encode({name: left[name].merge(right[name]) for name in left})
        return _encode(left.merge(right))

    def finalize(self, ctx: "Context", merged: pa.Table) -> StageOutput:
        stat = _decode(self.statistic_types(ctx), merged)
        if isinstance(stat, dict):
            unfinished = sorted(name for name, s in stat.items() if not s.done)
            if unfinished:
                raise NotImplementedError(f"{type(self).__name__}: multi-pass statistics {unfinished} must be the "
                                          "stage's only statistic")
            return self.publish(ctx, stat)
        while not stat.done:  # another pass over every shard, folded into the next pass's empty state
            stat = stat.next_pass()
            if stat.done:
                break
            for index, shard in enumerate(self.shards(ctx)):
                self.update(ctx, stat, index, shard)
        return self.publish(ctx, stat)


def _encode(stat: StatisticState) -> pa.Table:
    if isinstance(stat, Mapping):
        return bundle({name: s.to_table() for name, s in stat.items()})
    return stat.to_table()


def _decode(types: type[StreamingStatistic] | Mapping[str, type[StreamingStatistic]], table: pa.Table) -> StatisticState:
    if isinstance(types, Mapping):
        tables = unbundle(table)
        return {name: types[name].from_table(tables[name]) for name in types}
    return types.from_table(table)
