"""Peak memory of a whole run, summed over every process of the run (the CLI and, with a cluster, its Dask
scheduler, nanny and worker processes), sampled every ``--interval`` seconds, as RSS and as PSS.

For a config (default: the quick one) the run is repeated on a fresh cache with the dataset at 1× and at
``--scale``× its images, so the output shows both the floor and whether memory is constant in the number of
images (every dataset-wide quantity is a streaming statistic, so it should be). The ``floor`` lines measure
single processes that only import: torch alone, torch and the pipeline, and everything a quick run loads
(pandas, polars, scikit-learn's t-SNE, Numba with the compiled IoU kernels), so that the run's own share is
visible; and a ``torch.optim`` step, which imports ``torch._dynamo`` (the pipeline's optimizers do not).

RSS vs PSS: RSS counts every resident page a process maps, including shared library pages that other
processes (another worker, or any other program using the same libraries) map too, so summed RSS counts a
library once per process. PSS divides each shared page among the processes that map it, so summed PSS is the
honest total for processes sharing libraries — but for a lone process it is also lowered by unrelated
programs that happen to map the same files (other torch processes on the machine), so on a shared machine
quote RSS for a single process and PSS for a cluster's sum. A child process created by ``vfork`` (a
``subprocess`` call, until it ``exec``s) shares its parent's whole address space; it is recognised with
``kcmp(2)`` and not counted twice (``vfork children skipped`` in the output).

``--per-task`` sets ``REPDISSECT_MEMORY_PROFILE`` for the run: every process that runs tasks samples its own
memory and records each task's peak (RSS, anonymous, and at that peak glibc's live and free-but-held bytes
and pyarrow's pool), see ``repdissect/pipeline/_memory_profile.py``; the output adds the peaks per stage and
which task each process was running at the summed peak. Minor page faults and CPU seconds are summed over the
processes too (less sensitive to a shared machine's load than the wall time).

Usage: python benchmarks/bench_memory.py [--config configs/quick.toml] [--scale 10] [--scheduler sync] [--per-task]
Targets (issue): quick ≤ 500 MB (477 MiB), demo ≤ 2 GB (1907 MiB), 1× ≈ 10×.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WARM = ("from repdissect.stages import warm_kernels\nthread = warm_kernels()\n"
        "thread is not None and thread.join()\n")
FLOORS = (
    ("import torch", "import torch"),
    ("import torch + the pipeline", "import torch, repdissect.pipeline"),
    ("+ all a quick run imports", "import torch, repdissect.pipeline, pandas, polars, sklearn.manifold\n" + WARM),
    ("a torch.optim step (torch._dynamo)", "import torch\nnet = torch.nn.Linear(2, 2)\n"
     "opt = torch.optim.SGD(net.parameters(), lr=0.1)\nnet(torch.ones(1, 2)).sum().backward()\nopt.step()"),
)
_KCMP_VM = 1
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def shares_address_space(pid_a: int, pid_b: int) -> bool:
    """Whether two processes share one address space (a ``vfork`` child before its ``exec``); False if unknown."""
    if _SYS_KCMP is None:
        return False
    return _libc.syscall(_SYS_KCMP, pid_a, pid_b, _KCMP_VM, 0, 0) == 0


def rss_pss(pid: int) -> tuple[int, int]:
    """``(RSS, PSS)`` of a process in bytes, from ``/proc/PID/smaps_rollup``."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


@dataclass
class Peak:
    rss: float  # MiB, peak of the sum over the process tree
    pss: float
    code: int
    seconds: float
    processes: int  # the most processes seen at once (vfork children not counted)
    vfork_skipped: int
    minor_faults: int = 0  # summed over the processes (each one's last reading)
    cpu_seconds: float = 0.0  # user + system CPU time, summed likewise
    peak_at: float = 0.0  # wall-clock time of the summed RSS peak
    at_peak: dict[int, float] = field(default_factory=dict)  # pid → RSS (MiB) at that moment


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def faults_cpu(pid: int) -> tuple[int, float]:
    """``(minor page faults, user + system CPU seconds)`` of a process so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the command's ")": state is field 3, minflt field 10, utime 14, stime 15 (proc(5))
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / _TICK


def peak_tree(argv: list[str], interval: float = 0.02, env: dict[str, str] | None = None) -> Peak:
    """Run ``argv`` and sample the summed RSS and PSS of it and its descendants until it exits; minor faults
    and CPU time are each process's last reading, summed (a process's work after its last sample is missed)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last: dict[int, tuple[int, float]] = {}
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = most = 0
    peak_at, at_peak = 0.0, {}
    skipped: set[int] = set()
    while proc.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total_rss = total_pss = counted = 0
        sample: dict[int, float] = {}
        for member in members:
            try:
                if member.pid != root.pid and shares_address_space(member.pid, member.ppid()):
                    skipped.add(member.pid)
                    continue
                rss, pss = rss_pss(member.pid)
                last[member.pid] = faults_cpu(member.pid)
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            total_rss, total_pss, counted = total_rss + rss, total_pss + pss, counted + 1
            sample[member.pid] = rss / 2**20
        if total_rss > peak_rss:
            peak_at, at_peak = time.time(), sample
        peak_rss, peak_pss, most = max(peak_rss, total_rss), max(peak_pss, total_pss), max(most, counted)
        time.sleep(interval)
    _, err = proc.communicate()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return Peak(peak_rss / 2**20, peak_pss / 2**20, proc.returncode, time.perf_counter() - started, most,
                len(skipped), sum(f for f, _ in last.values()), sum(c for _, c in last.values()), peak_at, at_peak)


def per_task_report(directory: Path, peak: Peak, top: int = 12) -> None:
    """Print the per-task profile the run's processes wrote (see ``repdissect.pipeline.read_profile``)."""
    from repdissect.pipeline import read_profile

    records = read_profile(directory)
    if not records:
        print("    (no per-task records: the run executed no task)")
        return
    mib = 2.0**-20
    print(f"    per-task profile: {len(records)} tasks in {len({r['pid'] for r in records})} process(es); "
          "MiB, anon = anonymous RSS; at the task's anon peak: glibc live / glibc free in arenas / arrow pool")
    stages: dict[str, list[dict]] = {}
    for r in records:
        stages.setdefault(r["stage"], []).append(r)
    print(f"    {'stage':<20s} {'tasks':>5s} {'sec':>7s} {'peak RSS':>8s} {'anon':>6s} {'+anon':>6s} "
          f"{'live':>6s} {'free':>6s} {'arrow':>6s} {'kept':>6s}")
    order = sorted(stages, key=lambda k: -max(r["peak_rss"] for r in stages[k]))
    for name in order:
        rs = stages[name]
        worst = max(rs, key=lambda r: r["peak_rss"])
        grown = max(r["peak_anon"] - r["anon_start"] for r in rs)
        kept = max(r.get("anon_released", r["anon_end"]) - r["anon_start"] for r in rs)
        secs = sum(r.get("end", r["start"]) - r["start"] for r in rs)
        print(f"    {name:<20s} {len(rs):5d} {secs:7.1f} {worst['peak_rss'] * mib:8.0f} {worst['peak_anon'] * mib:6.0f} "
              f"{grown * mib:6.0f} {worst.get('glibc_in_use', 0) * mib:6.0f} {worst.get('glibc_free', 0) * mib:6.0f} "
              f"{worst.get('arrow_allocated', 0) * mib:6.0f} {kept * mib:6.0f}")
    print("    (+anon: most anonymous memory a task of the stage added over its start; kept: most it left after "
          "the release)")
    if peak.peak_at:
        running = [r for r in records if r["start"] <= peak.peak_at <= r.get("end", r["start"])]
        held = ", ".join(f"{pid}: {rss:.0f}" for pid, rss in sorted(peak.at_peak.items()))
        print(f"    at the summed RSS peak, per process (pid: RSS MiB): {held}")
        for r in running:
            print(f"      pid {r['pid']} was running {r['node']} ({r['key']}), its peak RSS {r['peak_rss'] * mib:.0f}, "
                  f"anon {r['peak_anon'] * mib:.0f}, threads {r.get('threads')}")


def floor(code: str) -> tuple[float, float]:
    """Peak RSS (VmHWM) and final PSS in MiB of a fresh interpreter that runs ``code``."""
    report = ("\nfor line in open('/proc/self/status'):\n"
              "    line.startswith('VmHWM') and print(line, end='')\n"
              "for line in open('/proc/self/smaps_rollup'):\n"
              "    line.startswith('Pss:') and print(line, end='')\n")
    out = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, check=True).stdout
    values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in out.splitlines() if ":" in line}
    return values["VmHWM"], values["Pss"]


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
    parser.add_argument("--scale", type=int, default=10, help="second run with this many times the images (1: one run)")
    parser.add_argument("--scheduler", help="sync, local, auto or a scheduler address (default: the config's)")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: the config's)")
    parser.add_argument("--interval", type=float, default=0.02, help="sampling interval in seconds")
    parser.add_argument("--no-floor", action="store_true", help="skip the import-floor lines")
    parser.add_argument("--per-task", action="store_true",
                        help="profile every task's memory (REPDISSECT_MEMORY_PROFILE) and print the stages' peaks")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        sys.exit("bench_memory.py reads /proc/PID/smaps_rollup (Linux ≥ 4.14)")
    python = sys.executable
    print(f"memory in MiB (1 MB = 0.954 MiB); peaks sampled every {args.interval * 1000:.0f} ms; "
          f"RSS and PSS peaks taken separately")
    if not args.no_floor:
        print(f"  {'floor (one process)':<52s} {'RSS':>7s} {'PSS':>7s}")
        for label, code in FLOORS:
            rss, pss = floor(code)
            print(f"  {label:<52s} {rss:7.0f} {pss:7.0f}")
    results = {}
    print(f"  {'run (all processes summed)':<52s} {'RSS':>7s} {'PSS':>7s}")
    for scale in sorted({1, args.scale}):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            config, images = scaled_config(args.config, scale, Path(tmp))
            argv = [python, "-m", "repdissect.cli", "run", str(config), "--no-report", "--no-progress"]
            if args.scheduler:
                argv += ["--scheduler", args.scheduler]
            if args.workers:
                argv += ["--workers", str(args.workers)]
            env = None
            if args.per_task:
                from repdissect.pipeline import PROFILE_ENV

                env = {**os.environ, PROFILE_ENV: str(Path(tmp) / "profile")}
            peak = peak_tree(argv, args.interval, env)
            status = "" if peak.code == 0 else f"   (FAILED, exit {peak.code})"
            results[scale] = peak
            label = f"{args.config.stem} × {scale} ({images} images, {args.scheduler or 'config scheduler'})"
            print(f"  {label:<52s} {peak.rss:7.0f} {peak.pss:7.0f}   {peak.seconds:6.1f} s, "
                  f"{peak.processes} process(es), {peak.vfork_skipped} vfork children skipped, "
                  f"{peak.minor_faults / 1e6:.2f} M minor faults, {peak.cpu_seconds:.0f} s CPU{status}", flush=True)
            if args.per_task:
                per_task_report(Path(tmp) / "profile", peak)
    if args.scale != 1:
        big, small = results[args.scale], results[1]
        print(f"  {f'ratio {args.scale}× / 1× images':<52s} {big.rss / small.rss:7.2f} {big.pss / small.pss:7.2f}")


if __name__ == "__main__":
    main()
