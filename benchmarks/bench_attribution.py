"""Benchmark: guided backprop of every unit of a layer over N images, against captum's neuron loop.

* ours: :func:`repdissect.stages.attribution.guided_backprop` with ``UnitTarget(layer)`` — all units in one
  call: one forward of the images, then every (image, unit) pair back-propagated on its receptive-field
  region (the demo CNN is a conv/BN/ReLU/max-pool chain; see ``attribution._chain``).
* captum: ``NeuronGuidedBackprop(model, layer).attribute(x, neuron_selector=...)`` looped over the units, the
  way its users do it (one call per unit; the selector reduces the unit's map by its spatial max). captum
  needs out-of-place ``nn.ReLU`` modules, so it gets a copy of the network with every ReLU made out of place
  (ours runs on the original, in-place ReLUs and all).

Both outputs are compared (max abs difference printed, must be ≤ 1e-5 relative). Times are medians of
interleaved repeats on one thread (``--threads``), wall clock and process CPU time (the latter less disturbed
when other jobs share the machine; the load average is printed). ``--memory N`` also streams N images through the unit
loop in batches and prints the process's resident memory every 1,000 images: it must stay flat.

``--channels-last`` builds the network channels-last, as the pipeline does, so captum's loop also runs the
fast channels-last kernels (ours lays its crops out channels-last on the CPU either way).

Usage: python benchmarks/bench_attribution.py [--images 16 --width 16 --layer conv3 --size 64 --chunk 64
       --repeat 3 --threads 1 --memory 10000 --channels-last]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, ratio_line  # noqa: E402

from repdissect.stages import ModelSpec, build_model  # noqa: E402
from repdissect.stages.attribution import UnitTarget, guided_backprop  # noqa: E402


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--layer", default="conv3")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true",
                    help="build the network channels-last, as the pipeline does (both sides run on it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wrapper = build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs={"width": args.width, "depth": 4},
                                    num_classes=8), seed=0, channels_last=args.channels_last)
    net = wrapper.net.to(device).eval()
    theirs_net = copy.deepcopy(net)
    for module in theirs_net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    layer = dict(net.named_modules())[args.layer]
    their_layer = dict(theirs_net.named_modules())[args.layer]
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        units = int(layer(net.pool2(net.conv2(net.pool1(net.conv1(x))))).shape[1]) if args.layer == "conv3" else None
    from captum.attr import NeuronGuidedBackprop

    def ours() -> torch.Tensor:
        return guided_backprop(net, x, UnitTarget(args.layer, reduce="max"), unit_chunk=args.chunk)

    def captum_loop() -> torch.Tensor:
        gb = NeuronGuidedBackprop(theirs_net, their_layer)
        maps = [gb.attribute(x, neuron_selector=lambda out, k=k: out[:, k].amax((1, 2))) for k in range(units)]
        return torch.stack(maps, 1)

    cpu: dict[str, list[float]] = {"captum": [], "ours": []}

    def cpu_timed(name: str, fn):  # the process CPU time of each timed run, next to the wall time
        def run() -> torch.Tensor:
            start = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - start)
            return out
        return run

    load = os.getloadavg()[0]
    times, results = interleaved({"captum": cpu_timed("captum", captum_loop), "ours": cpu_timed("ours", ours)},
                                 repeat=args.repeat, warmup=True)
    cpu_med = {k: statistics.median(v[1:]) for k, v in cpu.items()}  # v[0]: the warm-up run (warmup=True above)
    diff = float((results["ours"] - results["captum"]).abs().max())
    scale = float(results["captum"].abs().max())
    print(f"guided backprop, all {units} units of {args.layer} (width {args.width}), {args.images} images "
          f"{args.size}px, {args.threads} thread(s), {device}{', channels-last network' if args.channels_last else ''}:")
    print(f"  captum NeuronGuidedBackprop loop: {times['captum']:.3f} s   ours: {times['ours']:.3f} s   "
          f"max |diff| {diff:.2e} (scale {scale:.2e})")
    print(ratio_line("speed-up (captum / ours)", times["captum"], times["ours"]))
    print(f"  process CPU time: captum {cpu_med['captum']:.3f} s, ours {cpu_med['ours']:.3f} s")
    print(ratio_line("speed-up in CPU time (captum / ours)", cpu_med["captum"], cpu_med["ours"]))
    print(f"  load average at the start: {load:.1f} (on {os.cpu_count()} CPUs)")
    if diff > 1e-5 * max(scale, 1e-12):
        raise SystemExit("outputs differ")
    if args.memory:
        start, peak = rss_mb(), 0.0
        done = 0
        t0 = time.time()
        while done < args.memory:
            ours()
            done += args.images
            peak = max(peak, rss_mb())
            if done % 1000 < args.images:
                print(f"  {done:6d} images: RSS {rss_mb():7.1f} MB (start {start:.1f} MB)")
        print(f"  memory over {done} images: start {start:.1f} MB, peak {peak:.1f} MB, end {rss_mb():.1f} MB; "
              f"{done / (time.time() - t0):.1f} images/s")


if __name__ == "__main__":
    main()
