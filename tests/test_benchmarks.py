"""The GPU benchmark is run where a GPU is lent, rarely and with little time: its rehearsal (the CPU standing in
for the GPU, every check and line of the script) runs here, so the script cannot rot between those runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_rehearsal_runs_every_check_and_passes():
    done = subprocess.run([sys.executable, "bench_gpu.py", "--rehearse", "--images", "8", "--batch", "4"],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in ("activations layer3", "activations layer4", "moments: max |ΔΣ|",
                 "cpu (compiled) vs gpu (torch): equal = True", "of on-pixels differ", "speed-up", "rehearsal"):
        assert line in out, out
    assert "FAILED" not in out
