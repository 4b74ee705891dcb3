"""End-to-end time of a config (default: the demo), cold cache vs warm cache, with per-stage task time.

Runs ``repdissect run`` twice in subprocesses on a fresh cache: the first computes every node, the second
must be all cache hits. Prints wall time of both, their ratio, and the summed task seconds per stage from the
first run's ``run.json``.

    python benchmarks/bench_pipeline.py [--config configs/demo.toml] [--scheduler local] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def _run(config: str, cache: Path, out: Path, scheduler: str, workers: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one ``repdissect run`` and its processes' CPU user/system seconds and minor page faults."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "repdissect.cli", "run", config, "--cache", str(cache), "--out",
                    str(out), "--scheduler", scheduler, "--workers", str(workers), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, {"user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime,
                  "minor_faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--scheduler", default="local")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="an empty or new folder to keep the cache and the run's outputs in "
                        "(cache/, out/), to read the findings and open the report afterwards")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep must name an empty or new folder; {args.keep} holds files (choose another one)")
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        cold, usage = _run(args.config, cache, out, args.scheduler, args.workers)
        record = json.loads((out / "run.json").read_text())
        warm, _ = _run(args.config, cache, out, args.scheduler, args.workers)
        warm_record = json.loads((out / "run.json").read_text())
    per_stage: dict[str, list[float]] = defaultdict(list)
    for node in record["nodes"]:
        per_stage[node["stage"]].append(node["seconds"])
    print(f"config {args.config}, scheduler {args.scheduler}, {len(record['nodes'])} nodes")
    print(f"{'stage':<18}{'nodes':>6}{'sum of node seconds':>22}")
    for stage, secs in per_stage.items():
        print(f"{stage:<18}{len(secs):>6}{sum(secs):>22.1f}")
    hits = sum(n["hit"] for n in warm_record["nodes"])
    load = os.getloadavg()[0]
    print(f"cold run CPU: user {usage['user']:.0f} s, system {usage['system']:.0f} s, "
          f"{usage['minor_faults'] / 1e6:.1f} M minor page faults (workers included); "
          f"machine load average at the end {load:.1f} on {os.cpu_count()} cores")
    print(f"cold run {cold:.1f} s; warm run {warm:.1f} s ({hits}/{len(warm_record['nodes'])} hits); "
          f"warm/cold = {warm / cold:.3f}")


if __name__ == "__main__":
    main()
