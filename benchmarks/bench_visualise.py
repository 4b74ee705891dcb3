"""Visualisation timings: activation maximisation of every unit of a layer — all units in one batch, in
batches of ``am_batch_units`` (the default, 16) and one unit at a time — with each mode's memory; t-SNE at 10⁴
points, scikit-learn vs openTSNE.

Usage: python benchmarks/bench_visualise.py [--part am|tsne|all] [--steps 64] [--points 10000] [--device cpu]
The AM part uses the demo CNN (width 16, depth 4) at 64 px with random weights (the optimisation's cost does
not depend on the weights' values); prints CPU seconds per layer for each mode (interleaved, median of
``--repeat``) and their ratios, then each mode's memory: the anonymous memory the optimisation added over the
process's state before it, run once per mode in a fresh child process with the pipeline's allocator settings
(sampled every 5 ms), since a process keeps its high-water mark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, ratio_line  # noqa: E402

from repdissect.stages import ModelSpec, build_model  # noqa: E402
from repdissect.stages.visualise import AMSettings, activation_maximisation, opentsne_available, tsne_embedding  # noqa: E402


AM_MODES = (("one batch", 0), ("batches of 16", 16), ("per unit", 1))

_AM_MEMORY_CHILD = """
import os, sys, threading, time
import torch
from repdissect.stages import ModelSpec, build_model, tune_allocator, release_freed_memory
from repdissect.stages.visualise import AMSettings, activation_maximisation
tune_allocator()
torch.set_num_threads(1)
layer, steps, batch_units, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs={"width": 16, "depth": 4}, num_classes=8), seed=0)
units = getattr(model.net, layer).conv.out_channels
page = os.sysconf("SC_PAGE_SIZE")
def anon():
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * page
activation_maximisation(model, layer, range(2), (64, 64), AMSettings(steps=2), batch_units=batch_units, device=device)
release_freed_memory()
base, peak, done = anon(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
activation_maximisation(model, layer, range(units), (64, 64), AMSettings(steps=steps), batch_units=batch_units,
                        device=device)
done[0] = True
thread.join()
print((max(peak[0], anon()) - base) / 2**20)
"""


def am_memory(layer: str, steps: int, batch_units: int, device: str) -> float:
    """MiB of anonymous memory one layer's optimisation adds, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _AM_MEMORY_CHILD, layer, str(steps), str(batch_units), device],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_am(steps: int, device: str, layers: list[str], repeat: int) -> None:
    model = build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs={"width": 16, "depth": 4}, num_classes=8), seed=0)
    settings = AMSettings(steps=steps)
    for layer in layers:
        units = getattr(model.net, layer).conv.out_channels
        med, _ = interleaved({
            name: (lambda b=b: activation_maximisation(model, layer, range(units), (64, 64), settings, batch_units=b,
                                                       device=device))
            for name, b in AM_MODES}, repeat=repeat, warmup=False, clock=time.process_time)
        memory = {name: am_memory(layer, steps, b, device) for name, b in AM_MODES}
        print(f"AM {layer} ({units} units, {steps} steps, {device}): " + ", ".join(
            f"{name} {med[name]:.1f} s CPU / +{memory[name]:.0f} MiB" for name, _ in AM_MODES))
        print(ratio_line(f"  AM {layer} one batch vs per unit", med["per unit"], med["one batch"]))
        print(ratio_line(f"  AM {layer} batches of 16 vs per unit", med["per unit"], med["batches of 16"]))
        print(ratio_line(f"  AM {layer} batches of 16 vs one batch", med["one batch"], med["batches of 16"]))


def bench_tsne(points: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 128)) * 4
    x = centres[rng.integers(0, 10, points)] + rng.normal(size=(points, 128))
    candidates = {"sklearn": lambda: tsne_embedding(x, method="sklearn")}
    if opentsne_available():
        candidates["opentsne"] = lambda: tsne_embedding(x, method="opentsne")
    med, _ = interleaved(candidates, repeat=1, warmup=False)
    for name, t in med.items():
        print(f"t-SNE {points} points × 128: {name} {t:.1f} s")
    if "opentsne" in med:
        print(ratio_line("  t-SNE openTSNE vs scikit-learn", med["sklearn"], med["opentsne"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["am", "tsne", "all"])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default="conv2,conv3,conv4")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part in ("tsne", "all"):
        bench_tsne(args.points)
    if args.part in ("am", "all"):
        bench_am(args.steps, args.device, args.layers.split(","), args.repeat)
