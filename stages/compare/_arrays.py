"""In-memory reference implementations of the comparison metrics on (samples × units) arrays.

These hold all samples, so they are not what the pipeline runs; they are the independent second implementation
that the moment-based functions are tested against, and the "straightforward numpy" baselines of the benchmark.
They work on the centred data matrices directly (thin SVDs, n × n Gram matrices) instead of covariances:

* :func:`cca_arrays` — Björck & Golub (1973): orthonormal bases of the centred column spaces, then the singular
  values of Q_aᵀ Q_b.
* :func:`svcca_arrays` — Raghu et al. 2017: thin SVD of each centred side, keep the leading directions (same rule
  and conventions as :func:`svcca_dims`), then CCA.
* :func:`pwcca_arrays` — Morcos et al. 2018 with explicit canonical variates h_i = Q U_i and α_i = Σ_j |⟨h_i, x_j⟩|.
* :func:`linear_cka_gram` — Kornblith et al. 2019 in the n × n Gram form tr(KHLH)/√(tr(KHKH)·tr(LHLH)).
* :func:`correlation_arrays` — Pearson correlation between the columns of two arrays, dead columns 0.

Rank: singular values s ≤ √eps · s_max are dropped, the same floor as the covariance eigenvalue floor eps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._errors import StageInputError
from ._cca import CanonicalCorrelations, PWCCAResult, svcca_dims
from ._correlation import dead_units
from ._lapack import svd

__all__ = ["correlation_arrays", "cca_arrays", "svcca_arrays", "pwcca_arrays", "linear_cka_arrays", "linear_cka_gram"]


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise StageInputError(f"activations must be 2-D (samples, units); got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise StageInputError(
            f"a has {a.shape[0]} samples (rows) but b has {b.shape[0]}; rows must be the same samples"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StageInputError("activations contain NaN or inf; drop or fix those samples")
    return a, b


def _basis(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of the centred data, keeping singular values above √eps · s_max: (U (n, k), s (k,), V (C, k))."""
    centred = x - x.mean(axis=0)
    u, s, vt = svd(centred, full_matrices=False)
    if s.size == 0 or s[0] <= 0:
        return u[:, :0], s[:0], vt[:0].T
    k = int((s > np.sqrt(eps) * s[0]).sum())
    return u[:, :k], s[:k], vt[:k].T


def _cca_of_bases(qa: np.ndarray, qb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = min(qa.shape[1], qb.shape[1])
    if k == 0:
        return np.zeros(0), np.zeros((qa.shape[1], 0)), np.zeros((qb.shape[1], 0))
    u, s, vt = svd(qa.T @ qb, full_matrices=False)
    return np.clip(s[:k], 0.0, 1.0), u[:, :k], vt[:k].T


def correlation_arrays(a: np.ndarray, b: np.ndarray, dead_tol: float = 1e-10) -> np.ndarray:
    """(Ca, Cb) Pearson correlations between the columns of a (n, Ca) and b (n, Cb); dead columns give 0."""
    a, b = _check_pair(a, b)
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    a0, b0 = a - ca, b - cb
    va, vb = (a0**2).mean(axis=0), (b0**2).mean(axis=0)
    inv_a = np.where(dead_units(va, ca, dead_tol), 0.0, 1.0 / np.sqrt(np.where(va > 0, va, 1.0)))
    inv_b = np.where(dead_units(vb, cb, dead_tol), 0.0, 1.0 / np.sqrt(np.where(vb > 0, vb, 1.0)))
    return np.clip((a0.T @ b0) / a.shape[0] * inv_a[:, None] * inv_b[None, :], -1.0, 1.0)


def cca_arrays(a: np.ndarray, b: np.ndarray, *, eps: float = 1e-10) -> CanonicalCorrelations:
    """Canonical correlations of a (n, Ca) and b (n, Cb) from the samples (Björck–Golub)."""
    a, b = _check_pair(a, b)
    qa, _, _ = _basis(a, eps)
    qb, _, _ = _basis(b, eps)
    corrs, _, _ = _cca_of_bases(qa, qb)
    return CanonicalCorrelations(corrs, qa.shape[1], qb.shape[1])


def svcca_arrays(
    a: np.ndarray,
    b: np.ndarray,
    *,
    keep: float = 0.99,
    convention: Literal["singular_values", "variance"] = "singular_values",
    eps: float = 1e-10,
) -> CanonicalCorrelations:
    """SVCCA (Raghu et al. 2017) of a (n, Ca) and b (n, Cb) from the samples: thin SVD per side, then CCA."""
    a, b = _check_pair(a, b)
    qa, sa, _ = _basis(a, eps)
    qb, sb, _ = _basis(b, eps)
    ma = svcca_dims(sa**2, keep, convention)
    mb = svcca_dims(sb**2, keep, convention)
    corrs, _, _ = _cca_of_bases(qa[:, :ma], qb[:, :mb])
    return CanonicalCorrelations(corrs, ma, mb)


def pwcca_arrays(a: np.ndarray, b: np.ndarray, *, eps: float = 1e-10) -> PWCCAResult:
    """PWCCA (Morcos et al. 2018) of a (n, Ca) and b (n, Cb) with explicit canonical variates."""
    a, b = _check_pair(a, b)
    qa, _, _ = _basis(a, eps)
    qb, _, _ = _basis(b, eps)
    corrs, ua, ub = _cca_of_bases(qa, qb)
    side = "a" if qa.shape[1] <= qb.shape[1] else "b"
    variates = qa @ ua if side == "a" else qb @ ub  # (n, k), orthonormal columns
    centred = (a - a.mean(axis=0)) if side == "a" else (b - b.mean(axis=0))
    alpha = np.abs(variates.T @ centred).sum(axis=1)
    total = alpha.sum()
    weights = alpha / total if total > 0 else np.zeros_like(alpha)
    return PWCCAResult(float(weights @ corrs), corrs, weights, side)


def linear_cka_arrays(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of a (n, Ca) and b (n, Cb), feature-space form ‖a_cᵀ b_c‖²_F / (‖a_cᵀ a_c‖_F ‖b_cᵀ b_c‖_F)."""
    a, b = _check_pair(a, b)
    a0, b0 = a - a.mean(axis=0), b - b.mean(axis=0)
    norm_a, norm_b = np.linalg.norm(a0.T @ a0), np.linalg.norm(b0.T @ b0)
    if norm_a <= 0 or norm_b <= 0:
        return 0.0
    return float(np.linalg.norm(a0.T @ b0) ** 2 / (norm_a * norm_b))


def linear_cka_gram(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA in the Gram form tr(KHLH)/√(tr(KHKH)·tr(LHLH)), K = aaᵀ, L = bbᵀ, H = I − 11ᵀ/n. O(n²) memory."""
    a, b = _check_pair(a, b)
    n = a.shape[0]
    centring = np.eye(n) - np.full((n, n), 1.0 / n)
    k = centring @ (a @ a.T) @ centring
    l = centring @ (b @ b.T) @ centring
    hsic_kl, hsic_kk, hsic_ll = np.sum(k * l), np.sum(k * k), np.sum(l * l)
    if hsic_kk <= 0 or hsic_ll <= 0:
        return 0.0
    return float(hsic_kl / np.sqrt(hsic_kk * hsic_ll))
