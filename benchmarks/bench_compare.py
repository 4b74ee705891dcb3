"""Benchmark of the comparison math (stages/compare) against the straightforward baselines, with ratios.

Three races, each timing ours and the baseline in the same run on the same synthetic ReLU activations:

1. SVCCA from streamed moments vs an in-memory numpy SVCCA (thin SVD of each centred (n × C) side, then CCA).
   Ours is timed twice: from already accumulated moments (what the pipeline does — the moments are shared by every
   metric) and end to end (accumulating the moments batch by batch first). Peak traced memory of both paths is
   reported too: the moment path depends on the batch size and (Ca + Cb)², not on n.
2. One-to-one matching: ``scipy.optimize.linear_sum_assignment`` (and our full matching suite: semi-matchings,
   Hungarian, bottleneck, Hopcroft–Karp counts) vs ``networkx.max_weight_matching(maxcardinality=True)`` on the
   complete bipartite graph, which is what Li et al.'s code runs. Both must reach the same total correlation.
3. Lasso path for all targets: blocked coordinate descent on the moments vs scikit-learn's ``Lasso`` on the
   standardised samples (warm-started along the same α path, same duality-gap tolerance), with and without
   scikit-learn's precomputed Gram. Coefficients must agree.

Usage: python benchmarks/bench_compare.py [--samples 100000] [--units 256] [--match-units 128] ...
Times are the best of ``--repeat`` runs (wall clock).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Callable

import numpy as np

from repdissect.stages.compare import (
    JointMoments,
    bottleneck_matching,
    hungarian_matching,
    lasso_gram,
    matched_counts,
    semi_matching,
    svcca_arrays,
    svcca_from_covariance,
)


def _best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _activations(samples: int, ca: int, cb: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two ReLU layers driven by shared latent factors plus private noise, float32 like real activations."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((samples, 32)).astype(np.float32)
    a = latent @ rng.standard_normal((32, ca)).astype(np.float32)
    a += rng.standard_normal((samples, ca)).astype(np.float32)
    b = latent @ rng.standard_normal((32, cb)).astype(np.float32)
    b += rng.standard_normal((samples, cb)).astype(np.float32)
    return np.maximum(a, 0), np.maximum(b, 0)


def _accumulate(a: np.ndarray, b: np.ndarray, batch: int) -> JointMoments:
    moments = JointMoments(a.shape[1], b.shape[1])
    for start in range(0, a.shape[0], batch):
        moments.update(a[start : start + batch], b[start : start + batch])
    return moments


def bench_svcca(args: argparse.Namespace) -> None:
    a, b = _activations(args.samples, args.units, args.units)
    print(f"\n[1] SVCCA, {args.samples} samples × {args.units}+{args.units} units (batch {args.batch})")
    # The slow baseline runs once; its peak memory is traced in that same run.
    if args.memory:
        tracemalloc.start()
    t_base, reference = _best_time(lambda: svcca_arrays(a, b), 1)
    peak_base = tracemalloc.get_traced_memory()[1] if args.memory else 0
    tracemalloc.stop()
    t_acc, moments = _best_time(lambda: _accumulate(a, b, args.batch), args.repeat)

    def from_moments():
        return svcca_from_covariance(moments.cov_aa(), moments.cov_bb(), moments.cov_ab())

    t_ours, ours = _best_time(from_moments, args.repeat)
    assert (ours.dims_a, ours.dims_b) == (reference.dims_a, reference.dims_b)
    error = float(np.abs(ours.corrs - reference.corrs).max())
    dims = f"{reference.dims_a}/{reference.dims_b}"
    print(f"  in-memory numpy SVCCA        {t_base:8.3f} s   mean ρ {reference.mean:.6f}  dims {dims}")
    print(f"  ours, from moments           {t_ours:8.3f} s   max |Δρ| {error:.1e}")
    print(f"  ours, accumulate + SVCCA     {t_acc + t_ours:8.3f} s   (accumulation {t_acc:.3f} s)")
    print(f"  ratio (from moments)         {t_base / t_ours:8.1f}×")
    print(f"  ratio (end to end)           {t_base / (t_acc + t_ours):8.1f}×")
    if args.memory:
        data = a.nbytes + b.nbytes
        peak_acc = _peak_bytes(lambda: _accumulate(a, b, args.batch))
        peak_ours = _peak_bytes(from_moments)
        state = moments.comoment.nbytes + moments.mean.nbytes
        print(
            f"  peak traced memory: baseline {peak_base / 2**20:.1f} MiB "
            f"(input arrays themselves {data / 2**20:.1f} MiB)"
        )
        print(
            f"                      ours: accumulate {peak_acc / 2**20:.1f} MiB, SVCCA {peak_ours / 2**20:.1f} MiB, "
            f"state {state / 2**20:.1f} MiB (depends on batch and units, not on n)"
        )


def bench_matching(args: argparse.Namespace) -> None:
    import networkx as nx
    from scipy.optimize import linear_sum_assignment

    units = args.match_units
    a, b = _activations(max(4 * units, 2000), units, units, seed=1)
    moments = _accumulate(a, b, args.batch)
    corr = moments.correlation()[:units, units:]
    print(f"\n[2] matching, {units} × {units} units")

    def networkx_matching():
        graph = nx.Graph()
        graph.add_weighted_edges_from(
            (("a", i), ("b", j), float(corr[i, j])) for i in range(units) for j in range(units)
        )
        return nx.max_weight_matching(graph, maxcardinality=True)

    def scipy_assignment():
        return linear_sum_assignment(corr, maximize=True)

    def full_suite():
        semi_matching(corr), semi_matching(corr.T), hungarian_matching(corr), bottleneck_matching(corr)
        return matched_counts(corr, np.linspace(0.1, 0.9, 9))

    t_nx, nx_result = _best_time(networkx_matching, 1)
    t_lsa, (rows, cols) = _best_time(scipy_assignment, args.repeat)
    t_suite, _ = _best_time(full_suite, args.repeat)
    nx_total = sum(corr[u[1], v[1]] if u[0] == "a" else corr[v[1], u[1]] for u, v in nx_result)
    ours_total = float(corr[rows, cols].sum())
    print(f"  networkx.max_weight_matching {t_nx:8.3f} s   total corr {nx_total:.9f}")
    print(f"  linear_sum_assignment        {t_lsa:8.4f} s   total corr {ours_total:.9f}")
    print(f"  full matching suite          {t_suite:8.4f} s   (semi ×2, Hungarian, bottleneck, HK × 9 thresholds)")
    print(f"  ratio (assignment)           {t_nx / t_lsa:8.0f}×")
    print(f"  ratio (full suite)           {t_nx / t_suite:8.0f}×")


def bench_lasso(args: argparse.Namespace) -> None:
    from sklearn.linear_model import Lasso

    units, samples = args.units, args.lasso_samples
    alphas = sorted(args.alphas, reverse=True)
    a, b = _activations(samples, units, units, seed=2)
    print(f"\n[3] lasso path α={alphas}, {units} targets × {units} inputs, {samples} samples, tol {args.tol:g}")
    moments = _accumulate(a, b, args.batch)
    std = np.sqrt(moments.variance(ddof=0))
    corr = moments.covariance(ddof=0) / np.outer(std, std)
    gram, xty = corr[units:, units:], corr[units:, :units]

    def ours():
        coef, out = None, []
        for alpha in alphas:
            coef = lasso_gram(gram, xty, alpha, coef_init=coef, tol=args.tol, max_sweeps=100000).coef
            out.append(coef)
        return out

    xs = (b - b.mean(axis=0)) / b.std(axis=0)
    ys = (a - a.mean(axis=0)) / a.std(axis=0)

    def sklearn_path(precompute: bool):
        model = Lasso(alpha=alphas[0], tol=args.tol, max_iter=100000, warm_start=True, precompute=precompute)
        out = []
        for alpha in alphas:
            model.set_params(alpha=alpha)
            model.fit(xs, ys)
            out.append(model.coef_.T.copy())
        return out

    t_ours, coefs = _best_time(ours, args.repeat)
    t_acc, _ = _best_time(lambda: _accumulate(a, b, args.batch), 1)
    t_sk, sk_coefs = _best_time(lambda: sklearn_path(False), 1)
    t_skg, skg_coefs = _best_time(lambda: sklearn_path(True), 1)
    diff = max(float(np.abs(c - s).max()) for c, s in zip(coefs, sk_coefs))
    diff_g = max(float(np.abs(c - s).max()) for c, s in zip(coefs, skg_coefs))
    print(f"  scikit-learn Lasso           {t_sk:8.3f} s   max |Δw| vs ours {diff:.1e}")
    print(f"  scikit-learn Lasso (Gram)    {t_skg:8.3f} s   max |Δw| vs ours {diff_g:.1e}")
    print(f"  ours, from moments           {t_ours:8.3f} s   (+{t_acc:.3f} s to accumulate the moments)")
    print(f"  ratio vs sklearn             {t_sk / t_ours:8.1f}×   (end to end {t_sk / (t_ours + t_acc):.1f}×)")
    print(f"  ratio vs sklearn (Gram)      {t_skg / t_ours:8.1f}×   (end to end {t_skg / (t_ours + t_acc):.1f}×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples for the SVCCA race")
    parser.add_argument("--units", type=int, default=256, help="channels per net (SVCCA and lasso)")
    parser.add_argument("--match-units", type=int, default=128, help="units per side for the matching race")
    parser.add_argument("--lasso-samples", type=int, default=5_000, help="samples for the lasso race")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.03, 0.01])
    parser.add_argument("--tol", type=float, default=1e-6, help="duality-gap tolerance of both lasso solvers")
    parser.add_argument("--batch", type=int, default=8192, help="samples per moment update")
    parser.add_argument("--repeat", type=int, default=3, help="best-of repeats for the fast timings")
    parser.add_argument("--skip", nargs="*", default=[], choices=["svcca", "matching", "lasso"])
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="trace peak memory")
    args = parser.parse_args()
    for name, bench in (("svcca", bench_svcca), ("matching", bench_matching), ("lasso", bench_lasso)):
        if name not in args.skip:
            bench(args)


if __name__ == "__main__":
    main()
