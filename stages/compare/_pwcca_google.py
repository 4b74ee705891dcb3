"""PWCCA in google/svcca's convention (``pwcca.compute_pwcca`` at commit 1f3fbf1), computed from moments.

Morcos, Raghu & Bengio 2018 ("Insights on representational similarity in neural networks with canonical
correlation") publish numbers from google/svcca's code, whose weighting differs from the paper's text (the
paper's form is :func:`~repdissect.stages.compare.pwcca_from_covariance`, offered as ``pwcca_morcos``). The
code's recipe, for activations A (p × m) and B (q × m), neurons × samples:

1. Σ = ``np.cov`` of the stacked activations (divisor m − 1); Σ_aa /= max|Σ_aa|, Σ_bb /= max|Σ_bb|,
   Σ_ab /= √(max|Σ_aa|·max|Σ_bb|).
2. Drop neurons whose scaled variance is < ε (with ε = 0 none, dead units included); add ε·I; pseudo-inverse;
   symmetric square root by ``eigh``; u, s, vᵀ = SVD(Σ_aa^{-1/2} Σ_ab Σ_bb^{-1/2}) (full u, vᵀ).
3. Side: A if A keeps no more neurons than B (ties → A), else B. The weights come from that side only.
4. "Directions" D = uᵀ(A − μ) + μ (the CCA rotation applied to the *unwhitened* centred activations, each
   neuron's mean added back to the direction with its index); P = Q of QR(Dᵀ) (Gram–Schmidt over samples in u's
   order); weight_i = Σ_j |P_iᵀ a_j| over the *uncentred* kept neurons a_j; normalised to sum 1.
5. Value = Σ_i weight_i · s_i over the min(p', q') canonical correlations s (a similarity, not 1 − it).

From moments (n samples, μ the kept means, C the centred scatter Σ(x − μ)(x − μ)ᵀ of the chosen side):
D Dᵀ = uᵀCu + n·μμᵀ and D Aᵀ = uᵀC + n·μμᵀ, and QR's R is the Cholesky factor of D Dᵀ up to row signs that
|·| removes, so weight_i = Σ_j |(L⁻¹(uᵀC + nμμᵀ))_ij| with L Lᵀ = D Dᵀ. No sample is needed.

Deviations, both where google's own result is undefined or wrong:

* google's else-branch (side B) projects ``acts1[y_idxs]`` instead of ``acts2``: with ε = 0 it raises a numpy
  shape error (q < p), with ε > 0 and p = q it silently mixes the nets. Here side B uses B's activations.
* The result depends on the *sign* of each singular vector (the mean is added back after the rotation, so
  flipping u_i does not just negate direction i), i.e. on LAPACK's arbitrary choice in ``np.linalg.svd``.
  ``signs="numpy"`` (default) keeps numpy's signs for the identical scaled matrix, which is what
  ``compute_pwcca`` sees on the same platform; where exact zeros (dead units with ε = 0) make that choice
  sensitive to rounding, ``signs="canonical"`` fixes each direction's sign (largest |entry| positive) for a
  platform-independent number.
* When D Dᵀ is singular (dead or collinear neurons on the chosen side with ε = 0), numpy's QR completes the basis
  arbitrarily (LAPACK-dependent); here a direction that is a combination of earlier ones gets weight 0
  (semidefinite Cholesky, pivot ≤ 1e-10 · max). Use ε > 0 (e.g. 1e-10) to drop dead units as google does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._errors import StageInputError
from ._factor_cache import memoised
from ._lapack import eigh, pinv, svd

__all__ = ["GooglePWCCAResult", "pwcca_google_from_moments", "pwcca_google_arrays"]


@dataclass(frozen=True)
class GooglePWCCAResult:
    """google/svcca's PWCCA: ``value`` = Σ weights · corrs over the chosen side's directions."""

    value: float
    corrs: np.ndarray  #: (k,) canonical correlations |s|, k = min(kept_a, kept_b)
    weights: np.ndarray  #: (k,) normalised weights
    side: str  #: "a" or "b"
    kept_a: int  #: neurons of A kept (scaled variance ≥ epsilon)
    kept_b: int


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = eigh((matrix + matrix.T) * 0.5)
    return (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """google/svcca's whitening ``√(pinv(Σ))`` of one side's (scaled) covariance."""
    return _psd_sqrt(pinv(matrix))


def _fix_signs(rotation: np.ndarray, signs: str) -> np.ndarray:
    """Rows of the CCA rotation with numpy's signs, or with each row's largest-|entry| made positive."""
    if signs == "numpy":
        return rotation
    if signs != "canonical":
        raise StageInputError(f"signs must be 'numpy' or 'canonical'; got {signs!r}")
    pick = rotation[np.arange(rotation.shape[0]), np.argmax(np.abs(rotation), axis=1)]
    return rotation * np.where(pick < 0, -1.0, 1.0)[:, None]


def _cholesky_semidefinite(gram: np.ndarray, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Lower L with L Lᵀ = gram, column by column; a dependent column (pivot ≤ tol·max diag) is zero.

    Returns ``(L, independent)``; ``independent[i]`` is False where direction i adds nothing new.
    """
    floor = tol * max(float(np.max(np.diag(gram))), 0.0) if gram.size else 0.0
    try:
        low = np.linalg.cholesky(gram)
        if (np.diag(low) ** 2 > floor).all():
            return low, np.ones(gram.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    k = gram.shape[0]
    low = np.zeros_like(gram)
    keep = np.zeros(k, dtype=bool)
    for j in range(k):
        pivot = gram[j, j] - low[j, :j] @ low[j, :j]
        if pivot <= floor:
            continue
        keep[j] = True
        low[j, j] = np.sqrt(pivot)
        low[j + 1 :, j] = (gram[j + 1 :, j] - low[j + 1 :, :j] @ low[j, :j]) / low[j, j]
    return low, keep


def pwcca_google_from_moments(
    n: int, mean_a: np.ndarray, mean_b: np.ndarray, m2_aa: np.ndarray, m2_bb: np.ndarray, m2_ab: np.ndarray,
    *, epsilon: float = 0.0, signs: str = "numpy",
) -> GooglePWCCAResult:
    """google/svcca's ``compute_pwcca(A, B, epsilon)`` from joint moments (see the module docstring).

    Args:
        n: number of samples m (> 1).
        mean_a, mean_b: (p,), (q,) neuron means.
        m2_aa, m2_bb, m2_ab: centred scatter blocks Σ(x − μ)(y − μ)ᵀ: (p, p), (q, q), (p, q).
        epsilon: google's ``epsilon``: neurons with scaled variance < epsilon are dropped and ε·I is added.
        signs: ``"numpy"`` or ``"canonical"`` singular-vector signs (see the module docstring).

    Returns:
        :class:`GooglePWCCAResult`; value 0 with empty arrays when a side keeps no neuron.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    p, q = mean_a.size, mean_b.size
    m2_aa, m2_bb, m2_ab = (np.asarray(x, np.float64) for x in (m2_aa, m2_bb, m2_ab))
    if m2_aa.shape != (p, p) or m2_bb.shape != (q, q) or m2_ab.shape != (p, q):
        raise StageInputError(
            f"moment blocks must be (p, p), (q, q), (p, q) for p={p}, q={q}; got {m2_aa.shape}, {m2_bb.shape}, "
            f"{m2_ab.shape}"
        )
    if n < 2:
        raise StageInputError(f"PWCCA needs at least 2 samples; got n={n}")
    if epsilon < 0:
        raise StageInputError(f"epsilon must be ≥ 0; got {epsilon}")
    cov_aa, cov_bb, cov_ab = m2_aa / (n - 1), m2_bb / (n - 1), m2_ab / (n - 1)
    max_a = float(np.max(np.abs(cov_aa))) if p else 0.0
    max_b = float(np.max(np.abs(cov_bb))) if q else 0.0
    if max_a <= 0 or max_b <= 0:  # google divides by zero here; a constant side has nothing to correlate
        return GooglePWCCAResult(0.0, np.zeros(0), np.zeros(0), "a", 0, 0)
    s_aa, s_bb, s_ab = cov_aa / max_a, cov_bb / max_b, cov_ab / np.sqrt(max_a * max_b)
    keep_a = np.abs(np.diag(s_aa)) >= epsilon
    keep_b = np.abs(np.diag(s_bb)) >= epsilon
    ka, kb = int(keep_a.sum()), int(keep_b.sum())
    if ka == 0 or kb == 0:
        return GooglePWCCAResult(0.0, np.zeros(0), np.zeros(0), "a", ka, kb)
    s_aa = s_aa[np.ix_(keep_a, keep_a)] + epsilon * np.eye(ka)
    s_bb = s_bb[np.ix_(keep_b, keep_b)] + epsilon * np.eye(kb)
    s_ab = s_ab[np.ix_(keep_a, keep_b)]
    # Each side's whitening depends on that side alone: permutation replicates share it (see _factor_cache).
    white_a = memoised("pwcca_google_whitener", s_aa, _inverse_sqrt)
    white_b = memoised("pwcca_google_whitener", s_bb, _inverse_sqrt)
    u, s, vt = svd(white_a @ s_ab @ white_b)
    corrs = np.abs(s)
    if ka <= kb:
        side, rotation, keep, mean, scatter = "a", u.T, keep_a, mean_a, m2_aa
    else:
        side, rotation, keep, mean, scatter = "b", vt, keep_b, mean_b, m2_bb
    rotation = _fix_signs(rotation, signs)
    mu = mean[keep]
    c = scatter[np.ix_(keep, keep)]
    uncentred = n * np.outer(mu, mu)
    gram = rotation @ c @ rotation.T + uncentred  # D Dᵀ
    cross = rotation @ c + uncentred  # D Aᵀ (uncentred kept neurons)
    low, independent = _cholesky_semidefinite(gram)
    proj = np.zeros_like(cross)
    if independent.all():
        proj = np.linalg.solve(low, cross)
    else:  # forward substitution skipping the dependent directions
        for i in np.flatnonzero(independent):
            proj[i] = (cross[i] - low[i, :i] @ proj[:i]) / low[i, i]
    alpha = np.abs(proj).sum(axis=1)
    total = alpha.sum()
    weights = alpha / total if total > 0 else np.zeros_like(alpha)
    k = min(weights.size, corrs.size)
    return GooglePWCCAResult(float(weights[:k] @ corrs[:k]), corrs[:k], weights[:k], side, ka, kb)


def pwcca_google_arrays(
    a: np.ndarray, b: np.ndarray, *, epsilon: float = 0.0, signs: str = "numpy"
) -> GooglePWCCAResult:
    """The in-memory reference: google/svcca's steps on a (n, p) and b (n, q) samples × units arrays.

    Written from the published formula (explicit directions, ``np.linalg.qr`` over samples, uncentred
    activations); side B uses B's activations (see the module docstring). O(n·(p + q)) memory.
    """
    acts1 = np.asarray(a, np.float64).T
    acts2 = np.asarray(b, np.float64).T
    p = acts1.shape[0]
    cov = np.cov(np.vstack([acts1, acts2]))
    s_aa, s_ab, s_bb = cov[:p, :p], cov[:p, p:], cov[p:, p:]
    max_a, max_b = np.max(np.abs(s_aa)), np.max(np.abs(s_bb))
    s_aa, s_bb, s_ab = s_aa / max_a, s_bb / max_b, s_ab / np.sqrt(max_a * max_b)
    keep_a, keep_b = np.abs(np.diag(s_aa)) >= epsilon, np.abs(np.diag(s_bb)) >= epsilon
    s_aa = s_aa[np.ix_(keep_a, keep_a)] + epsilon * np.eye(int(keep_a.sum()))
    s_bb = s_bb[np.ix_(keep_b, keep_b)] + epsilon * np.eye(int(keep_b.sum()))
    s_ab = s_ab[np.ix_(keep_a, keep_b)]
    u, s, vt = svd(_psd_sqrt(pinv(s_aa)) @ s_ab @ _psd_sqrt(pinv(s_bb)))
    mean1, mean2 = acts1.mean(axis=1, keepdims=True), acts2.mean(axis=1, keepdims=True)
    if keep_a.sum() <= keep_b.sum():
        side, acts = "a", acts1[keep_a]
        dirns = _fix_signs(u.T, signs) @ (acts - mean1[keep_a]) + mean1[keep_a]
    else:
        side, acts = "b", acts2[keep_b]
        dirns = _fix_signs(vt, signs) @ (acts - mean2[keep_b]) + mean2[keep_b]
    basis, _ = np.linalg.qr(dirns.T)
    weights = np.abs(basis.T @ acts.T).sum(axis=1)
    weights = weights / weights.sum()
    corrs = np.abs(s)
    k = min(weights.size, corrs.size)
    return GooglePWCCAResult(
        float(weights[:k] @ corrs[:k]), corrs[:k], weights[:k], side, int(keep_a.sum()), int(keep_b.sum())
    )
