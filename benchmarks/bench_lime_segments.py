"""Measurement: LIME with grid vs SLIC superpixels, ours and captum's ``Lime`` on the same superpixels.

Task: 32-px noise images with one bright 8 × 8 square; the class says which half holds it; a small CNN is
trained on it (a few seconds). For test images we explain the true class with

* ours: :func:`repdissect.stages.attribution.lime` (ridge surrogate, lime's kernel) with lime's default
  mean-colour fill ("ours") and with a constant fill 0 like captum's baseline ("ours/0");
* captum: ``captum.attr.Lime(model).attribute(x, target, feature_mask=segments, n_samples=...)`` (its defaults:
  Lasso surrogate, baseline 0, its own kernel and sampling),

each with a ``grid`` (squares of ``--cell`` px) and a ``slic`` (``--segments`` superpixels) segmentation, and
report how well the map finds the square: the share of the positive attribution inside the square (``mass``)
and how often the highest-scoring superpixel overlaps it (``top-1 hit``), plus seconds per image.

Finding it exists to show: with superpixels that follow the object (SLIC), lime's mean-colour fill replaces the
square by its own mean colour, so switching a superpixel "off" removes nothing and LIME cannot see the
square; a constant fill (captum's baseline 0) is needed with edge-following superpixels.

Usage: python benchmarks/bench_lime_segments.py [--images 16 --samples 256 --cell 4 --segments 64 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from repdissect.stages.attribution import lime, lime_segments


def task(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    rows = torch.randint(0, size - 8, (n,), generator=g)
    cols = torch.randint(0, size // 2 - 8, (n,), generator=g) + (size // 2) * y
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        x[i, :, rows[i]:rows[i] + 8, cols[i]:cols[i] + 8] += 2.0
        mask[i, rows[i]:rows[i] + 8, cols[i]:cols[i] + 8] = True
    return x, y, mask


def scores(maps: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    pos = maps.clamp(min=0)
    mass = (pos * mask).sum((1, 2)) / pos.sum((1, 2)).clamp(min=1e-12)
    flat = maps.flatten(1)
    top = flat == flat.max(1, keepdim=True).values
    hit = (top & mask.flatten(1)).any(1).float()
    return float(mass.mean()), float(hit.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--cell", type=int, default=4)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    x, y, _ = task(1024, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(400):
        idx = torch.arange(step * 64, step * 64 + 64) % 1024
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    tx, ty, tmask = task(args.images, 1)
    with torch.no_grad():
        acc = float((model(tx).argmax(1) == ty).float().mean())
    print(f"LIME grid vs SLIC: {args.images} test images 32px (model accuracy {acc:.2f}), {args.samples} samples, "
          f"grid cell {args.cell}px, SLIC {args.segments} segments, {args.threads} thread(s)")
    from captum.attr import Lime

    print(f"  {'method':<8s} {'segments':<9s} {'count':>6s} {'mass':>6s} {'top-1 hit':>10s} {'s/image':>8s}")
    for name in ("grid", "slic"):
        t0 = time.perf_counter()
        segs = lime_segments(tx, name, cell=args.cell, n_segments=args.segments)
        seg_time = (time.perf_counter() - t0) / args.images
        count = float(torch.stack([s.unique().numel() * torch.ones(()) for s in segs]).mean())
        t0 = time.perf_counter()
        ours = lime(model, tx, ty, segments=segs, samples=args.samples, seed=0)
        t_ours = (time.perf_counter() - t0) / args.images + seg_time
        ours0 = lime(model, tx, ty, segments=segs, samples=args.samples, seed=0, fill=0.0)
        t0 = time.perf_counter()
        theirs = torch.cat([Lime(model).attribute(tx[i:i + 1], target=int(ty[i]), feature_mask=segs[i][None, None],
                                                   n_samples=args.samples, perturbations_per_eval=64)[:, 0]
                            for i in range(args.images)])
        t_theirs = (time.perf_counter() - t0) / args.images + seg_time
        for label, maps, t in (("ours", ours, t_ours), ("ours/0", ours0, t_ours), ("captum", theirs, t_theirs)):
            mass, hit = scores(maps.detach(), tmask)
            print(f"  {label:<8s} {name:<9s} {count:6.1f} {mass:6.3f} {hit:10.2f} {t:8.3f}")


if __name__ == "__main__":
    main()
