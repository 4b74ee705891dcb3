"""The opt-in per-task memory profile (``REPDISSECT_MEMORY_PROFILE``): off by default, one record per task with
the stage and node that ran, and peaks that see what a task allocated."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from repdissect.pipeline import PROFILE_ENV, _executor, _memory_profile, read_profile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


@pytest.fixture
def fresh_profiler(monkeypatch):
    """Forget the process-wide profiler around a test (it is started once per process otherwise)."""
    monkeypatch.setattr(_memory_profile, "_profiler", None)
    monkeypatch.setattr(_memory_profile, "_checked", False)
    yield
    monkeypatch.setattr(_memory_profile, "_profiler", None)
    monkeypatch.setattr(_memory_profile, "_checked", False)


def _ctx(stage: str, node: str) -> SimpleNamespace:
    return SimpleNamespace(node=SimpleNamespace(stage=stage, node_id=node))


@_executor._releasing
def task_touch(ctx, megabytes: int) -> int:
    block = np.ones(megabytes << 17)  # megabytes MiB of float64, every page written
    profiler = _memory_profile.task_profiler()
    if profiler is not None:
        profiler._sample()  # the sampler thread's step, taken while the block is alive (no timing involved)
    return int(block.size)


def test_off_by_default_writes_nothing(fresh_profiler, monkeypatch, tmp_path):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # a profiler that wrote anyway would have only the working directory
    assert task_touch(_ctx("iou", "iou[x]"), 1) == 1 << 17
    assert _memory_profile.task_profiler() is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("megabytes", [0, 48])
def test_one_record_per_task_with_its_peak(fresh_profiler, monkeypatch, tmp_path, megabytes):
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile"))
    monkeypatch.setenv(_memory_profile.INTERVAL_ENV, "3600")  # the thread never samples: only the explicit step
    task_touch(_ctx("moments", "moments[a=cnn@s0]"), megabytes)
    task_touch(_ctx("tsne", "tsne[cnn@s0]"), 1)
    records = read_profile(tmp_path / "profile")
    assert [(r["stage"], r["node"], r["key"]) for r in records] == [
        ("moments", "moments[a=cnn@s0]", "touch"), ("tsne", "tsne[cnn@s0]", "touch")]
    first = records[0]
    assert first["end"] >= first["start"]
    assert first["peak_rss"] >= first["rss_start"] and first["peak_anon"] >= first["anon_start"]
    grown = (first["peak_anon"] - first["anon_start"]) / 2**20
    assert grown >= 0.9 * megabytes  # the live block was seen (plus whatever else the step allocated)
    assert first["anon_released"] <= first["anon_end"] + (4 << 20)
    if megabytes and "glibc_in_use" in first:  # glibc: the block is live malloc'ed memory at the peak
        assert first["glibc_in_use"] >= megabytes << 20


@_executor._releasing
def task_state(ctx, rows: int) -> pa.Table:
    return pa.table({"x": np.arange(rows, dtype=np.float64)})


def test_records_the_returned_state_and_what_stays_after_the_release(fresh_profiler, monkeypatch, tmp_path):
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile"))
    monkeypatch.setenv(_memory_profile.INTERVAL_ENV, "3600")
    table = task_state(_ctx("thresholds", "thresholds[cnn@s0]"), 1000)
    task_touch(_ctx("iou", "iou[cnn@s0]"), 1)  # returns an int: no state table
    state, other = read_profile(tmp_path / "profile")
    assert state["result_bytes"] == table.nbytes == 8000
    assert other["result_bytes"] == 0
    for record in (state, other):
        assert record["released_python_blocks"] > 0
        assert "released_dask_held" not in record  # not a Dask worker
        if "glibc_in_use" in record:
            assert record["released_glibc_in_use"] > 0
