"""glibc allocator tuning: freed batch-sized buffers stay mapped (fewer page faults), results unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from repdissect.stages import tune_allocator
    assert tune_allocator() and tune_allocator()  # idempotent
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):  # shard-sized arrays of alternating sizes (16/48 MiB, plus 24 MiB)
    a = np.ones((6 << 20) if i % 2 else (2 << 20))
    b = np.ones(3 << 20)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again():
    default, tuned = _faults("default"), _faults("tuned")
    # default glibc: arrays above its 32 MiB dynamic limit are fresh mmaps, faulted in every round (≈ 12,800
    # faults); tuned: served from the heap, faulted in about once (≈ 2,100)
    assert tuned * 3 < default, (tuned, default)


RELEASE_SCRIPT = """
import sys
import numpy as np
from repdissect.stages import release_freed_memory, tune_allocator

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

assert tune_allocator()
a = np.ones(32 << 20)  # 256 MiB: the tuned heap keeps it mapped once freed (trim threshold 1 GiB)
del a
kept = rss_mib()
release_freed_memory()
print(kept, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_between_tasks_returns_a_finished_tasks_memory():
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], check=True, capture_output=True, text=True)
    kept, released = map(float, out.stdout.split())
    assert kept - released > 200, (kept, released)


def test_every_task_entry_point_releases_memory_when_it_ends(monkeypatch):
    import repdissect.stages as stages
    from repdissect.pipeline import _executor

    calls = []
    monkeypatch.setattr(stages, "release_freed_memory", lambda: calls.append(1))
    for task in (_executor.task_map, _executor.task_combine, _executor.task_publish):
        assert task.__wrapped__ is not None and task.__module__ == _executor.__name__
        before = len(calls)
        with pytest.raises(Exception):
            task(None, None, None)  # fails at once on the missing context; the release still runs
        assert len(calls) == before + 1, task.__name__


def test_a_node_hands_back_its_freed_memory_before_writing_its_outputs(tmp_path, monkeypatch):
    """Between a node's computation and the conversion and writing of its tables (the attribute stage held
    ~320 MiB of freed occlusion batches under its table writing), and again when the task ends."""
    import repdissect.stages as stages
    from helpers import write_tiny_config
    from repdissect.core import CacheStore
    from repdissect.pipeline import build_plan, load_config
    from repdissect.pipeline._executor import Executor, _SyncClient

    plan = build_plan(load_config(write_tiny_config(tmp_path)))
    node = next(n for n in plan.nodes if n.stage == "extract" and n.label["instance"].endswith("-random"))
    store = CacheStore(tmp_path / "cache")
    events: list[str] = []
    monkeypatch.setattr(stages, "release_freed_memory", lambda: events.append("release"))
    publish = CacheStore.publish  # (the task's context opens its own store)
    monkeypatch.setattr(CacheStore, "publish", lambda *a, **k: events.append("publish") or publish(*a, **k))
    Executor(store=store, client=_SyncClient(), dataset_spec=plan.dataset_spec,
             execution={"shard_size": 64, "resolved_device": "cpu", "torch_threads": 1}).run([node])
    assert store.get("extract", node.key) is not None
    # every map task releases when it ends; the publish task releases before publishing, and when it ends
    assert events[-3:] == ["release", "publish", "release"], events
