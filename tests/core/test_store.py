"""Cache store: atomic publish, manifest checksums, quarantine, races, clean."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pytest

from helpers import race_publisher

from repdissect.core import CRASH_ENV, CRASH_ONCE_ENV, MANIFEST, CacheStore, write_parquet_atomic

KEY = "ab" + "0" * 62


def _table(n=5, offset=0):
    return pa.table({"unit": list(range(offset, offset + n)), "value": [float(i) for i in range(n)]})


def _publish(store, key=KEY, **kw):
    return store.publish("thresholds", key, {"result": _table(**kw)}, files={"extra.bin": b"\x00\x01"},
                         manifest={"params": {"q": 0.005}})


def test_publish_then_get_roundtrip(tmp_path):
    store = CacheStore(tmp_path)
    entry = _publish(store)
    assert entry.path == store.entry_path("thresholds", KEY)
    again = store.get("thresholds", KEY, verify=True)
    assert again.table("result").equals(_table())
    assert again.manifest["params"] == {"q": 0.005}
    files = again.manifest["files"]
    assert files["result.parquet"]["rows"] == 5
    assert set(files) == {"result.parquet", "extra.bin"}
    assert all(len(info["sha256"]) == 64 for info in files.values())
    assert (again.file("extra.bin")).read_bytes() == b"\x00\x01"


def test_entry_without_manifest_does_not_exist(tmp_path):
    store = CacheStore(tmp_path)
    entry = _publish(store)
    (entry.path / MANIFEST).unlink()
    assert store.get("thresholds", KEY) is None
    assert not entry.path.exists(), "an invalid entry is moved to quarantine"
    assert any((tmp_path / "_quarantine").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage_manifest"])
def test_damaged_entries_are_detected_and_quarantined(tmp_path, damage):
    store = CacheStore(tmp_path)
    entry = _publish(store)
    data = entry.path / "result.parquet"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete":
        data.unlink()
    else:
        (entry.path / MANIFEST).write_text("{not json")
    verify = damage == "flip"  # a flipped byte keeps the size: only the sha256 check sees it
    if not verify:
        assert store.get("thresholds", KEY) is None
    else:
        assert store.get("thresholds", KEY, verify=False) is not None
        assert store.get("thresholds", KEY, verify=True) is None
    # recomputation publishes a fresh, valid entry
    assert _publish(store).table("result").equals(_table())


def test_verify_reports_every_corrupt_entry(tmp_path):
    store = CacheStore(tmp_path)
    good = _publish(store, key="cd" + "1" * 62)
    bad = _publish(store, key="ef" + "2" * 62)
    raw = bytearray((bad.path / "extra.bin").read_bytes())
    raw[0] ^= 1
    (bad.path / "extra.bin").write_bytes(bytes(raw))
    report = {key: problem for _, key, problem in store.verify()}
    assert report[good.key] is None
    assert "sha256" in report[bad.key]


def test_first_publisher_wins(tmp_path):
    store = CacheStore(tmp_path)
    first = _publish(store, n=3)
    second = _publish(store, n=7)  # a racing writer with (impossibly) different content loses
    assert second.table("result").num_rows == 3
    assert first.path == second.path
    leftovers = [p for p in first.path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_concurrent_publishers_leave_one_valid_entry(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=race_publisher, args=(str(tmp_path), barrier, 4)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entry = CacheStore(tmp_path).get("thresholds", KEY, verify=True)
    assert entry is not None and entry.table("result").num_rows == 4


_PUBLISH_ONCE = """
import sys
import pyarrow as pa
from repdissect.core import CacheStore, write_parquet_atomic
root, key = sys.argv[1], sys.argv[2]
big = pa.table({"x": list(range(200_000))})
write_parquet_atomic(big, CacheStore(root).root / "side.parquet")
CacheStore(root).publish("thresholds", key, {"a": big, "b": big, "c": big}, manifest={})
"""


def _publish_in_a_process(root, crash_at: str):
    env = {**os.environ, CRASH_ENV: crash_at}
    env.pop(CRASH_ONCE_ENV, None)
    return subprocess.run([sys.executable, "-c", _PUBLISH_ONCE, str(root), KEY], env=env, timeout=300,
                          capture_output=True, text=True)


@pytest.mark.parametrize("crash_at, published, side_file", [
    ("publish-before-rename", False, True),   # everything written, manifest included: still invisible
    ("part-before-rename", False, False),     # an atomic file complete but not renamed: neither is visible
    ("node-published", True, True),           # not reached by a bare publish: the process completes
])
def test_publish_killed_half_way_is_never_seen(tmp_path, crash_at, published, side_file):
    proc = _publish_in_a_process(tmp_path, crash_at)
    assert proc.returncode == (0 if published else -signal.SIGKILL), proc.stderr[-2000:]
    store = CacheStore(tmp_path)
    entry = store.get("thresholds", KEY, verify=True)
    assert (entry is not None) == published
    if entry is not None:
        assert entry.table("c").num_rows == 200_000
    assert (tmp_path / "side.parquet").is_file() == side_file
    temps = list(tmp_path.glob("thresholds/*/.tmp-*"))
    assert len(temps) == (1 if crash_at == "publish-before-rename" else 0)
    assert all(problem is None for _, _, problem in store.verify())
    # The next publisher of the key succeeds and removes the killed one's temp dir.
    again = _publish(store)
    assert again.key == KEY and list(tmp_path.glob("thresholds/*/.tmp-*")) == []


def test_write_parquet_atomic_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "t.parquet"
    write_parquet_atomic(_table(), path)
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]


def test_clean_keeps_referenced_entries(tmp_path):
    store = CacheStore(tmp_path)
    kept = _publish(store, key="aa" + "3" * 62)
    dropped = _publish(store, key="bb" + "4" * 62)
    store.record_run({"name": "r", "nodes": [{"stage": "thresholds", "key": kept.key}]})
    removed = store.clean()
    assert dropped.path in removed and not dropped.path.exists()
    assert store.get("thresholds", kept.key) is not None


def test_unwritable_cache_is_a_clear_error(tmp_path):
    from repdissect.pipeline import PipelineError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PipelineError, match="not writable.*--cache"):
        CacheStore(blocker / "cache").ensure_writable()
