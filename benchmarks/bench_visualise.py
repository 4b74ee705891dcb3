"""Visualisation timings: activation maximisation of every unit of a layer, batched vs one unit at a time;
t-SNE at 10⁴ points, scikit-learn vs openTSNE.

Usage: python benchmarks/bench_visualise.py [--part am|tsne|all] [--steps 64] [--points 10000] [--device cpu]
The AM part uses the demo CNN (width 16, depth 4) at 64 px with random weights (the optimisation's cost does
not depend on the weights' values); prints seconds per layer for each mode and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, ratio_line  # noqa: E402

from repdissect.stages import ModelSpec, build_model  # noqa: E402
from repdissect.stages.visualise import AMSettings, activation_maximisation, opentsne_available, tsne_embedding  # noqa: E402


def bench_am(steps: int, device: str, layers: list[str]) -> None:
    model = build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs={"width": 16, "depth": 4}, num_classes=8), seed=0)
    settings = AMSettings(steps=steps)
    for layer in layers:
        units = getattr(model.net, layer).conv.out_channels
        med, _ = interleaved({
            "batched": lambda: activation_maximisation(model, layer, range(units), (64, 64), settings, device=device),
            "per_unit": lambda: activation_maximisation(model, layer, range(units), (64, 64), settings, batch_units=1,
                                                        device=device),
        }, repeat=1, warmup=False)
        print(f"AM {layer} ({units} units, {steps} steps, {device}): batched {med['batched']:.1f} s, "
              f"per unit {med['per_unit']:.1f} s")
        print(ratio_line(f"  AM {layer} batched vs per-unit", med["per_unit"], med["batched"]))


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
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part in ("tsne", "all"):
        bench_tsne(args.points)
    if args.part in ("am", "all"):
        bench_am(args.steps, args.device, args.layers.split(","))
