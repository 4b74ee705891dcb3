"""Peak memory of a whole run: resident set size summed over every process of the run (the CLI and, with a
cluster, its Dask scheduler, nanny and worker processes), sampled every ``--interval`` seconds.

For a config (default: the quick one) the run is repeated on a fresh cache with the dataset at 1× and at
``--scale``× its images, so the output shows both the floor and whether memory is constant in the number of
images (every dataset-wide quantity is a streaming statistic, so it should be). A ``floor`` line measures the
same way a process that only imports what every run imports (torch and the pipeline), and the torch optimizer's
lazy import of ``torch._dynamo`` (paid by every training stage), so that the run's own share is visible.

Summed RSS is an upper bound: a child forked by the run (even briefly) shares its parent's pages copy-on-write,
and they are counted in both; the "processes" column says how many were seen at once.

Usage: python benchmarks/bench_memory.py [--config configs/quick.toml] [--scale 10] [--scheduler sync]
Targets (issue): quick ≤ 500 MB, demo ≤ 2 GB, 1× ≈ 10×.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "import torch, repdissect.pipeline"
OPTIMIZER = FLOOR + "; torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)"


def peak_tree_rss(argv: list[str], interval: float = 0.02) -> tuple[float, int, float, int]:
    """Run ``argv``; returns (peak Σ RSS over the process and its descendants in MiB, exit code, seconds,
    the most processes seen at once)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = most = 0
    while proc.poll() is None:
        total = 0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in members:
            try:
                total += member.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak, most = max(peak, total), max(most, len(members))
        time.sleep(interval)
    _, err = proc.communicate()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return peak / 2**20, proc.returncode, time.perf_counter() - started, most


def scaled_config(config: Path, scale: int, directory: Path) -> tuple[Path, int]:
    """A copy of ``config`` with ``scale`` × its images and its cache/outputs inside ``directory``."""
    text = config.read_text()
    images = int(tomllib.loads(text)["dataset"]["params"]["images"])
    lines = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        if section == "[dataset.params]" and stripped.startswith("images"):
            line = f"images = {images * scale}"
        elif section == "[run]" and stripped.startswith("cache_dir"):
            line = f'cache_dir = "{(directory / "cache").as_posix()}"'
        elif section == "[run]" and stripped.startswith("out_dir"):
            line = f'out_dir = "{(directory / "out").as_posix()}"'
        lines.append(line)
    path = directory / config.name
    path.write_text("\n".join(lines) + "\n")
    return path, images * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quick.toml")
    parser.add_argument("--scale", type=int, default=10, help="second run with this many times the images")
    parser.add_argument("--scheduler", default="sync", help="sync, local, auto or a scheduler address")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.02, help="sampling interval in seconds")
    args = parser.parse_args()
    python = sys.executable
    print(f"peak RSS summed over all processes of a run, sampled every {args.interval * 1000:.0f} ms")
    for label, code in (("floor: import torch + pipeline", FLOOR), ("  + a torch optimizer (torch._dynamo)", OPTIMIZER)):
        mib, _, _, _ = peak_tree_rss([python, "-c", code], args.interval)
        print(f"  {label:<44s} {mib:8.0f} MiB")
    results = {}
    for scale in (1, args.scale):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            config, images = scaled_config(args.config, scale, Path(tmp))
            argv = [python, "-m", "repdissect.cli", "run", str(config), "--scheduler", args.scheduler,
                    "--workers", str(args.workers), "--no-report", "--no-progress"]
            mib, code, seconds, processes = peak_tree_rss(argv, args.interval)
        status = "" if code == 0 else f"   (FAILED, exit {code})"
        results[scale] = mib
        print(f"  {args.config.stem} × {scale:<3d} ({images:6d} images, {args.scheduler}) {mib:8.0f} MiB "
              f"in {seconds:6.1f} s, {processes} process(es){status}")
    print(f"  ratio {args.scale}× / 1× images                        {results[args.scale] / results[1]:8.2f}")


if __name__ == "__main__":
    main()
