"""Do Dask workers pay off? The same config on a LocalCluster of 1 and of 2 workers, on fresh caches, interleaved.

Each repeat runs ``repdissect run CONFIG --scheduler local --workers W`` for W = 1, 2 (and the in-process
scheduler as a reference) in turn, each on an empty cache, so every stage is computed. Reported per scheduler:
the median wall time of the whole run and, from ``run.json``, the summed node seconds of the stages that
dominate (train, extract, iou). The headline is the whole-run ratio 1 worker / 2 workers (issue target on a
2-core machine: ≥ 1.6 on the demo). ``--images`` and ``--epochs`` scale the config down for a quick look;
say so when quoting. Timings are only meaningful on an otherwise idle machine.

Usage: python benchmarks/bench_workers.py [--config configs/demo.toml] [--images 1000] [--epochs 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMINANT = ("train", "extract", "iou")


def rewrite_config(config: Path, directory: Path, images: int | None, epochs: int | None) -> Path:
    """A copy of ``config`` with its cache/outputs in ``directory`` and optionally fewer images / epochs."""
    lines, section = [], ""
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        key = stripped.split("=")[0].strip() if "=" in stripped else ""
        if section == "[run]" and key == "cache_dir":
            line = f'cache_dir = "{(directory / "cache").as_posix()}"'
        elif section == "[run]" and key == "out_dir":
            line = f'out_dir = "{(directory / "out").as_posix()}"'
        elif section == "[dataset.params]" and key == "images" and images:
            line = f"images = {images}"
        elif section == "[models.train]" and key == "epochs" and epochs:
            line = f"epochs = {epochs}"
        lines.append(line)
    path = directory / config.name
    path.write_text("\n".join(lines) + "\n")
    return path


def one_run(config: Path, images: int | None, epochs: int | None, scheduler: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        path = rewrite_config(config, Path(tmp), images, epochs)
        argv = [sys.executable, "-m", "repdissect.cli", "run", str(path), "--scheduler", scheduler, "--workers",
                str(workers), "--no-report", "--no-progress"]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
        record = json.loads((Path(tmp) / "out" / "run.json").read_text())
    stages: dict[str, float] = {}
    for node in record["nodes"]:
        stages[node["stage"]] = stages.get(node["stage"], 0.0) + node["seconds"]
    return {"wall": wall, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--images", type=int, default=None, help="override [dataset.params].images")
    parser.add_argument("--epochs", type=int, default=None, help="override [models.train].epochs")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repeats; medians are quoted")
    parser.add_argument("--no-sync", action="store_true", help="skip the in-process reference")
    args = parser.parse_args()
    candidates = [("local, 1 worker", "local", 1), ("local, 2 workers", "local", 2)]
    if not args.no_sync:
        candidates.append(("sync (in-process)", "sync", 1))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in candidates}
    for _ in range(args.repeat):
        for label, scheduler, workers in candidates:
            runs[label].append(one_run(args.config, args.images, args.epochs, scheduler, workers))
    scale = ", ".join(f"{k} {v}" for k, v in (("images", args.images), ("epochs", args.epochs)) if v) or "as shipped"
    print(f"{args.config.name} ({scale}), fresh cache per run, median of {args.repeat} interleaved")
    medians = {}
    for label, _, _ in candidates:
        wall = statistics.median(r["wall"] for r in runs[label])
        medians[label] = wall
        per_stage = "  ".join(
            f"{s} {statistics.median(r['stages'].get(s, 0.0) for r in runs[label]):6.1f}" for s in DOMINANT)
        print(f"  {label:<20s} whole run {wall:7.1f} s   node seconds: {per_stage}")
    print(f"  speed-up, 2 workers over 1 (whole run) {medians['local, 1 worker'] / medians['local, 2 workers']:6.2f}×")
    if "sync (in-process)" in medians:
        print(f"  speed-up, 2 workers over in-process    {medians['sync (in-process)'] / medians['local, 2 workers']:6.2f}×")


if __name__ == "__main__":
    main()
