"""Opt-in per-task memory profile: which task holds a process's peak, and how much of it is allocator slack.

Set ``REPDISSECT_MEMORY_PROFILE`` to a directory before a run (the benchmark ``bench_memory.py --per-task``
does) and every process that runs tasks — the in-process executor, or each Dask worker, which inherits the
variable — starts one daemon thread that samples its own memory every ``REPDISSECT_MEMORY_PROFILE_INTERVAL``
seconds (default 0.02) and writes one JSON line per task to ``DIR/tasks-PID.jsonl``:

* ``rss``/``anon``: resident and anonymous (not file-backed) memory, from ``/proc/self/statm`` (cheap enough to
  read 50 times a second): at the task's start (``*_start``), its peak (``peak_*``, sampled), its end before
  the executor releases freed memory (``*_end``) and after (``anon_released``);
* at the peak sample, glibc's view (``mallinfo2``: bytes in use by live allocations, and bytes free but held
  in its arenas) and pyarrow's pool (bytes allocated), so ``peak_anon`` splits into live glibc memory, slack
  in glibc's arenas, Arrow's pool and the rest (polars' jemalloc, mimalloc, thread stacks, …);
* ``threads``: the process's thread count at the peak (each thread may own a glibc arena);
* ``result_bytes``: the size of the value the task hands back to Dask (a map's or combine's state table), which
  a worker holds until the tasks that consume it have run;
* after the release (``released_*``), what the next task starts from: glibc's live and free bytes, pyarrow's
  pool, Python's allocated object blocks (``sys.getallocatedblocks``) and, in a Dask worker, the bytes of task
  results it holds (``released_dask_held``).

It never changes what a task computes or writes: it is read from the environment in the process that runs
the task, not from the config, so it is in no cache key, and it only reads ``/proc`` and allocator statistics.
Linux only (elsewhere the variable is ignored).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["PROFILE_ENV", "INTERVAL_ENV", "TaskProfiler", "task_profiler", "read_profile"]

PROFILE_ENV = "REPDISSECT_MEMORY_PROFILE"
INTERVAL_ENV = "REPDISSECT_MEMORY_PROFILE_INTERVAL"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.argtypes, fn.restype = [], _MallInfo2
    return fn


def _statm() -> tuple[int, int]:
    """``(RSS, anonymous RSS)`` of this process in bytes (``resident - shared`` pages of ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]), int(fields[2])
    return resident * _PAGE, (resident - shared) * _PAGE


def _dask_held_bytes() -> int | None:
    """Bytes of task results this process holds as a Dask worker (``None`` outside a worker's task thread)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return int(distributed.get_worker().state.nbytes)
    except Exception:  # noqa: BLE001 - not in a worker, or another distributed version: simply not recorded
        return None


def _threads() -> int:
    """Threads of this process, native ones included (the profiler runs only where ``/proc`` exists)."""
    return len(os.listdir("/proc/self/task"))


class TaskProfiler:
    """Samples this process's memory in a daemon thread and attributes the peaks to the task running."""

    def __init__(self, directory: Path, interval: float = 0.02) -> None:
        self.directory = directory
        self.interval = interval
        self.path = directory / f"tasks-{os.getpid()}.jsonl"
        self._mallinfo = _mallinfo2()
        self._lock = threading.Lock()
        self._current: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._sample_forever, name="repdissect-memory-profile", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss, anon = _statm()
        with self._lock:
            task = self._current
            if task is None:
                return
            task["peak_rss"] = max(task["peak_rss"], rss)
            if anon > task["peak_anon"]:
                task["peak_anon"] = anon
                task.update(self._allocators())
                task["threads"] = _threads()
                task["peak_at"] = time.time()

    def _allocators(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self._mallinfo is not None:
            info = self._mallinfo()
            out["glibc_in_use"] = int(info.uordblks + info.hblkhd)
            out["glibc_free"] = int(info.fordblks)
        pa = sys.modules.get("pyarrow")
        if pa is not None:
            out["arrow_allocated"] = int(pa.default_memory_pool().bytes_allocated())
        return out

    def _sample_forever(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a profiler must never take a task down
                pass

    def start(self, key: str, stage: str, node: str) -> None:
        rss, anon = _statm()
        with self._lock:
            self._current = {"pid": os.getpid(), "key": key, "stage": stage, "node": node, "start": time.time(),
                             "rss_start": rss, "anon_start": anon, "peak_rss": rss, "peak_anon": anon,
                             "peak_at": time.time(), **self._allocators(), "threads": _threads()}

    def end(self, released: bool = False, result_bytes: int = 0) -> None:
        """Close the task's record: call once before the executor releases freed memory (with the size of the
        value the task returns to Dask, which a worker holds until its consumers ran) and once after."""
        rss, anon = _statm()
        with self._lock:
            task = self._current
            if task is None:
                return
            if not released:
                task["peak_rss"], task["peak_anon"] = max(task["peak_rss"], rss), max(task["peak_anon"], anon)
                task["rss_end"], task["anon_end"], task["end"] = rss, anon, time.time()
                task["result_bytes"] = result_bytes
                return
            task["anon_released"] = anon
            # what stays between tasks: the allocators' view after the release, Python's object blocks and the
            # bytes a Dask worker holds as task results (the floor a later task starts from)
            task.update({f"released_{name}": value for name, value in self._allocators().items()})
            task["released_python_blocks"] = sys.getallocatedblocks()
            held = _dask_held_bytes()
            if held is not None:
                task["released_dask_held"] = held
            self._current = None
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(task) + "\n")


_profiler: TaskProfiler | None = None
_checked = False


def task_profiler() -> TaskProfiler | None:
    """This process's profiler when ``REPDISSECT_MEMORY_PROFILE`` is set (started on first call), else None."""
    global _profiler, _checked
    if not _checked:
        _checked = True
        directory = os.environ.get(PROFILE_ENV)
        if directory and os.path.exists("/proc/self/statm"):
            _profiler = TaskProfiler(Path(directory), float(os.environ.get(INTERVAL_ENV) or 0.02))
    return _profiler


def read_profile(directory: Path) -> list[dict[str, Any]]:
    """Every task record written under ``directory``, in start order."""
    records = []
    for path in sorted(Path(directory).glob("tasks-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["start"])
