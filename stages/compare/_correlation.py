"""Channel correlations from moments, dead-unit flags and the within-net baseline (Li et al. 2016, §2).

The constraint: a ReLU unit that never fires (or any constant channel) has zero variance, and a plain
``cov / (σσᵀ)`` turns it into NaN that then poisons every mean downstream. Here such units are *flagged* and
their correlations are 0, so matchings and summaries can exclude them explicitly.

A unit is dead when its variance is not above ``dead_tol · mean²`` (or is exactly 0): a relative test, because
float64 moments of float32 activations carry rounding-level variance ≈ (1e-7·|mean|)² for a constant channel.
"""

from __future__ import annotations

import numpy as np

from .._errors import StageInputError

__all__ = ["dead_units", "correlation_from_covariance", "within_net_max_correlation"]


def dead_units(variance: np.ndarray, mean: np.ndarray, dead_tol: float = 1e-10) -> np.ndarray:
    """(C,) bool: True where a channel is (numerically) constant.

    Args:
        variance: (C,) channel variances (any ddof).
        mean: (C,) channel means.
        dead_tol: relative tolerance; a channel is dead when ``var ≤ dead_tol · mean²`` or ``var ≤ 0``.
    """
    variance = np.asarray(variance, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    if variance.shape != mean.shape:
        raise StageInputError(f"variance {variance.shape} and mean {mean.shape} must have the same shape")
    return ~(variance > 0) | (variance <= dead_tol * mean**2)


def correlation_from_covariance(cov: np.ndarray, mean: np.ndarray, dead_tol: float = 1e-10) -> np.ndarray:
    """Pearson correlation (C, C) from a covariance; dead channels get 0 everywhere (diagonal included).

    Args:
        cov: (C, C) symmetric covariance.
        mean: (C,) channel means (for the dead-unit test).
        dead_tol: see :func:`dead_units`.

    Returns:
        (C, C) float64, values in [−1, 1], diagonal 1 for live channels and 0 for dead ones.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise StageInputError(f"covariance must be a square matrix; got shape {cov.shape}")
    variance = np.maximum(np.diag(cov), 0.0)
    dead = dead_units(variance, mean, dead_tol)
    inv_std = np.zeros_like(variance)
    inv_std[~dead] = 1.0 / np.sqrt(variance[~dead])
    corr = cov * inv_std[:, None] * inv_std[None, :]
    np.clip(corr, -1.0, 1.0, out=corr)
    np.fill_diagonal(corr, np.where(dead, 0.0, 1.0))
    return corr


def within_net_max_correlation(corr_within: np.ndarray, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's best partner in its own net, excluding itself and dead units: Li et al.'s within-net baseline.

    Args:
        corr_within: (C, C) within-net correlation.
        dead: (C,) dead-unit flags.

    Returns:
        ``(max_corr (C,), partner (C,))``; for dead units, and when no other live unit exists, the value is 0 and
        the partner −1.
    """
    corr = np.array(corr_within, dtype=np.float64, copy=True)
    size = corr.shape[0]
    alive = ~np.asarray(dead, dtype=bool)
    corr[:, ~alive] = -np.inf
    np.fill_diagonal(corr, -np.inf)
    partner = np.full(size, -1, dtype=np.int64)
    best = np.zeros(size, dtype=np.float64)
    if size == 0:
        return best, partner
    arg = np.argmax(corr, axis=1)
    value = corr[np.arange(size), arg]
    ok = alive & np.isfinite(value)
    partner[ok] = arg[ok]
    best[ok] = value[ok]
    return best, partner
