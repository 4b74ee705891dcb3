"""Shard-level resumption: a node interrupted half-way reuses its finished shards, and only trustworthy ones.

A counting sharded stage (integers ``0..n-1`` summed per shard, each shard also staging a part file)
runs through the real executor in-process. A "crash" in one shard leaves the earlier shards staged;
the rerun must map only the missing shards, ignore an unreadable staged partial, and never mix shards
staged under another shard layout (``shard_size`` is an execution setting, not part of the key): each
layout stages in its own directory, so two runs cutting one node differently cannot disturb each other.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pytest

from repdissect.pipeline import CacheStore
from repdissect.pipeline._executor import Executor, _SyncClient
from repdissect.core import Context, Node, ShardedStage, StageOutput, register_stage
from repdissect.core._stage import _REGISTRY


class SimulatedCrash(RuntimeError):
    pass


class CountingSum(ShardedStage):
    """Sum and count of ``range(n)``, one shard per ``shard_size`` integers; records every map call."""

    name = "reliability_counting_sum"
    version = 1
    calls: ClassVar[list[tuple[int, int]]] = []
    crash_at: ClassVar[int | None] = None

    def shards(self, ctx: Context) -> list[Any]:
        n, size = int(ctx.params["n"]), int(ctx.execution["shard_size"])
        return [[start, min(start + size, n)] for start in range(0, n, size)]

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        if shard_index == type(self).crash_at:
            raise SimulatedCrash(f"killed in shard {shard_index}")
        type(self).calls.append(tuple(shard))
        values = list(range(*shard))
        ctx.write_part("values", shard_index, pa.table({"x": pa.array(values, pa.int64())}))
        return pa.table({"sum": [sum(values)], "count": [len(values)]})

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        return pa.table({"sum": [a["sum"][0].as_py() + b["sum"][0].as_py()],
                         "count": [a["count"][0].as_py() + b["count"][0].as_py()]})

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        return StageOutput(tables={"total": merged})


if CountingSum.name not in _REGISTRY:
    register_stage(CountingSum)

N = 20
NODE = Node(stage=CountingSum.name, label={"n": str(N)}, params={"n": N}, version=CountingSum.version)


@pytest.fixture(autouse=True)
def _reset():
    CountingSum.calls.clear()
    CountingSum.crash_at = None
    yield
    CountingSum.crash_at = None


def _run(store: CacheStore, shard_size: int):
    executor = Executor(store=store, client=_SyncClient(), dataset_spec={}, execution={"shard_size": shard_size})
    return executor.run([NODE])[NODE.key]


def _check(store: CacheStore) -> None:
    entry = store.get(NODE.stage, NODE.key, verify=True)
    assert entry.table("total").to_pylist() == [{"sum": sum(range(N)), "count": N}]
    assert entry.table("values").column("x").to_pylist() == list(range(N)), "every value staged exactly once"


def _crash(store: CacheStore, shard_size: int, at: int) -> None:
    CountingSum.crash_at = at
    with pytest.raises(SimulatedCrash):
        _run(store, shard_size)
    CountingSum.crash_at = None
    assert store.get(NODE.stage, NODE.key) is None, "an interrupted node publishes nothing"


def test_resume_maps_only_the_missing_shards(tmp_path):
    store = CacheStore(tmp_path)
    _crash(store, shard_size=3, at=4)
    assert (12, 15) not in CountingSum.calls and len(CountingSum.calls) == 6
    CountingSum.calls.clear()
    result = _run(store, shard_size=3)
    assert not result.hit
    assert CountingSum.calls == [(12, 15)], "finished shards are reused, not recomputed"
    _check(store)
    assert not store.staging_path(NODE.stage, NODE.key).exists(), "staging is removed after publishing"


def test_unreadable_staged_partial_is_recomputed(tmp_path):
    store = CacheStore(tmp_path)
    _crash(store, shard_size=5, at=3)
    (partial,) = store.staging_path(NODE.stage, NODE.key).glob("layout-*/_partials/part-00001.parquet")
    partial.write_bytes(partial.read_bytes()[:20])  # e.g. a disk that lost the tail
    CountingSum.calls.clear()
    _run(store, shard_size=5)
    assert CountingSum.calls == [(5, 10), (15, 20)]
    _check(store)


def test_shards_staged_under_another_layout_are_not_reused(tmp_path):
    store = CacheStore(tmp_path)
    _crash(store, shard_size=3, at=5)  # every shard but [15,18) staged
    CountingSum.calls.clear()
    _run(store, shard_size=4)  # same key, other layout: [0,4) … [16,20)
    assert CountingSum.calls == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    _check(store)


def test_layouts_stage_side_by_side(tmp_path):
    """Two runs cutting the node differently (e.g. concurrent, with other shard sizes) keep separate shards:
    neither discards nor reuses the other's, and each resumes its own."""
    store = CacheStore(tmp_path)
    _crash(store, shard_size=3, at=5)  # layout A: every shard but [15,18) staged
    _crash(store, shard_size=4, at=2)  # layout B: every shard but [8,12) staged
    assert len(list(store.staging_path(NODE.stage, NODE.key).glob("layout-*"))) == 2
    CountingSum.calls.clear()
    _run(store, shard_size=3)  # A resumes with only its missing shards, untouched by B
    assert CountingSum.calls == [(15, 18)]
    _check(store)
    assert not store.staging_path(NODE.stage, NODE.key).exists(), "publishing removes every layout's staging"


def test_a_cache_hit_removes_leftover_staging(tmp_path):
    store = CacheStore(tmp_path)
    _run(store, shard_size=7)
    leftover = store.staging_path(NODE.stage, NODE.key) / "_partials"
    leftover.mkdir(parents=True)  # as if killed between publish and clean-up
    CountingSum.calls.clear()
    assert _run(store, shard_size=7).hit
    assert CountingSum.calls == []
    assert not store.staging_path(NODE.stage, NODE.key).exists()


def test_a_map_task_rerun_after_publishing_stages_nothing(tmp_path):
    """Dask recomputes tasks a killed worker held, even maps of a node already published: they must not
    recreate the staging directory the publish removed."""
    from repdissect.pipeline._executor import _is_superseded, task_map

    store = CacheStore(tmp_path)
    _run(store, shard_size=7)
    CountingSum.calls.clear()
    ctx = Context(node=NODE, cache_root=str(tmp_path), inputs={}, dataset_spec={}, execution={"shard_size": 7},
                  layout="0123456789abcdef")
    assert _is_superseded(task_map(ctx, 0, [0, 7]))
    assert CountingSum.calls == []
    assert not store.staging_path(NODE.stage, NODE.key).exists()
