"""Timing helpers shared by the benchmark scripts: interleaved runs, medians, ratios.

Both sides of a race are timed the same way in the same process: the callables run in turn (A, B, A, B, …)
so a drift in the machine's speed hits both, and the median of the repeats is what gets quoted.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(candidates: dict[str, Callable[[], object]], repeat: int = 3, warmup: bool = True,
                clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, object]]:
    """Run every candidate ``repeat`` times in turn; returns ``(median seconds, last result)`` per name.

    ``clock`` is wall time by default; ``time.process_time`` (CPU time of the process) is steadier on a machine
    shared with other jobs, and equals wall time for single-threaded work that is never descheduled."""
    if repeat < 1:
        raise ValueError(f"repeat must be ≥ 1, got {repeat}")
    results: dict[str, object] = {}
    if warmup:
        for name, fn in candidates.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = clock()
            results[name] = fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def ratio_line(label: str, baseline: float, ours: float) -> str:
    """``label  baseline/ours ×`` formatted like the other benchmark rows."""
    return f"  {label:<40s} {baseline / ours:8.1f}×"
