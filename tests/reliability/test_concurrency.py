"""Concurrency: two ``repdissect run`` processes on one cache both finish with correct results.

Equal keys mean equivalent results, so the store lets the first publisher win and every loser discard
its copy — including a loser whose staged shards or temp directory the winner already removed. The
end-to-end test (``slow``) races two real processes over the whole DAG (same cache, same output folder) at
several start offsets; the fast tests below force the losing interleavings deterministically, and a
`clean` in the middle of a run (the run's record, written when it starts, keeps its entries live).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from repdissect.pipeline import CacheStore, run
from repdissect.core import MANIFEST

from reliability_support import TINY, assert_same_results, cache_tables, leftovers, start_run, write_config

KEY = "cd" + "7" * 62


def _race(reference, directory: Path, stagger: float) -> list[int]:
    config = write_config(directory, TINY)
    cache, out = directory / "cache", directory / "out"
    first = start_run(config, cache, out / "a")
    if stagger:
        threading.Event().wait(stagger)
    second = start_run(config, cache, out / "b")
    codes = [first.wait(timeout=900), second.wait(timeout=900)]
    for name, code in zip("ab", codes):
        assert code == 0, f"run {name} failed (exit {code}):\n{(out / name / 'stderr.txt').read_text()[-3000:]}"
    assert_same_results(reference.tables, cache_tables(cache), context=f"two runs, stagger {stagger}s")
    assert leftovers(cache) == [], leftovers(cache)
    assert not (cache / "_quarantine").exists()
    return codes


@pytest.mark.slow
@pytest.mark.parametrize("stagger", [0.0, 0.5, 1.5, 3.0, 4.5])
def test_two_runs_on_one_cache_both_succeed(tiny_reference, tmp_path, stagger):
    _race(tiny_reference, tmp_path, stagger)


def _table(n: int = 4) -> pa.Table:
    return pa.table({"unit": list(range(n))})


def test_loser_whose_temp_dir_vanishes_keeps_the_winner(tmp_path, monkeypatch):
    """The winner's clean-up removes a loser's temp dir mid-write: the loser returns the winner's entry."""
    store = CacheStore(tmp_path)
    original = CacheStore._write_and_rename
    calls = []

    def interleaved(self, stage, key, tmp, final, *args):
        calls.append(tmp)
        if len(calls) == 1:
            # another process publishes the same key now and removes our temp dir as stale
            CacheStore(tmp_path).publish(stage, key, {"t": _table(3)}, manifest={})
            assert not tmp.exists()
        return original(self, stage, key, tmp, final, *args)

    monkeypatch.setattr(CacheStore, "_write_and_rename", interleaved)
    entry = store.publish("thresholds", KEY, {"t": _table(5)}, manifest={})
    monkeypatch.undo()
    assert entry.table("t").num_rows == 3, "the first publisher's entry wins"
    assert store.get("thresholds", KEY, verify=True) is not None
    assert list(tmp_path.glob("thresholds/*/.tmp-*")) == []


def test_publish_cleans_temp_dirs_left_by_a_killed_publisher(tmp_path):
    store = CacheStore(tmp_path)
    final = store.entry_path("thresholds", KEY)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".tmp-{KEY[:16]}-deadbeef"
    (stale / "t.parquet").parent.mkdir(parents=True)
    (stale / "t.parquet").write_bytes(b"PAR1 half written")
    other = final.parent / f".tmp-{'cd' + '8' * 14}-cafe"  # another key's publish in flight: untouched
    other.mkdir()
    store.publish("thresholds", KEY, {"t": _table()}, manifest={})
    assert not stale.exists()
    assert other.exists()


def test_race_loser_whose_staging_was_removed_returns_quietly(tiny_reference, tmp_path, monkeypatch):
    """Run B finalizes a node while run A publishes it and removes the shared staging dir: B keeps A's entry."""
    from repdissect.pipeline import _executor

    shutil.copytree(tiny_reference.config.parent / "cache", tmp_path / "cache")
    config = write_config(tmp_path, TINY)
    store = CacheStore(tmp_path / "cache")
    extract = next((key, path) for stage, key, path in store.iter_entries() if stage == "extract")
    winner = tmp_path / "winner"
    shutil.copytree(extract[1], winner)
    shutil.rmtree(extract[1])  # this node must be recomputed by "B"
    original = _executor._finalize_and_publish

    def lose_the_race(ctx, merged, started):
        if ctx.node.key == extract[0]:
            # run A wins right now: its entry appears, and its clean-up removes the staging dir
            shutil.copytree(winner, extract[1])
            store.discard_staging(ctx.node.stage, ctx.node.key)
        return original(ctx, merged, started)

    monkeypatch.setattr(_executor, "_finalize_and_publish", lose_the_race)
    result = run(config)
    assert [r.node.stage for r in result.results.values() if not r.hit] == ["extract"]
    assert (extract[1] / MANIFEST).read_bytes() == (winner / MANIFEST).read_bytes(), "the winner's entry is kept"
    assert_same_results(tiny_reference.tables, cache_tables(tmp_path / "cache"), context="lost race")
    assert leftovers(tmp_path / "cache") == []


def test_clean_during_a_run_keeps_that_runs_entries(tiny_reference, tmp_path, monkeypatch):
    """`repdissect clean` while a run computes: entries the run has published (and reads next) are live."""
    from repdissect.pipeline import _run

    config = write_config(tmp_path, TINY)
    cache = tmp_path / "cache"
    removed: list[list[Path]] = []
    original = _run._Progress.__call__

    def clean_after_first_computed_node(self, result):
        if not result.hit and not removed:
            removed.append(CacheStore(cache).clean())  # another shell runs `repdissect clean` now
        return original(self, result)

    monkeypatch.setattr(_run._Progress, "__call__", clean_after_first_computed_node)
    result = run(config)
    assert removed == [[]], f"clean removed entries of the running run: {removed}"
    assert all(CacheStore(cache).get(n.stage, n.key) is not None for n in result.plan.nodes)
    assert_same_results(tiny_reference.tables, cache_tables(cache), context="clean during a run")
    records = CacheStore(cache).run_records()
    assert [r["status"] for r in records] == ["finished"] and "key_components" in records[0]["nodes"][0]


def test_a_failed_run_keeps_its_published_entries(tmp_path, monkeypatch):
    """A run that stops half-way marks its record failed; what it published stays referenced (and reused)."""
    from repdissect.pipeline import _executor

    config = write_config(tmp_path, TINY)
    cache = tmp_path / "cache"
    original = _executor._finalize_and_publish

    def fail_at_thresholds(ctx, merged, started):
        if ctx.node.stage == "thresholds":
            raise KeyboardInterrupt  # e.g. Ctrl-C while the first dissection node finalizes
        return original(ctx, merged, started)

    monkeypatch.setattr(_executor, "_finalize_and_publish", fail_at_thresholds)
    with pytest.raises(KeyboardInterrupt):
        run(config, scheduler="sync")
    store = CacheStore(cache)
    assert [r["status"] for r in store.run_records()] == ["failed"]
    published = [path for _, _, path in store.iter_entries()]
    assert published and store.clean() == []
    monkeypatch.setattr(_executor, "_finalize_and_publish", original)
    rerun = run(config, scheduler="sync")
    assert {r.node.stage for r in rerun.results.values() if r.hit} >= {"train", "extract"}
