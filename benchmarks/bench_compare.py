"""Benchmark of the comparison math (stages/compare) against what users of the reference tools run, with ratios.

Three races, each timing ours and the baseline interleaved in the same run (median of ``--repeat``) on the same
synthetic ReLU activations:

1. **SVCCA, end to end** (the headline): accumulating the streamed moments batch by batch and computing SVCCA
   from them, vs google/svcca's tutorial recipe — centre each neuron, thin SVD, keep the leading singular
   directions (99 % of the singular-value mass, the paper's rule), then ``cca_core.get_cca_similarity``'s steps
   (``np.cov``, rescaling, ``remove_small``, ε·I + ``pinv`` + ``eigh`` inverse square roots, SVD), written
   here from its published description. Secondary lines: SVCCA from already accumulated moments (what the
   pipeline pays per metric, since the moments are shared) and a plain in-memory numpy SVCCA.
2. **One-to-one matching**: ours *is* ``scipy.optimize.linear_sum_assignment`` (plus semi-matching, bottleneck
   and Hopcroft–Karp counts); against ``networkx.max_weight_matching(maxcardinality=True)`` on the complete
   bipartite graph (what Li et al.'s code runs) the speed-up is scipy's, and is labelled so.
3. **Lasso** (Li et al.'s sparse regression, all targets): blocked coordinate descent on the moments vs
   scikit-learn's ``Lasso(precompute=True)`` (its fastest setting for n ≫ features) on the standardised samples,
   at one α and along a warm-started path of ``--path-alphas`` values; ``precompute=False`` as a secondary line.
   Coefficients must agree.

The SVCCA race also prints ours with the opt-in float32 products (``JointMoments(..., "float32")``) and both
against the floor: one bare Gram product of the concatenated activations (``--threads 1`` for one BLAS
thread, ``--clock cpu`` for process CPU time on a shared machine).

Usage: python benchmarks/bench_compare.py [--samples 100000] [--units 256] [--repeat 3] [--skip lasso] ...
"""

from __future__ import annotations

import argparse
import tracemalloc
from typing import Callable

import numpy as np

from _timing import interleaved
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


def _accumulate(a: np.ndarray, b: np.ndarray, batch: int, precision: str = "float64") -> JointMoments:
    moments = JointMoments(a.shape[1], b.shape[1], precision)
    for start in range(0, a.shape[0], batch):
        moments.update(a[start : start + batch], b[start : start + batch])
    return moments


def _keep_by_mass(s: np.ndarray, keep: float) -> int:
    """Smallest k whose leading singular values hold ``keep`` of their sum (Raghu et al., Appendix A)."""
    return int(np.searchsorted(np.cumsum(s) / s.sum(), keep - 1e-12) + 1)


def tutorial_svcca(acts1: np.ndarray, acts2: np.ndarray, keep: float = 0.99, epsilon: float = 1e-10) -> np.ndarray:
    """google/svcca tutorial 001's SVCCA on (neurons × datapoints) arrays: returns the canonical correlations."""
    reduced = []
    for acts in (acts1, acts2):
        centred = acts - acts.mean(axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        k = _keep_by_mass(s, keep)
        reduced.append(s[:k, None] * vt[:k])
    x, y = reduced
    nx = x.shape[0]
    sigma = np.cov(x, y)
    sxx, sxy, syy = sigma[:nx, :nx], sigma[:nx, nx:], sigma[nx:, nx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    kx, ky = np.diag(sxx) >= epsilon, np.diag(syy) >= epsilon
    sxx, syy, sxy = sxx[np.ix_(kx, kx)], syy[np.ix_(ky, ky)], sxy[np.ix_(kx, ky)]

    def inv_sqrt(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(np.linalg.pinv(m + epsilon * np.eye(len(m))))
        return (v * np.sqrt(w)) @ v.T

    return np.abs(np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False))


def _threads(count: int | None):
    """A BLAS thread limit for the race (``None``: the library's default)."""
    import contextlib

    if count is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=count)


def bench_svcca(args: argparse.Namespace) -> None:
    import os
    import time

    a, b = _activations(args.samples, args.units, args.units)
    a, b = a.astype(args.dtype), b.astype(args.dtype)
    if args.dtype == "float16":  # as in a pipeline run, torch is loaded: the moments convert float16 through it
        import torch

        torch.set_num_threads(args.threads or 1)
    if args.tutorial or args.memory:  # google's layout, (neurons × datapoints) float64: 0.8 GB at the default size
        at, bt = np.ascontiguousarray(a.T, dtype=np.float64), np.ascontiguousarray(b.T, dtype=np.float64)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"\n[1] SVCCA, {args.samples} samples × {args.units}+{args.units} units, {args.dtype} activations "
          f"(batch {args.batch}), BLAS threads: {args.threads or 'default'}, {args.clock} time, median of "
          f"{args.repeat} interleaved; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    moments = _accumulate(a, b, args.batch)

    def end_to_end(precision: str):
        m = _accumulate(a, b, args.batch, precision)
        return svcca_from_covariance(m.cov_aa(), m.cov_bb(), m.cov_ab())

    def from_moments():
        return svcca_from_covariance(moments.cov_aa(), moments.cov_bb(), moments.cov_ab())

    # The floor a user would compare with: one Gram product of the concatenated activations in float32 (numpy
    # runs XᵀX as a symmetric rank-k update, ssyrk); the statistic is float64, so also the float64 product.
    both = np.concatenate([a, b], axis=1).astype(np.float32)
    both64 = both.astype(np.float64)
    # The same samples as NCHW maps of 7 × 7 positions (update_maps: the pipeline's per-position samples)
    images = args.samples // 49
    maps_a, maps_b = (np.ascontiguousarray(x[: images * 49].reshape(images, 7, 7, -1).transpose(0, 3, 1, 2))
                      for x in (a, b))

    def from_maps(precision: str) -> JointMoments:
        m, step = JointMoments(a.shape[1], b.shape[1], precision), max(1, args.batch // 49)
        for start in range(0, images, step):
            m.update_maps(maps_a[start : start + step], maps_b[start : start + step])
        return m

    def svcca_of(m: JointMoments):
        return svcca_from_covariance(m.cov_aa(), m.cov_bb(), m.cov_ab())

    races = {
        "maps32": lambda: from_maps("float32"),
        "maps32_svcca": lambda: svcca_of(from_maps("float32")),
        "ours": lambda: end_to_end("float64"),
        "ours32": lambda: end_to_end("float32"),
        "moments32": lambda: _accumulate(a, b, args.batch, "float32"),
        "moments": from_moments,
        "gram": lambda: both.T @ both,
        "gram64": lambda: both64.T @ both64,
    }
    if args.tutorial:
        races = {"tutorial": lambda: tutorial_svcca(at, bt), "numpy": lambda: svcca_arrays(a, b), **races}
    with _threads(args.threads):
        times, out = interleaved(races, repeat=args.repeat, warmup=False, clock=clock)
    ours, ours32, gram = out["ours"], out["ours32"], times["gram"]
    if args.tutorial:
        tutorial = out["tutorial"]
        print(f"  google/svcca tutorial recipe           {times['tutorial']:8.3f} s   mean ρ {tutorial.mean():.6f} "
              f"({len(tutorial)} dims)")
    print(f"  ours, accumulate moments + SVCCA       {times['ours']:8.3f} s   mean ρ {ours.mean:.10f} "
          f"({ours.dims_a}/{ours.dims_b} dims)")
    print(f"  ours, float32 products (opt-in)        {times['ours32']:8.3f} s   mean ρ {ours32.mean:.10f} "
          f"(relative difference {abs(ours32.mean - ours.mean) / ours.mean:.1e})")
    if args.tutorial:
        print(f"  ratio, end to end (headline)           {times['tutorial'] / times['ours']:8.1f}×")
        print(f"  secondary: in-memory numpy SVCCA       {times['numpy']:8.3f} s")
    print(f"  secondary: ours from accumulated moments {times['moments']:6.3f} s  (the moments are shared by "
          "every metric)")
    print(f"  floor: one bare Gram product XᵀX       {gram:8.3f} s   (float32, ssyrk)")
    print(f"  floor: the same product in float64     {times['gram64']:8.3f} s   ({times['gram64'] / gram:.2f}× the "
          "float32 one)")
    print(f"  ours end to end, float64 products      {times['ours'] / gram:8.2f}× the float32 Gram   "
          f"({times['ours'] / times['gram64']:.2f}× the float64 one)")
    print(f"  ours end to end, float32 products      {times['ours32'] / gram:8.2f}× the float32 Gram   "
          f"(the moments alone {times['moments32'] / gram:.2f}×, SVCCA from them {times['moments'] / gram:.2f}×)")
    print(f"  float32 moments from NCHW maps         {times['maps32'] / gram:8.2f}× the float32 Gram   ({images} "
          "images of 7 × 7, update_maps)")
    print(f"  SVCCA end to end from NCHW maps        {times['maps32_svcca'] / gram:8.2f}× the float32 Gram   (float32 "
          f"products; mean ρ {out['maps32_svcca'].mean:.10f})")
    if args.memory:
        peak_acc = _peak_bytes(lambda: _accumulate(a, b, args.batch))
        peak_tut = _peak_bytes(lambda: tutorial_svcca(at, bt))
        print(f"  peak traced memory: tutorial {peak_tut / 2**20:.1f} MiB (on top of its {at.nbytes * 2 / 2**20:.0f} MiB "
              f"input), ours {peak_acc / 2**20:.1f} MiB (depends on batch and units, not on n)")


def bench_matching(args: argparse.Namespace) -> None:
    import networkx as nx
    from scipy.optimize import linear_sum_assignment

    units = args.match_units
    a, b = _activations(max(4 * units, 2000), units, units, seed=1)
    moments = _accumulate(a, b, args.batch)
    corr = moments.correlation()[:units, units:]
    print(f"\n[2] matching, {units} × {units} units, median of {args.repeat} interleaved")

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

    times, out = interleaved({"networkx": networkx_matching, "scipy": scipy_assignment, "suite": full_suite},
                             repeat=args.repeat, warmup=False)
    rows, cols = out["scipy"]
    nx_total = sum(corr[u[1], v[1]] if u[0] == "a" else corr[v[1], u[1]] for u, v in out["networkx"])
    ours_total = float(corr[rows, cols].sum())
    print(f"  networkx.max_weight_matching           {times['networkx']:8.3f} s   total corr {nx_total:.9f}")
    print(f"  scipy linear_sum_assignment (= ours)   {times['scipy']:8.4f} s   total corr {ours_total:.9f}")
    print(f"  our full matching suite                {times['suite']:8.4f} s   "
          "(semi ×2, Hungarian, bottleneck, HK × 9 thresholds)")
    print(f"  ratio, one-to-one matching             {times['networkx'] / times['scipy']:8.0f}×   (scipy's speed: "
          "our Hungarian matching is its linear_sum_assignment)")
    print(f"  ratio, full suite vs networkx          {times['networkx'] / times['suite']:8.0f}×")


def bench_lasso(args: argparse.Namespace) -> None:
    from sklearn.linear_model import Lasso

    units, samples = args.units, args.lasso_samples
    a, b = _activations(samples, units, units, seed=2)
    moments = _accumulate(a, b, args.batch)
    std = np.sqrt(moments.variance(ddof=0))
    corr = moments.covariance(ddof=0) / np.outer(std, std)
    gram, xty = corr[units:, units:], corr[units:, :units]
    xs = (b - b.mean(axis=0)) / b.std(axis=0)
    ys = (a - a.mean(axis=0)) / a.std(axis=0)

    def ours(alphas):
        coef, out = None, []
        for alpha in alphas:
            coef = lasso_gram(gram, xty, alpha, coef_init=coef, tol=args.tol, max_sweeps=100000).coef
            out.append(coef)
        return out

    def sklearn_path(alphas, precompute: bool):
        model = Lasso(alpha=alphas[0], tol=args.tol, max_iter=100000, warm_start=True, precompute=precompute)
        out = []
        for alpha in alphas:
            model.set_params(alpha=alpha)
            model.fit(xs, ys)
            out.append(model.coef_.T.copy())
        return out

    path = list(np.geomspace(args.path_max, args.path_min, args.path_alphas))
    for label, alphas in ((f"one α = {args.alpha:g}", [args.alpha]), (f"{len(path)}-α path", path)):
        print(f"\n[3] lasso, {label}: {units} targets × {units} inputs, {samples} samples, tol {args.tol:g}, "
              f"median of {args.repeat} interleaved")
        times, out = interleaved({
            "gram": lambda: sklearn_path(alphas, True),
            "ours": lambda: ours(alphas),
            "ours_e2e": lambda: (_accumulate(a, b, args.batch), ours(alphas))[1],
            "plain": lambda: sklearn_path(alphas, False),
        }, repeat=args.repeat, warmup=False)
        diff = max(float(np.abs(c - s).max()) for c, s in zip(out["ours"], out["gram"]))
        print(f"  scikit-learn Lasso(precompute=True)    {times['gram']:8.3f} s   max |Δw| vs ours {diff:.1e}")
        print(f"  ours, accumulate moments + lasso       {times['ours_e2e']:8.3f} s   (from moments {times['ours']:.3f} s)")
        print(f"  ratio, end to end (headline)           {times['gram'] / times['ours_e2e']:8.1f}×")
        print(f"  secondary: Lasso(precompute=False)     {times['plain']:8.3f} s   "
              f"({times['plain'] / times['ours_e2e']:.1f}× ours end to end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples for the SVCCA race")
    parser.add_argument("--units", type=int, default=256, help="channels per net (SVCCA and lasso)")
    parser.add_argument("--match-units", type=int, default=64, help="units per side for the matching race")
    parser.add_argument("--lasso-samples", type=int, default=5_000, help="samples for the lasso race")
    parser.add_argument("--alpha", type=float, default=0.01, help="the single-α lasso race")
    parser.add_argument("--path-alphas", type=int, default=20, help="α values on the lasso path")
    parser.add_argument("--path-max", type=float, default=0.1)
    parser.add_argument("--path-min", type=float, default=0.001)
    parser.add_argument("--tol", type=float, default=1e-6, help="duality-gap tolerance of both lasso solvers")
    parser.add_argument("--batch", type=int, default=8192, help="samples per moment update")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the median is quoted")
    parser.add_argument("--skip", nargs="*", default=[], choices=["svcca", "matching", "lasso"])
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="trace peak memory")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads for the SVCCA race (threadpoolctl)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="dtype of the activations the SVCCA race streams (the Gram floor is float32)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="time the SVCCA race by wall clock or by process CPU time (steadier on a shared "
                             "machine; equal to wall time for one thread)")
    parser.add_argument("--tutorial", action=argparse.BooleanOptionalAction, default=True,
                        help="include google/svcca's tutorial recipe and the in-memory numpy SVCCA")
    args = parser.parse_args()
    for name, bench in (("svcca", bench_svcca), ("matching", bench_matching), ("lasso", bench_lasso)):
        if name not in args.skip:
            bench(args)


if __name__ == "__main__":
    main()
