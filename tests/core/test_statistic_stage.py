"""The statistic driver: map = update, combine = merge, finalize = publish (after every pass a statistic needs)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from repdissect.core import ShardRanges, StageOutput, StatisticStage, StreamingStatistic, pack_arrays, unpack_arrays

SHARDS = [np.array([3.0, 1.0]), np.array([4.0]), np.array([1.0, 5.0, 9.0]), np.array([2.0, 6.0])]


class Total(StreamingStatistic):
    """Sum and count of values; result = the mean."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, values: np.ndarray) -> None:  # type: ignore[override]
        self.total += float(values.sum())
        self.count += len(values)

    def merge(self, other: "Total") -> "Total":
        self.total += other.total
        self.count += other.count
        return self

    def to_table(self) -> pa.Table:
        return pack_arrays({}, {"total": self.total, "count": self.count})

    @classmethod
    def from_table(cls, table: pa.Table) -> "Total":
        _, attrs = unpack_arrays(table)
        stat = cls()
        stat.total, stat.count = attrs["total"], attrs["count"]
        return stat

    def result(self) -> float:
        return self.total / self.count


class CountAbove(StreamingStatistic):
    """Two passes over the data: the first finds the mean, the second counts the values above it.

    ``phase`` 0 sums, 1 counts, 2 holds the answer (``next_pass`` on a merged pass moves one phase on).
    """

    def __init__(self, phase: int = 0, mean: float = 0.0) -> None:
        self.phase, self.mean, self.total, self.count, self.above = phase, mean, 0.0, 0, 0

    def update(self, values: np.ndarray) -> None:  # type: ignore[override]
        if self.phase == 0:
            self.total += float(values.sum())
            self.count += len(values)
        else:
            self.above += int((values > self.mean).sum())

    def merge(self, other: "CountAbove") -> "CountAbove":
        self.total, self.count, self.above = self.total + other.total, self.count + other.count, self.above + other.above
        return self

    def to_table(self) -> pa.Table:
        return pack_arrays({}, {"phase": self.phase, "mean": self.mean, "total": self.total, "count": self.count,
                                "above": self.above})

    @classmethod
    def from_table(cls, table: pa.Table) -> "CountAbove":
        _, attrs = unpack_arrays(table)
        stat = cls(attrs["phase"], attrs["mean"])
        stat.total, stat.count, stat.above = attrs["total"], attrs["count"], attrs["above"]
        return stat

    @property
    def done(self) -> bool:
        return self.phase == 2

    def next_pass(self) -> "CountAbove":
        if self.phase == 0:
            return CountAbove(1, self.total / self.count)
        final = CountAbove(2, self.mean)
        final.above = self.above
        return final

    def result(self) -> int:
        return self.above


class Declared(StatisticStage):
    name = "test_declared"
    version = 1

    def __init__(self, factory) -> None:
        self.factory = factory

    def shards(self, ctx) -> list[int]:
        return list(range(len(SHARDS)))

    def new_statistic(self, ctx):
        return self.factory()

    def update(self, ctx, stat, shard_index, shard) -> None:
        if isinstance(stat, dict):
            stat["values"].update(SHARDS[shard])
            stat["ranges"].update(shard_index, shard, shard + 1)
        else:
            stat.update(SHARDS[shard])

    def publish(self, ctx, stat) -> StageOutput:
        if isinstance(stat, dict):
            return StageOutput(tables={"ranges": stat["ranges"].result()}, extras={"result": stat["values"].result()})
        return StageOutput(extras={"result": stat.result()})


def _drive(stage: StatisticStage, order: list[int]) -> StageOutput:
    """Map every shard, then combine the partial states in ``order`` (any reduction tree must agree)."""
    ctx = SimpleNamespace()
    parts = [stage.map(ctx, i, stage.shards(ctx)[i]) for i in order]
    merged = parts[0]
    for part in parts[1:]:
        merged = stage.combine(ctx, merged, part)
    return stage.finalize(ctx, merged)


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(SHARDS))))[:6])
def test_one_statistic_any_order(order):
    values = np.concatenate(SHARDS)
    assert _drive(Declared(Total), list(order)).extras["result"] == pytest.approx(values.mean())


def test_named_statistics_travel_as_one_bundle():
    out = _drive(Declared(lambda: {"values": Total(), "ranges": ShardRanges()}), [2, 0, 3, 1])
    assert out.extras["result"] == pytest.approx(np.concatenate(SHARDS).mean())
    assert out.tables["ranges"].to_pydict() == {"shard": [0, 1, 2, 3], "start": [0, 1, 2, 3], "stop": [1, 2, 3, 4]}


def test_a_multi_pass_statistic_streams_every_shard_again():
    values = np.concatenate(SHARDS)
    assert _drive(Declared(CountAbove), [3, 1, 0, 2]).extras["result"] == int((values > values.mean()).sum())


def test_single_pass_statistics_are_done_and_refuse_another_pass():
    assert Total().done
    with pytest.raises(NotImplementedError, match="single-pass"):
        Total().next_pass()
