"""Uncertainty for every registered metric: leave-one-group-out jackknife and a permutation null.

* **Jackknife** (delete-a-group, weighted for unequal group sizes; Busing, Meijer & van der Leeden 1999): with
  full-data estimate θ̂, replicates θ̂_(g) computed from total − group g (no second pass), h_g = n/n_g,
  pseudo-values θ̃_g = h_g θ̂ − (h_g − 1) θ̂_(g), θ̂_J = Gθ̂ − Σ_g (1 − n_g/n) θ̂_(g) and
  Var_J = (1/G) Σ_g (θ̃_g − θ̂_J)² / (h_g − 1); the interval is θ̂ ± t_{G−1, (1+c)/2} · √Var_J. For equal groups
  this is the textbook ((G−1)/G) Σ (θ̂_(g) − θ̄)². It suits smooth statistics (CKA, Procrustes, CCA family, FD).
* **Permutation null** (stimulus shuffling): on the fixed per-sample subset, the rows of net B are permuted B
  times while net A is kept, the metric recomputed, and p = (1 + #{null at least as similar as observed})/(B + 1)
  (one-sided toward "more similar"; the observed value is the subset's, so both sides use the same n). For RSA
  permuting rows permutes the RDM's rows and columns together (the Mantel test).

:func:`similarity_table` applies both to every (layer_a, layer_b) pair and every selected metric.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .._errors import StageInputError
from ._beyond import rdm_correlation, rsa_arrays
from ._grouped import GroupedMoments, MomentState, _centre, group_of
from ._registry import Metric, resolve_metrics

__all__ = ["jackknife", "JackknifeResult", "permutation_pvalue", "permuted_states", "similarity_table"]


class JackknifeResult(tuple):
    """``(se, bias_corrected, ci_low, ci_high)``."""

    __slots__ = ()

    def __new__(cls, se: float, bias_corrected: float, ci_low: float, ci_high: float) -> "JackknifeResult":
        return super().__new__(cls, (se, bias_corrected, ci_low, ci_high))

    se = property(lambda self: self[0])
    bias_corrected = property(lambda self: self[1])
    ci_low = property(lambda self: self[2])
    ci_high = property(lambda self: self[3])


def jackknife(estimate: float, replicates: np.ndarray, sizes: np.ndarray, confidence: float = 0.95) -> JackknifeResult:
    """Weighted delete-a-group jackknife of one statistic.

    Args:
        estimate: θ̂ on all data.
        replicates: (G,) θ̂_(g), the statistic without group g.
        sizes: (G,) samples per group n_g (> 0).
        confidence: two-sided level of the t interval.

    Returns:
        :class:`JackknifeResult`; all NaN when θ̂ or a replicate is NaN or G < 2.
    """
    reps = np.asarray(replicates, np.float64)
    sizes = np.asarray(sizes, np.float64)
    groups = reps.size
    if groups < 2 or not np.isfinite(estimate) or not np.isfinite(reps).all() or (sizes <= 0).any():
        return JackknifeResult(*([float("nan")] * 4))
    n = sizes.sum()
    h = n / sizes
    pseudo = h * estimate - (h - 1.0) * reps
    theta_j = groups * estimate - ((1.0 - sizes / n) * reps).sum()
    var = float(((pseudo - theta_j) ** 2 / (h - 1.0)).sum() / groups)
    se = float(np.sqrt(max(var, 0.0)))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, groups - 1)) * se
    return JackknifeResult(se, float(theta_j), float(estimate - half), float(estimate + half))


def permutation_pvalue(observed: float, null: np.ndarray, kind: str = "similarity") -> float:
    """(1 + #{null at least as similar as observed})/(B + 1); distances count null ≤ observed."""
    null = np.asarray(null, np.float64)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    hits = (null >= observed).sum() if kind == "similarity" else (null <= observed).sum()
    return float((1 + hits) / (null.size + 1))


def permuted_states(x: np.ndarray, y: np.ndarray, perms: np.ndarray) -> MomentState:
    """Moment states of (x, y[perm]) for each row of ``perms`` (B, k): blocks named ``"x"`` and ``"y"``.

    Only the cross terms change under a permutation, so within-side sums are computed once.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, p, q = x.shape[0], x.shape[1], y.shape[1]
    reps = perms.shape[0]
    count = np.full(reps, k, np.int64)
    sums = np.broadcast_to(np.r_[x.sum(0), y.sum(0)], (reps, p + q)).copy()
    cross = np.empty((reps, p + q, p + q))
    cross[:, :p, :p] = x.T @ x
    cross[:, p:, p:] = y.T @ y
    ax, ay = (x * x).sum(1), (y * y).sum(1)
    sq = np.empty((reps, 2, 2))
    sq[:, 0, 0], sq[:, 1, 1] = ax @ ax, ay @ ay
    sqx = np.empty((reps, 2, p + q))
    sqx[:, 0, :p], sqx[:, 1, p:] = ax @ x, ay @ y
    for r, perm in enumerate(perms):
        yp, ayp = y[perm], ay[perm]
        cross[r, :p, p:] = x.T @ yp
        cross[r, p:, :p] = cross[r, :p, p:].T
        sq[r, 0, 1] = sq[r, 1, 0] = ax @ ayp
        sqx[r, 0, p:] = ax @ yp
        sqx[r, 1, :p] = ayp @ x
    return _centre(count, sums, cross, sq, sqx, {"x": slice(0, p), "y": slice(p, p + q)})


def _rows_state(x: np.ndarray, y: np.ndarray) -> MomentState:
    return permuted_states(x, y, np.arange(x.shape[0])[None])


def _rsa_null(x: np.ndarray, y: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Mantel null of RSA: Spearman of rank vectors with B's RDM rows/columns permuted together."""
    k = x.shape[0]
    i, j = np.triu_indices(k, k=1)
    rx = stats.rankdata(rdm_correlation(x))
    ry_full = np.zeros((k, k))
    ry_full[i, j] = stats.rankdata(rdm_correlation(y))
    ry_full = ry_full + ry_full.T
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    out = np.empty(perms.shape[0])
    for r, perm in enumerate(perms):
        ry = ry_full[perm[i], perm[j]]
        ry = ry - ry.mean()
        out[r] = rx @ ry / np.linalg.norm(ry)
    return out


def _rdm_matrix(x: np.ndarray) -> np.ndarray:
    """(k, k) correlation-distance RDM (the full matrix of :func:`rdm_correlation`'s upper triangle)."""
    k = x.shape[0]
    full = np.zeros((k, k))
    i, j = np.triu_indices(k, k=1)
    full[i, j] = rdm_correlation(x)
    return full + full.T


def _spearman_upper(dx: np.ndarray, dy: np.ndarray, keep: np.ndarray) -> float:
    """Spearman ρ of the upper triangles of two RDMs restricted to rows/columns ``keep`` (NaN when constant)."""
    idx = np.flatnonzero(keep)
    i, j = np.triu_indices(idx.size, k=1)
    rx, ry = stats.rankdata(dx[idx[i], idx[j]]), stats.rankdata(dy[idx[i], idx[j]])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.linalg.norm(rx) * np.linalg.norm(ry)
    return float(rx @ ry / den) if den > 0 else float("nan")


def _rsa_jackknife(x: np.ndarray, y: np.ndarray, groups: np.ndarray, present: Sequence[int]) -> tuple[float, np.ndarray]:
    """RSA on all subset rows and without each present group, from the two RDMs computed once (a group's
    replicate is the RDMs with its rows and columns removed: the same value as recomputing from its rows)."""
    dx, dy = _rdm_matrix(x), _rdm_matrix(y)
    everyone = np.ones(x.shape[0], bool)
    return _spearman_upper(dx, dy, everyone), np.array([_spearman_upper(dx, dy, groups != g) for g in present])


def similarity_table(
    moments: GroupedMoments,
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str] | None = None,
    *,
    subset: Mapping[str, np.ndarray] | None = None,
    subset_ids: np.ndarray | None = None,
    permutations: int = 99,
    seed: int = 0,
    confidence: float = 0.95,
    group_seed: int = 0,
) -> pd.DataFrame:
    """Value, jackknife s.e./CI and permutation null of every selected metric for every block pair.

    Args:
        moments: the per-group sums of all blocks named in ``pairs``.
        pairs: (block_a, block_b) pairs, e.g. every (A layer, B layer).
        metrics: registry names (default all); ``rsa`` needs ``subset``.
        subset: ``{block: (k, channels) rows}`` of the fixed per-sample subset (same k rows for all blocks).
        subset_ids: (k,) sample ids of the subset rows (for RSA's jackknife groups; default 0 … k − 1).
        permutations: B permutations for the null (0: no null; needs ``subset``).
        seed: seed of the permutations (the same permutations for every pair and metric).
        confidence: level of the jackknife interval.
        group_seed: seed of the id → group hash (RSA's jackknife over the subset).

    Returns:
        DataFrame, one row per (block_a, block_b, metric): ``layer_a, layer_b, metric, metric_kind, value, se, ci_low,
        ci_high, jackknife_value, null_mean, null_q95, p_value, n, n_subset, groups`` (null columns NaN without a
        subset; ``null_q95`` is the null's 95th percentile toward "similar").
    """
    try:  # the replicates are many small matrices: BLAS threads only add contention
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return _similarity_table(moments, pairs, metrics, subset, subset_ids, permutations, seed, confidence,
                                 group_seed)
    with threadpool_limits(limits=1):
        return _similarity_table(moments, pairs, metrics, subset, subset_ids, permutations, seed, confidence,
                                 group_seed)


def _similarity_table(
    moments: GroupedMoments,
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str] | None,
    subset: Mapping[str, np.ndarray] | None,
    subset_ids: np.ndarray | None,
    permutations: int,
    seed: int,
    confidence: float,
    group_seed: int,
) -> pd.DataFrame:
    chosen: list[Metric] = resolve_metrics(metrics)
    if permutations < 0:
        raise StageInputError(f"permutations must be ≥ 0; got {permutations}")
    if any(m.rows is not None for m in chosen) and subset is None:
        raise StageInputError("metric 'rsa' needs the per-sample subset (subset=…); drop it or provide the subset")
    states = moments.states(jackknife=True)
    sizes = moments.group_sizes()
    sizes = sizes[sizes > 0]
    k = 0 if subset is None else next(iter(subset.values())).shape[0]
    perms = None
    if subset is not None and permutations > 0 and k >= 4:
        rng = np.random.default_rng(seed)
        perms = np.stack([rng.permutation(k) for _ in range(permutations)])
    sub_groups = None
    if subset is not None and k:
        ids = np.arange(k) if subset_ids is None else np.asarray(subset_ids)
        sub_groups = group_of(ids, moments.groups, group_seed)
    rows = []
    for a, b in pairs:
        sub_obs: dict[str, float] = {}
        null: dict[str, np.ndarray] = {}
        if perms is not None:
            x, y = subset[a], subset[b]  # type: ignore[index]
            observed_state = _rows_state(x, y)
            moment_metrics = [m for m in chosen if m.moments is not None]
            chunks = []
            for start in range(0, perms.shape[0], 32):
                chunks.append(permuted_states(x, y, perms[start : start + 32]))
            for m in moment_metrics:
                sub_obs[m.name] = float(m.moments(observed_state, "x", "y")[0])
                null[m.name] = np.concatenate([m.moments(c, "x", "y") for c in chunks])
            if any(m.rows is not None for m in chosen):
                sub_obs["rsa"] = _rsa_null(x, y, np.arange(k)[None])[0]
                null["rsa"] = _rsa_null(x, y, perms)
        for m in chosen:
            if m.moments is not None:
                values = m.moments(states, a, b)
                estimate, reps, group_n = float(values[0]), values[1:], sizes
                n = int(states.n[0])
            else:
                x, y = subset[a], subset[b]  # type: ignore[index]
                assert sub_groups is not None
                present = [g for g in range(moments.groups) if (sub_groups == g).any()]
                if m.rows is rsa_arrays and k >= 4:  # the RDMs once, each replicate drops its group's rows
                    estimate, reps = _rsa_jackknife(x, y, sub_groups, present)
                else:
                    estimate = float(m.rows(x, y))
                    reps = np.array([m.rows(x[sub_groups != g], y[sub_groups != g]) for g in present])
                group_n = np.array([(sub_groups == g).sum() for g in present])
                n = k
            jk = jackknife(estimate, reps, group_n, confidence)
            nul = null.get(m.name)
            sign = m.similarity_sign()
            rows.append(
                {
                    "layer_a": a,
                    "layer_b": b,
                    "metric": m.name,
                    "metric_kind": m.kind,
                    "value": estimate,
                    "se": jk.se,
                    "ci_low": jk.ci_low,
                    "ci_high": jk.ci_high,
                    "jackknife_value": jk.bias_corrected,
                    "null_mean": float(np.nanmean(nul)) if nul is not None and np.isfinite(nul).any() else np.nan,
                    "null_q95": float(sign * np.nanquantile(sign * nul, 0.95))
                    if nul is not None and np.isfinite(nul).any() else np.nan,
                    "p_value": permutation_pvalue(sub_obs[m.name], nul, m.kind) if nul is not None else np.nan,
                    "n": n,
                    "n_subset": k,
                    "groups": int(group_n.size),
                }
            )
    return pd.DataFrame(rows)
