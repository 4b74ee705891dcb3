"""Unit matchings between two nets from their between-net correlation matrix (Li et al. 2016, "Convergent Learning").

The constraint: Li et al.'s released code builds a complete bipartite networkx graph and calls
``max_weight_matching`` — a pure-Python blossom solver taking minutes per 256-unit layer — to get what is simply
the linear assignment maximising total correlation. Here every matching is a compiled scipy call on the
(Ca × Cb) matrix, and dead units (all-zero correlation rows) are excluded up front and reported separately.

* :func:`semi_matching` — each unit takes its most correlated partner, with replacement (row argmax).
* :func:`hungarian_matching` — one-to-one matching maximising Σ corr (``scipy.optimize.linear_sum_assignment``),
  what Li et al.'s ``max_match_order`` computes.
* :func:`matched_counts` — Hopcroft–Karp maximum-cardinality matching
  (``scipy.sparse.csgraph.maximum_bipartite_matching``) on the graph of pairs with corr ≥ t, per threshold.
* :func:`bottleneck_matching` — the largest t at which every unit of the smaller side can still be matched
  (binary search over the distinct correlation values with Hopcroft–Karp), and, among the matchings that use
  only pairs ≥ t, the one with the largest total correlation.

Rectangular matrices are allowed: one-to-one matchings then pair min(Ca, Cb) units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from .._errors import StageInputError

__all__ = ["Matching", "semi_matching", "hungarian_matching", "matched_counts", "bottleneck_matching"]


@dataclass(frozen=True)
class Matching:
    """Matched pairs: ``unit_a[k]`` of net A with ``unit_b[k]`` of net B at correlation ``corr[k]``."""

    unit_a: np.ndarray
    unit_b: np.ndarray
    corr: np.ndarray

    @property
    def mean(self) -> float:
        """Mean correlation of the matched pairs (0.0 when nothing is matched)."""
        return float(self.corr.mean()) if self.corr.size else 0.0

    def __len__(self) -> int:
        return int(self.corr.size)


def _alive_submatrix(
    corr: np.ndarray, alive_a: np.ndarray | None, alive_b: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    corr = np.asarray(corr, dtype=np.float64)
    if corr.ndim != 2:
        raise StageInputError(f"correlation matrix must be 2-D (Ca, Cb); got shape {corr.shape}")
    if not np.isfinite(corr).all():
        raise StageInputError("correlation matrix contains NaN or inf; build it with correlation_from_covariance")
    rows = np.arange(corr.shape[0]) if alive_a is None else np.flatnonzero(np.asarray(alive_a, dtype=bool))
    cols = np.arange(corr.shape[1]) if alive_b is None else np.flatnonzero(np.asarray(alive_b, dtype=bool))
    return corr[np.ix_(rows, cols)], rows, cols


def _empty() -> Matching:
    return Matching(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))


def semi_matching(corr: np.ndarray, alive_a: np.ndarray | None = None, alive_b: np.ndarray | None = None) -> Matching:
    """Semi-matching A → B: each live unit of A takes its most correlated live unit of B (ties: lowest index).

    Args:
        corr: (Ca, Cb) between-net correlations. For B → A pass ``corr.T`` (and swap the masks).
        alive_a: (Ca,) bool, units of A to match (default all).
        alive_b: (Cb,) bool, candidate units of B (default all).

    Returns:
        A :class:`Matching` with one pair per live unit of A (unit_b may repeat).
    """
    sub, rows, cols = _alive_submatrix(corr, alive_a, alive_b)
    if sub.size == 0:
        return _empty()
    best = np.argmax(sub, axis=1)
    return Matching(rows, cols[best], sub[np.arange(len(rows)), best])


def hungarian_matching(
    corr: np.ndarray, alive_a: np.ndarray | None = None, alive_b: np.ndarray | None = None
) -> Matching:
    """One-to-one matching of live units maximising the total correlation (linear assignment).

    Args:
        corr: (Ca, Cb) between-net correlations.
        alive_a, alive_b: live-unit masks (default all).

    Returns:
        min(live Ca, live Cb) pairs, sorted by unit_a.
    """
    sub, rows, cols = _alive_submatrix(corr, alive_a, alive_b)
    if sub.size == 0:
        return _empty()
    r, c = linear_sum_assignment(sub, maximize=True)
    return Matching(rows[r], cols[c], sub[r, c])


def _max_matching_size(edges: np.ndarray) -> int:
    """Size of a maximum matching of the bipartite graph with (rows × cols) boolean adjacency (Hopcroft–Karp)."""
    if edges.size == 0 or not edges.any():
        return 0
    match = maximum_bipartite_matching(csr_matrix(edges), perm_type="column")
    return int((match >= 0).sum())


def matched_counts(
    corr: np.ndarray,
    thresholds: np.ndarray | list[float],
    alive_a: np.ndarray | None = None,
    alive_b: np.ndarray | None = None,
) -> np.ndarray:
    """Maximum number of one-to-one pairs with correlation ≥ t, for each threshold t (Hopcroft–Karp).

    Args:
        corr: (Ca, Cb) between-net correlations.
        thresholds: (T,) thresholds.
        alive_a, alive_b: live-unit masks (default all).

    Returns:
        (T,) int64 matched-pair counts, each ≤ min(live Ca, live Cb).
    """
    sub, _, _ = _alive_submatrix(corr, alive_a, alive_b)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    return np.array([_max_matching_size(sub >= t) for t in thresholds], dtype=np.int64)


def bottleneck_matching(
    corr: np.ndarray, alive_a: np.ndarray | None = None, alive_b: np.ndarray | None = None
) -> tuple[float, Matching]:
    """Bottleneck matching: the largest t such that all live units of the smaller side match with corr ≥ t.

    Args:
        corr: (Ca, Cb) between-net correlations.
        alive_a, alive_b: live-unit masks (default all).

    Returns:
        ``(threshold, matching)``: ``threshold`` = the max over complete matchings of the smallest matched
        correlation; ``matching`` = the complete matching using only pairs ≥ threshold with the largest total
        correlation. ``(0.0, empty)`` when a side has no live unit.
    """
    sub, rows, cols = _alive_submatrix(corr, alive_a, alive_b)
    if sub.size == 0:
        return 0.0, _empty()
    full = min(sub.shape)
    values = np.unique(sub)  # ascending; feasibility is monotone (lower t = more edges)
    lo, hi = 0, len(values) - 1  # values[0] is always feasible: the complete graph
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _max_matching_size(sub >= values[mid]) == full:
            lo = mid
        else:
            hi = mid - 1
    threshold = float(values[lo])
    masked = np.where(sub >= threshold, sub, -np.inf)
    r, c = linear_sum_assignment(masked, maximize=True)
    return threshold, Matching(rows[r], cols[c], sub[r, c])
