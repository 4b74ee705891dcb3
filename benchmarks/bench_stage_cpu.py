"""CPU seconds (user + system) per stage of a cold run, in one process: what each stage costs, queue time excluded.

``run.json``'s per-node seconds are wall time from submission to completion, so on a busy scheduler they include
time spent waiting for a worker and their sums mislead. This benchmark runs the config in-process
(``--scheduler sync``) on a fresh cache, charges each task's CPU time (``os.times``: user + system of every thread
of the process) to its stage, and prints the split. With ``--profile STAGE`` it also writes a cProfile of that
stage's tasks; ``--keep CACHE`` reuses (and keeps) a cache, so only the stages missing from it are measured, and
``--recompute STAGE --limit N`` first removes the cache entries of N nodes of that stage (all with ``--limit 0``)
so that only they are measured against an otherwise warm cache.

    python benchmarks/bench_stage_cpu.py [--config configs/demo.toml] [--profile compare] [--keep DIR]
    python benchmarks/bench_stage_cpu.py --keep DIR --recompute similarity --limit 1 --profile similarity
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable


def _remove_entries(config: str, cache: Path, stage: str, limit: int) -> None:
    """Delete the cache entries of the first ``limit`` nodes (0: all) of ``stage`` in the config's plan."""
    import shutil

    from repdissect.pipeline import build_plan, resolve_config

    cfg = resolve_config(config, cache_dir=str(cache))
    nodes = [n for n in build_plan(cfg).nodes if n.stage == stage]
    for node in nodes[: limit or None]:
        shutil.rmtree(cache / stage / node.key[:2] / node.key, ignore_errors=True)
        print(f"recomputing {node.node_id}")


def _only_first_missing(stage: str, limit: int) -> None:
    """Make the run compute only the first ``limit`` missing nodes of ``stage``: other missing nodes (say, every
    node of a stage whose version was just bumped) are left out of the plan, so they are not measured."""
    import dataclasses

    from repdissect.core import CacheStore
    from repdissect.pipeline import _run

    original = _run.build_plan

    def build(cfg: Any, **kwargs: Any) -> Any:
        plan = original(cfg, **kwargs)
        store = CacheStore(cfg.run.cache_dir)
        keep, missing = [], 0
        for node in plan.nodes:
            if store.get(node.stage, node.key) is None:
                if node.stage != stage or missing >= limit:
                    continue
                missing += 1
            keep.append(node)
        return dataclasses.replace(plan, nodes=keep)

    _run.build_plan = build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--profile", default=None, help="stage whose tasks are profiled with cProfile")
    parser.add_argument("--keep", default=None, help="cache directory to use and keep (default: a fresh temporary one)")
    parser.add_argument("--recompute", default=None, help="with --keep: remove this stage's entries first")
    parser.add_argument("--limit", type=int, default=1, help="how many of --recompute's nodes (0: all)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    from repdissect.pipeline import _executor as ex
    from repdissect.pipeline import run

    cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # user, system, wall
    profiler = cProfile.Profile()

    def charged(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(ctx: Any, *rest: Any) -> Any:
            stage = ctx.node.stage
            profile = stage == args.profile
            t0, w0 = os.times(), time.perf_counter()
            if profile:
                profiler.enable()
            try:
                return fn(ctx, *rest)
            finally:
                if profile:
                    profiler.disable()
                t1 = os.times()
                rec = cpu[stage]
                rec[0] += t1.user - t0.user
                rec[1] += t1.system - t0.system
                rec[2] += time.perf_counter() - w0
        return wrapper

    if args.recompute and args.limit:
        _only_first_missing(args.recompute, args.limit)
    ex.task_map = charged(ex.task_map)
    ex.task_combine = charged(ex.task_combine)
    ex.task_publish = charged(ex.task_publish)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.keep) if args.keep else Path(tmp) / "cache"
        if args.recompute:
            _remove_entries(args.config, cache, args.recompute, args.limit)
        start, w0 = os.times(), time.perf_counter()
        run(args.config, cache_dir=str(cache), out_dir=str(Path(tmp) / "out"), scheduler="sync", progress=False)
        end, wall = os.times(), time.perf_counter() - w0
    total = (end.user - start.user) + (end.system - start.system)
    print(f"config {args.config}: in-process run, {total:.1f} CPU s (user {end.user - start.user:.1f}, "
          f"system {end.system - start.system:.1f}), wall {wall:.1f} s")
    print(f"{'stage':<20}{'user s':>9}{'sys s':>9}{'cpu s':>9}{'wall s':>9}")
    for stage, (u, s, w) in sorted(cpu.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print(f"{stage:<20}{u:>9.1f}{s:>9.1f}{u + s:>9.1f}{w:>9.1f}")
    staged = sum(u + s for u, s, _ in cpu.values())
    print(f"{'(outside tasks)':<20}{'':>9}{'':>9}{total - staged:>9.1f}")
    if args.profile:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
