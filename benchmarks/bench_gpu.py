"""GPU check: ResNet-18 at 224 px — extraction, IoU tally and comparison moments on the CPU and on a CUDA GPU.

For ``--images`` synthetic images (random pixels; Broden-like labels at 112² from ``bench_dissect``'s world), in
batches of ``--batch``:

* **extraction** — forward passes with hooks on ``layer3`` (256 × 14²) and ``layer4`` (512 × 7²);
* **tally** — thresholds (top 0.5 %, exact, from the CPU activations) and the IoU tally of ``layer4``;
* **moments** — the joint first/second moments of ``layer3`` (average-pooled to 7²) and ``layer4``, one sample
  per image position, as the compare stage accumulates them (float64, on the device).

Checks (the script exits 1 when one fails): activations agree within ``--tol`` relative to their largest
value; covariances within ``--tol`` relative to theirs; the GPU tally of the *CPU* activations equals the
CPU tally exactly (same counts, kernel equivalence); the GPU tally of the GPU's own activations differs in at
most a ``--tol`` fraction of on-pixels (pixels within rounding of a threshold may flip). Printed: seconds
per stage and device (CUDA synchronised), the speed-up, and the GPU's peak memory.

Without a CUDA device it prints why and exits 0. ``--cpu-only`` runs the CPU half; ``--rehearse`` runs the
whole script with the CPU standing in for the GPU (the torch tally kernel and the tensor moments there, every
check and printed line), so the script is tried end to end before a GPU's limited time is spent on it.

Usage: python benchmarks/bench_gpu.py [--images 256] [--batch 64] [--tol 1e-4] [--cpu-only | --rehearse]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench_dissect import make_world
from repdissect.datasets import Batch
from repdissect.stages import IoUTally, ModelSpec, TopQuantile, build_model, resolve_layers
from repdissect.stages.compare import JointMoments

LAYERS = ("layer3", "layer4")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract(model: torch.nn.Module, images: np.ndarray, batch: int, device: torch.device) -> tuple[dict, float]:
    """Activations of LAYERS for all images, as float32 tensors on ``device``; and the seconds it took."""
    model = model.to(device).eval()
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    modules = resolve_layers(model.net, list(LAYERS))
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured[name].append(out.float()))
             for name in LAYERS]
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            model(torch.as_tensor(images[lo : lo + batch], device=device))  # uint8 in: the wrapper normalises
    _sync(device)
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}, seconds


def tally(acts: np.ndarray, thresholds: np.ndarray, labels: Batch, concepts, device: torch.device,
          shard: int, kernel: str = "auto") -> tuple[IoUTally, float]:
    result = IoUTally(concepts, (112, 112), device=str(device), kernel=kernel)
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, len(acts), shard):
        s = slice(lo, lo + shard)
        sub = Batch(index=labels.index[s], images=labels.images[s],
                    pixel_labels={k: v[s] for k, v in labels.pixel_labels.items()},
                    image_labels={k: v[s] for k, v in labels.image_labels.items()})
        result.update(acts[s], thresholds, sub)
    _sync(device)
    return result, time.perf_counter() - start


def moments(acts: dict[str, torch.Tensor], batch: int, device: torch.device) -> tuple[JointMoments, float]:
    a_all = torch.nn.functional.avg_pool2d(acts["layer3"], 2)  # 14² → 7², aligned with layer4's positions
    b_all = acts["layer4"]
    stat = JointMoments(a_all.shape[1], b_all.shape[1])
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, len(b_all), batch):
        a = a_all[lo : lo + batch].permute(0, 2, 3, 1).reshape(-1, a_all.shape[1])
        b = b_all[lo : lo + batch].permute(0, 2, 3, 1).reshape(-1, b_all.shape[1])
        stat.update(a, b)
    _sync(device)
    return stat, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU half only (no GPU needed)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the whole script with the CPU standing in for the GPU (torch tally kernel)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not (args.cpu_only or args.rehearse):
        print("bench_gpu: skipped — no CUDA device is visible (torch.cuda.is_available() is False)")
        return 0
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, 224, 224), dtype=np.uint8)
    _, concepts, labels = make_world(args.images, 1, 7, 112, 1200, seed=0)
    model = build_model(ModelSpec(architecture="torchvision:resnet18", arch_kwargs={}, num_classes=None), seed=0)

    cpu = torch.device("cpu")
    acts_cpu, t_extract_cpu = extract(model, images, args.batch, cpu)
    l4_cpu = acts_cpu["layer4"].numpy()
    quantile = TopQuantile(args.images, 0.005)
    quantile.update(l4_cpu)
    thresholds = quantile.result()["threshold"].to_numpy()
    tally_cpu, t_tally_cpu = tally(l4_cpu, thresholds, labels, concepts, cpu, args.batch)
    mom_cpu, t_mom_cpu = moments(acts_cpu, args.batch, cpu)
    rows = [("extraction", t_extract_cpu), (f"tally ({tally_cpu.kernel})", t_tally_cpu), ("moments", t_mom_cpu)]
    print(f"ResNet-18, {args.images} images at 224 px, batch {args.batch}; layer4 tally at 112², q = 0.005")
    if args.cpu_only:
        for name, seconds in rows:
            print(f"  {name:<22s} cpu {seconds:8.3f} s")
        return 0

    # the GPU, or in a rehearsal the CPU in its place with the GPU's tally kernel (torch)
    gpu = torch.device("cpu" if args.rehearse else "cuda")
    kernel = "torch" if args.rehearse else "auto"
    if gpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gpu)
    extract(model, images[: args.batch], args.batch, gpu)  # warm-up: cuDNN autotuning and context creation
    acts_gpu, t_extract_gpu = extract(model, images, args.batch, gpu)
    tally_gpu, t_tally_gpu = tally(acts_gpu["layer4"].cpu().numpy(), thresholds, labels, concepts, gpu, args.batch,
                                   kernel)
    same_input, _ = tally(l4_cpu, thresholds, labels, concepts, gpu, args.batch, kernel)
    mom_gpu, t_mom_gpu = moments(acts_gpu, args.batch, gpu)
    peak = torch.cuda.max_memory_allocated(gpu) / 2**20 if gpu.type == "cuda" else float("nan")

    failures = []
    for name in LAYERS:
        ref, got = acts_cpu[name], acts_gpu[name].cpu()
        rel = float((ref - got).abs().max() / ref.abs().max())
        print(f"  activations {name}: max |Δ| / max |x| = {rel:.2e}")
        if rel > args.tol:
            failures.append(f"activations {name} differ by {rel:.2e}")
    cov_ref, cov_got = mom_cpu.covariance(), mom_gpu.covariance()
    rel = float(np.abs(cov_ref - cov_got).max() / np.abs(cov_ref).max())
    print(f"  moments: max |ΔΣ| / max |Σ| = {rel:.2e}")
    if rel > args.tol:
        failures.append(f"covariances differ by {rel:.2e}")
    exact = all(np.array_equal(getattr(tally_cpu, f), getattr(same_input, f))
                for f in ("intersection", "activation", "truth"))
    print(f"  tally of the same activations, cpu ({tally_cpu.kernel}) vs gpu ({same_input.kernel}): equal = {exact}")
    if not exact:
        failures.append("the GPU tally of the CPU activations differs from the CPU tally")
    on = max(int(tally_cpu.activation.sum()), 1)
    flipped = int(np.abs(tally_cpu.activation - tally_gpu.activation).sum()) / on
    print(f"  tally of each device's own activations: {flipped:.2e} of on-pixels differ")
    if flipped > args.tol:
        failures.append(f"{flipped:.2e} of on-pixels differ between devices")
    gpu_rows = [t_extract_gpu, t_tally_gpu, t_mom_gpu]
    for (name, cpu_s), gpu_s in zip(rows, gpu_rows):
        print(f"  {name:<22s} cpu {cpu_s:8.3f} s   gpu {gpu_s:8.3f} s   speed-up {cpu_s / gpu_s:7.1f}×")
    if gpu.type == "cuda":
        print(f"  GPU peak memory allocated: {peak:.0f} MiB ({torch.cuda.get_device_name(gpu)})")
    else:
        print("  rehearsal: the 'gpu' column is the CPU again (torch tally kernel); no GPU memory figures")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
