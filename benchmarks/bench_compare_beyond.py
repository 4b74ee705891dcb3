"""Benchmark of the metrics beyond CKA (stages/compare): from per-group moments vs in-memory numpy, and the jackknife.

1. **Debiased linear CKA and Procrustes, end to end**: streaming the samples batch by batch into
   :class:`GroupedMoments` (10 hashed jackknife groups, fourth-order terms included) and reading the metric from
   the merged sums, vs in-memory numpy on the full arrays (debiased CKA in Kornblith's feature-space form on the
   centred data — the n × n Gram form does not fit at N = 10⁵ — and Ding et al.'s ``procrustes``). Values must
   agree; peak traced memory is reported at two sample counts (ours does not grow with N).
2. **The jackknife's extra cost**: the same stream accumulated into one group and read once (point estimate)
   vs hashed into G groups and read on the full data plus G leave-one-group-out replicates (total − group, no
   second pass) with the weighted jackknife, for the cheap metrics and for every moment-based metric.

3. **All 12 registry metrics, end to end** (what the ``similarity`` stage does for one layer pair, without the
   permutation null): the samples streamed into the per-group sums and the fixed RSA subset, then every metric
   read once (point estimate; RSA on the subset) vs read with its leave-one-group-out jackknife s.e. and interval
   (:func:`similarity_table`: the moment metrics' replicates are total − group, RSA's drop the group's subset rows
   from the RDM computed once). Wall and process CPU time are both reported (the CPU ratio is steadier on a
   shared machine).

Both sides of each race are interleaved, median of ``--repeat``.

Usage: python benchmarks/bench_compare_beyond.py [--samples 100000] [--units 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from typing import Callable

import numpy as np

from _timing import interleaved
from repdissect.stages.compare import (
    REGISTRY,
    GroupedMoments,
    SubsetRows,
    debiased_cka_moments,
    group_of,
    jackknife,
    procrustes_moments,
    similarity_table,
)

BATCH = 8192


def _activations(samples: int, units: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((samples, 32)).astype(np.float32)
    a = np.maximum(latent @ rng.standard_normal((32, units)).astype(np.float32)
                   + rng.standard_normal((samples, units)).astype(np.float32), 0)
    b = np.maximum(latent @ rng.standard_normal((32, units)).astype(np.float32)
                   + rng.standard_normal((samples, units)).astype(np.float32), 0)
    return a, b


def _stream(a: np.ndarray, b: np.ndarray, groups: int, hashed: bool) -> GroupedMoments:
    g = GroupedMoments([a.shape[1], b.shape[1]], ["a", "b"], max(groups, 2))
    ids = np.arange(a.shape[0])
    for start in range(0, a.shape[0], BATCH):
        part = slice(start, start + BATCH)
        group = group_of(ids[part], groups) if hashed else np.zeros(ids[part].size, np.int64)
        g.update(a[part], b[part], group=group)
    return g


def _numpy_debiased_cka(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a - a.mean(0, dtype=np.float64), b - b.mean(0, dtype=np.float64)
    n = x.shape[0]
    ra, rb = (x * x).sum(1), (y * y).sum(1)

    def h(u, v, su, sv):  # noqa: ANN001, ANN202
        return (np.linalg.norm(u.T @ v) ** 2 - n / (n - 2) * su @ sv + su.sum() * sv.sum() / ((n - 1) * (n - 2)))

    return float(h(x, y, ra, rb) / np.sqrt(h(x, x, ra, ra) * h(y, y, rb, rb)))


def _numpy_procrustes(a: np.ndarray, b: np.ndarray) -> float:
    x, y = (a - a.mean(0, dtype=np.float64)).T, (b - b.mean(0, dtype=np.float64)).T
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(2 - 2 * np.linalg.svd(x @ y.T, compute_uv=False).sum())


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _read(g: GroupedMoments, names: list[str], jack: bool) -> dict[str, tuple[float, float]]:
    states = g.states(jackknife=jack)
    sizes = g.group_sizes()
    sizes = sizes[sizes > 0]
    out = {}
    for name in names:
        values = REGISTRY[name].moments(states, "a", "b")
        out[name] = (float(values[0]), jackknife(values[0], values[1:], sizes).se if jack else float("nan"))
    return out


def _stream_with_subset(a: np.ndarray, b: np.ndarray, groups: int, hashed: bool,
                        subset: int) -> tuple[GroupedMoments, SubsetRows]:
    g = GroupedMoments([a.shape[1], b.shape[1]], ["a", "b"], max(groups, 2))
    rows = SubsetRows([a.shape[1], b.shape[1]], ["a", "b"], subset)
    ids = np.arange(a.shape[0])
    for start in range(0, a.shape[0], BATCH):
        part = slice(start, start + BATCH)
        group = group_of(ids[part], groups) if hashed else np.zeros(ids[part].size, np.int64)
        g.update(a[part], b[part], group=group)
        rows.update(a[part], b[part], ids=ids[part])
    return g, rows


def _read_point(g: GroupedMoments, rows: SubsetRows) -> dict[str, float]:
    """Every registry metric once, under the same one-BLAS-thread limit as :func:`similarity_table`."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        state = g.states(jackknife=False)
        sub = rows.rows()
        return {name: float(m.moments(state, "a", "b")[0]) if m.moments is not None
                else float(m.rows(sub["a"], sub["b"])) for name, m in REGISTRY.items()}


def _all_point(a: np.ndarray, b: np.ndarray, subset: int) -> dict[str, float]:
    return _read_point(*_stream_with_subset(a, b, 1, False, subset))


def _all_jackknife(a: np.ndarray, b: np.ndarray, groups: int, subset: int) -> dict[str, tuple[float, float]]:
    g, rows = _stream_with_subset(a, b, groups, True, subset)
    table = similarity_table(g, [("a", "b")], list(REGISTRY), subset=rows.rows(), subset_ids=rows.ids, permutations=0)
    return {r.metric: (r.value, r.se) for r in table.itertuples()}


def _interleaved_cpu(candidates: dict[str, Callable[[], object]], repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per candidate, run in turn (A, B, A, B, …) after one warm-up each."""
    for fn in candidates.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subset", type=int, default=300, help="RSA subset size (the [similarity] default)")
    parser.add_argument("--only-all", action="store_true", help="run section 3 alone")
    args = parser.parse_args()
    a, b = _activations(args.samples, args.units)
    print(f"N = {args.samples} samples, {args.units} + {args.units} units, batches of {BATCH}, "
          f"G = {args.groups} groups, median of {args.repeat}")

    if args.only_all:
        _section_all(a, b, args)
        return

    # 1. end to end vs in-memory numpy
    def ours() -> tuple[float, float]:
        state = _stream(a, b, args.groups, hashed=True).states(jackknife=False)
        return float(debiased_cka_moments(state, "a", "b")[0]), float(procrustes_moments(state, "a", "b")[0])

    def numpy_in_memory() -> tuple[float, float]:
        return _numpy_debiased_cka(a, b), _numpy_procrustes(a, b)

    times, results = interleaved({"ours": ours, "numpy": numpy_in_memory}, repeat=args.repeat)
    diff = np.abs(np.subtract(results["ours"], results["numpy"])).max()
    print("\n1. debiased CKA + Procrustes, end to end")
    print(f"  streamed per-group moments   {times['ours']:8.3f} s   values {results['ours']}")
    print(f"  in-memory numpy              {times['numpy']:8.3f} s   values {results['numpy']}   |Δ| = {diff:.1e}")
    print(f"  ratio numpy / ours           {times['numpy'] / times['ours']:8.2f}×")
    small = args.samples // 10
    for label, n in ((f"N = {small}", small), (f"N = {args.samples}", args.samples)):
        sa, sb = a[:n], b[:n]
        mine = _peak(lambda: _stream(sa, sb, args.groups, hashed=True).states(jackknife=False))
        base = _peak(lambda: (_numpy_debiased_cka(sa, sb), _numpy_procrustes(sa, sb)))
        print(f"  peak memory at {label:<12s} ours {mine / 2**20:7.1f} MiB   numpy {base / 2**20:7.1f} MiB")

    # 2. jackknife overhead over the point estimate, end to end
    cheap = ["linear_cka", "debiased_cka", "procrustes", "shape_alpha1"]
    every = [m for m, spec in REGISTRY.items() if spec.moments is not None]
    print("\n2. jackknife overhead (stream + read), end to end")
    for label, names in (("cheap metrics " + ",".join(cheap), cheap), (f"all {len(every)} moment metrics", every)):
        candidates = {
            "point": lambda names=names: _read(_stream(a, b, 1, hashed=False), names, jack=False),
            "jackknife": lambda names=names: _read(_stream(a, b, args.groups, hashed=True), names, jack=True),
        }
        times, results = interleaved(candidates, repeat=args.repeat)
        g = _stream(a, b, args.groups, hashed=True)
        state_time = interleaved({"read": lambda: _read(g, names, jack=True)}, repeat=args.repeat)[0]["read"]
        print(f"  {label}")
        print(f"    point estimate {times['point']:8.3f} s   with jackknife {times['jackknife']:8.3f} s   "
              f"overhead {100 * (times['jackknife'] / times['point'] - 1):+6.1f} %   (read-out alone {state_time:.3f} s)")
        for name in names[:4]:
            value, se = results["jackknife"][name]
            print(f"    {name:<16s} {value:.4f} ± {se:.4f}")

    _section_all(a, b, args)


def _section_all(a: np.ndarray, b: np.ndarray, args: argparse.Namespace) -> None:
    # 3. all 12 registry metrics (RSA included) end to end: point estimate vs with the jackknife
    wall, cpu = _interleaved_cpu({
        "point": lambda: _all_point(a, b, args.subset),
        "jackknife": lambda: _all_jackknife(a, b, args.groups, args.subset),
    }, args.repeat)
    print(f"\n3. all {len(REGISTRY)} registry metrics end to end (stream + read; RSA on {args.subset} images)")
    for label, t in (("wall", wall), ("CPU ", cpu)):
        print(f"  {label}: point estimate {t['point']:8.3f} s   with jackknife s.e. {t['jackknife']:8.3f} s   "
              f"overhead {100 * (t['jackknife'] / t['point'] - 1):+6.1f} %")
    g, rows = _stream_with_subset(a, b, args.groups, True, args.subset)
    read_point = _interleaved_cpu({"r": lambda: _read_point(g, rows)}, args.repeat)[1]["r"]
    read_jack = _interleaved_cpu({"r": lambda: similarity_table(g, [("a", "b")], list(REGISTRY), subset=rows.rows(),
                                                                subset_ids=rows.ids, permutations=0)},
                                 args.repeat)[1]["r"]
    print(f"  read-out alone (CPU): point {read_point:.3f} s, with jackknife {read_jack:.3f} s")


if __name__ == "__main__":
    main()
