"""Sweep: interpretable-CNN filter-loss settings against location instability and accuracy.

For each setting (loss weight λ, τ·n², β, prior of the negative template) the demo's CNN is trained on the
procedural world with the filter loss on one layer, and the script reports

* the filter loss (summed over filters, mean over the epoch's batches) in the first and the last epoch and
  its floor ``−C·H(T)`` (the loss cannot go below minus the prior's entropy per filter);
* the spatial term of the last epoch (low = each filter fires at one place when it fires);
* location instability of that layer's **unmasked** output (Zhang et al.; the same tensor as the ordinary
  network's), over the top-K images per landmark, and the number of valid (non-dead) units;
* final validation accuracy (of the masked network, as training reports it).

λ = 0 is the ordinary network (same seed, same recipe). Everything runs on the CPU, deterministic.

Usage::

    python benchmarks/sweep_icnn.py [--images 1200] [--epochs 4] [--seeds 0] [--layer conv4]
        [--grid "weight=0,0.05,0.5;tau=5"] [--top-k 50] [--csv out.csv]

``--grid`` is ``key=v1,v2;key=v1`` over ``weight``, ``tau``, ``beta``, ``alpha`` (the cartesian product;
``weight=0`` rows ignore the other keys and run once per seed).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import pandas as pd
import torch

from repdissect.datasets import SyntheticWorld
from repdissect.stages import (
    LandmarkTopK,
    ModelSpec,
    TrainConfig,
    build_model,
    resolve_layers,
    spatial_max_argmax,
    stability_tables,
    train_model_full,
)

KEYS = {"weight": "interpretable_weight", "tau": "interpretable_tau", "beta": "interpretable_beta",
        "alpha": "interpretable_alpha"}


def parse_grid(text: str) -> list[dict[str, float]]:
    axes: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        if key.strip() not in KEYS:
            raise SystemExit(f"--grid: unknown key {key!r}; use {sorted(KEYS)}")
        axes[key.strip()] = [float(v) for v in values.split(",")]
    names = list(axes)
    settings, seen = [], set()
    for combo in itertools.product(*(axes[k] for k in names)):
        setting = dict(zip(names, combo))
        if setting.get("weight", 0.0) == 0.0:
            setting = {"weight": 0.0}
        key = tuple(sorted(setting.items()))
        if key not in seen:
            seen.add(key)
            settings.append(setting)
    return settings


def layer_instability(model: torch.nn.Module, layer: str, world: SyntheticWorld, top_k: int) -> tuple[float, int]:
    """Location instability of ``layer``'s plain (unmasked) output over the whole world."""
    module = resolve_layers(model, [layer])[layer]
    grabbed: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: grabbed.__setitem__("x", out.detach().clone()))
    stat = LandmarkTopK(world.image_size, top_k)
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(world), 200):
                batch = world.load(np.arange(start, min(start + 200, len(world))))
                model(torch.from_numpy(batch.images))
                acts = grabbed["x"].float().numpy()
                values, argmax = spatial_max_argmax(acts)
                stat.update(values, argmax, acts.shape[-2:], batch)
    finally:
        handle.remove()
    summary = stability_tables(stat, world.landmark_names)["summary"].iloc[0]
    return float(summary["instability"]), int(summary["valid_units"])


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (no optional dependency)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--layer", default="conv4")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--grid", default="weight=0,0.05,0.5;tau=5")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default="")
    args = parser.parse_args()

    world = SyntheticWorld(images=args.images, size=64, seed=0)
    spec = ModelSpec("builtin:cnn", {"width": args.width, "depth": 4})
    base = TrainConfig(epochs=args.epochs, batch_size=32, lr=0.002, weight_decay=1e-4, optimizer="adam",
                       schedule="onecycle", augment_flip=True, augment_shift=0)
    rows = []
    for setting in parse_grid(args.grid):
        for seed in (int(s) for s in args.seeds.split(",")):
            params = {KEYS[k]: v for k, v in setting.items()}
            if setting["weight"] > 0:
                params["interpretable_layer"] = args.layer
            config = TrainConfig(**{**base.to_dict(), **params})
            start = time.perf_counter()
            result = train_model_full(spec, world, seed=seed, config=config, num_threads=args.threads)
            model = build_model(spec, seed=seed, num_classes=len(world.class_names), state_dict=result.state_dict)
            instability, valid = layer_instability(model, args.layer, world, args.top_k)
            hist = result.history
            row = {**setting, "seed": seed, "val_acc": float(hist["val_acc"].iloc[-1]),
                   "instability": instability, "valid_units": valid, "seconds": time.perf_counter() - start}
            if "filter_loss" in hist:
                row.update(loss_first=float(hist["filter_loss"].iloc[0]), loss_last=float(hist["filter_loss"].iloc[-1]),
                           spatial_last=float(hist["filter_spatial"].iloc[-1]))
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    table = pd.DataFrame(rows)
    print()
    print(markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
