"""CCA, SVCCA, PWCCA and linear CKA computed from covariance blocks only (no samples).

The constraint: the activations never sit in memory, so every similarity index is written in terms of
Σ_aa (Ca×Ca), Σ_bb (Cb×Cb) and Σ_ab (Ca×Cb) from :class:`JointMoments`. All indexes here are invariant to the
covariance's ddof, so any consistent normalisation works.

Numerical safety (rank-deficient covariances, dead units, units ≥ samples): each side is whitened through its
eigen-decomposition and directions with eigenvalue ≤ ``eps · λ_max`` are dropped (a pseudo-inverse square root,
the limit of the reference code's ``ε·I`` regularisation as ε → 0). Canonical correlations are clipped to [0, 1].
Nothing returns NaN: empty subspaces give no correlations and a mean of 0.

* CCA (Hotelling 1936): canonical correlations = singular values of Σ_aa^{-1/2} Σ_ab Σ_bb^{-1/2}.
* SVCCA (Raghu et al. 2017): keep each side's top principal directions, then CCA. Convention (the paper's,
  Appendix A): keep the smallest m with Σ_{i≤m} s_i ≥ keep · Σ s_i, where s_i are the **singular values of the
  centred data** (= √(n·λ_i) for covariance eigenvalues λ_i; ``convention="singular_values"``). The paper calls
  this "99% of variance"; ``convention="variance"`` applies the rule to λ_i (= s_i²) instead, which keeps fewer
  directions. The reported similarity is the mean of all min(m_a, m_b) canonical correlations (paper eq. 1).
* PWCCA (Morcos et al. 2018): Σ α_i ρ_i / Σ α_i with α_i = Σ_j |⟨h_i, x_j⟩|, h_i the canonical variates of the side
  with fewer non-degenerate directions and x_j its centred neurons; ⟨h_i, x_j⟩ ∝ (Σ_aa w_i)_j for canonical weight
  w_i. This is the textbook canonical-variate form (as restated by Kornblith et al. 2019, eq. 9); google/svcca's
  ``compute_pwcca`` orthonormalises unwhitened directions and uses uncentred neurons, which differs in the 3rd
  decimal.
* Linear CKA (Kornblith et al. 2019), feature-space form: ‖Σ_ab‖²_F / (‖Σ_aa‖_F ‖Σ_bb‖_F).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from .._errors import StageInputError
from ._lapack import eigh, svd
from ._moments import MultiMoments

__all__ = [
    "CanonicalCorrelations",
    "PWCCAResult",
    "cca_family",
    "cca_from_covariance",
    "svcca_from_covariance",
    "pwcca_from_covariance",
    "linear_cka_from_covariance",
    "cka_matrix",
    "svcca_dims",
]

_CONVENTIONS = ("singular_values", "variance")


@dataclass(frozen=True)
class CanonicalCorrelations:
    """Canonical correlations of two subspaces, descending, in [0, 1]."""

    corrs: np.ndarray  #: (min(dims_a, dims_b),)
    dims_a: int  #: directions of A entering CCA
    dims_b: int  #: directions of B entering CCA

    @property
    def mean(self) -> float:
        """Mean canonical correlation ρ̄ (0.0 when there is none)."""
        return float(self.corrs.mean()) if self.corrs.size else 0.0


@dataclass(frozen=True)
class PWCCAResult:
    """Projection-weighted CCA: ``value`` = Σ weights · corrs (weights sum to 1, or are all 0)."""

    value: float
    corrs: np.ndarray  #: (k,) canonical correlations
    weights: np.ndarray  #: (k,) normalised projection weights α_i
    side: str  #: "a" or "b": the side whose canonical variates define the weights


def _check_blocks(cov_aa: np.ndarray, cov_bb: np.ndarray, cov_ab: np.ndarray) -> tuple[np.ndarray, ...]:
    cov_aa, cov_bb, cov_ab = (np.asarray(c, dtype=np.float64) for c in (cov_aa, cov_bb, cov_ab))
    ca, cb = cov_aa.shape[0] if cov_aa.ndim == 2 else -1, cov_bb.shape[0] if cov_bb.ndim == 2 else -1
    if cov_aa.shape != (ca, ca) or cov_bb.shape != (cb, cb) or cov_ab.shape != (ca, cb):
        raise StageInputError(
            f"covariance blocks must be Σ_aa (Ca, Ca), Σ_bb (Cb, Cb), Σ_ab (Ca, Cb); "
            f"got {cov_aa.shape}, {cov_bb.shape}, {cov_ab.shape}"
        )
    if not all(np.isfinite(c).all() for c in (cov_aa, cov_bb, cov_ab)):
        raise StageInputError("covariance blocks contain NaN or inf; accumulate moments from finite activations")
    return cov_aa, cov_bb, cov_ab


def _eigh_desc(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric PSD matrix."""
    if cov.shape[0] == 0:
        return np.zeros(0), np.zeros((0, 0))
    values, vectors = eigh((cov + cov.T) * 0.5)
    return np.maximum(values[::-1], 0.0), vectors[:, ::-1]


def _nondegenerate(values: np.ndarray, eps: float) -> int:
    """Number of leading eigenvalues above ``eps · λ_max``."""
    if values.size == 0 or values[0] <= 0:
        return 0
    return int((values > eps * values[0]).sum())


def svcca_dims(eigenvalues: np.ndarray, keep: float, convention: str = "singular_values") -> int:
    """Number of leading directions SVCCA keeps.

    Args:
        eigenvalues: descending covariance eigenvalues (≥ 0).
        keep: fraction in (0, 1] of the total to retain.
        convention: ``"singular_values"`` (paper: cumulative Σ√λ) or ``"variance"`` (cumulative Σλ).

    Returns:
        The smallest m with cumulative sum ≥ keep · total (0 when the total is 0).
    """
    if convention not in _CONVENTIONS:
        raise StageInputError(f"unknown SVCCA convention {convention!r}; use one of {list(_CONVENTIONS)}")
    if not 0.0 < keep <= 1.0:
        raise StageInputError(f"SVCCA keep fraction must be in (0, 1]; got {keep}")
    mass = np.sqrt(np.maximum(eigenvalues, 0.0)) if convention == "singular_values" else np.maximum(eigenvalues, 0.0)
    total = mass.sum()
    if total <= 0:
        return 0
    cumulative = np.cumsum(mass) / total
    # The relative slack makes keep = 1.0 stop at the last non-zero direction despite rounding.
    return int(min(np.searchsorted(cumulative, keep - 1e-12) + 1, mass.size))


def _cca_on_bases(
    cov_ab: np.ndarray,
    basis_a: np.ndarray,
    values_a: np.ndarray,
    basis_b: np.ndarray,
    values_b: np.ndarray,
    weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """CCA restricted to eigen-bases: returns (corrs, canonical weights of A (Ca, k), of B (Cb, k)); with
    ``weights=False`` only the correlations (singular values alone: about half the SVD's cost) and ``None``s."""
    white_a = basis_a / np.sqrt(values_a)
    white_b = basis_b / np.sqrt(values_b)
    k = min(white_a.shape[1], white_b.shape[1])
    if k == 0:
        return np.zeros(0), np.zeros((basis_a.shape[0], 0)), np.zeros((basis_b.shape[0], 0))
    m = white_a.T @ cov_ab @ white_b
    if not weights:
        return np.clip(svd(m, compute_uv=False)[:k], 0.0, 1.0), None, None
    u, s, vt = svd(m, full_matrices=False)
    return np.clip(s[:k], 0.0, 1.0), white_a @ u[:, :k], white_b @ vt[:k].T


@dataclass(frozen=True)
class _Spectrum:
    """Eigen-decomposition of one side's covariance, shared by CCA, SVCCA and PWCCA."""

    cov: np.ndarray
    values: np.ndarray  # descending, ≥ 0
    vectors: np.ndarray  # columns match values
    rank: int  # directions above the eps floor

    @classmethod
    def of(cls, cov: np.ndarray, eps: float) -> "_Spectrum":
        values, vectors = _eigh_desc(cov)
        return cls(cov, values, vectors, _nondegenerate(values, eps))


def _cca(cov_ab: np.ndarray, side_a: _Spectrum, side_b: _Spectrum,
         weights: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    ka, kb = side_a.rank, side_b.rank
    return _cca_on_bases(cov_ab, side_a.vectors[:, :ka], side_a.values[:ka], side_b.vectors[:, :kb],
                         side_b.values[:kb], weights)


def _svcca(
    cov_ab: np.ndarray, side_a: _Spectrum, side_b: _Spectrum, keep: float, convention: str
) -> CanonicalCorrelations:
    ma = min(svcca_dims(side_a.values, keep, convention), side_a.rank)
    mb = min(svcca_dims(side_b.values, keep, convention), side_b.rank)
    corrs, _, _ = _cca_on_bases(
        cov_ab, side_a.vectors[:, :ma], side_a.values[:ma], side_b.vectors[:, :mb], side_b.values[:mb], weights=False
    )
    return CanonicalCorrelations(corrs, ma, mb)


def _pwcca(cov_ab: np.ndarray, side_a: _Spectrum, side_b: _Spectrum) -> PWCCAResult:
    corrs, weights_a, weights_b = _cca(cov_ab, side_a, side_b)
    side = "a" if side_a.rank <= side_b.rank else "b"
    # Covariance of canonical variate i (unit variance) with neuron j of the chosen side.
    projections = side_a.cov @ weights_a if side == "a" else side_b.cov @ weights_b
    alpha = np.abs(projections).sum(axis=0)
    total = alpha.sum()
    weights = alpha / total if total > 0 else np.zeros_like(alpha)
    return PWCCAResult(float(weights @ corrs), corrs, weights, side)


def cca_family(
    cov_aa: np.ndarray,
    cov_bb: np.ndarray,
    cov_ab: np.ndarray,
    *,
    keep: float = 0.99,
    convention: Literal["singular_values", "variance"] = "singular_values",
    eps: float = 1e-10,
) -> tuple[CanonicalCorrelations, CanonicalCorrelations, PWCCAResult]:
    """CCA, SVCCA and PWCCA together, sharing one eigen-decomposition per side.

    Returns:
        ``(cca, svcca, pwcca)`` exactly as :func:`cca_from_covariance`, :func:`svcca_from_covariance` and
        :func:`pwcca_from_covariance` return them.
    """
    cov_aa, cov_bb, cov_ab = _check_blocks(cov_aa, cov_bb, cov_ab)
    side_a, side_b = _Spectrum.of(cov_aa, eps), _Spectrum.of(cov_bb, eps)
    pw = _pwcca(cov_ab, side_a, side_b)
    cca = CanonicalCorrelations(pw.corrs, side_a.rank, side_b.rank)
    return cca, _svcca(cov_ab, side_a, side_b, keep, convention), pw


def cca_from_covariance(
    cov_aa: np.ndarray, cov_bb: np.ndarray, cov_ab: np.ndarray, *, eps: float = 1e-10
) -> CanonicalCorrelations:
    """All canonical correlations of two nets' channels (Hotelling CCA) from covariance blocks.

    Args:
        cov_aa: (Ca, Ca) covariance of A.
        cov_bb: (Cb, Cb) covariance of B.
        cov_ab: (Ca, Cb) cross-covariance.
        eps: relative eigenvalue floor; directions with λ ≤ eps·λ_max are dropped.

    Returns:
        :class:`CanonicalCorrelations` over the non-degenerate directions of both sides.
    """
    cov_aa, cov_bb, cov_ab = _check_blocks(cov_aa, cov_bb, cov_ab)
    side_a, side_b = _Spectrum.of(cov_aa, eps), _Spectrum.of(cov_bb, eps)
    corrs, _, _ = _cca(cov_ab, side_a, side_b, weights=False)
    return CanonicalCorrelations(corrs, side_a.rank, side_b.rank)


def svcca_from_covariance(
    cov_aa: np.ndarray,
    cov_bb: np.ndarray,
    cov_ab: np.ndarray,
    *,
    keep: float = 0.99,
    convention: Literal["singular_values", "variance"] = "singular_values",
    eps: float = 1e-10,
) -> CanonicalCorrelations:
    """SVCCA (Raghu et al. 2017) from covariance blocks: top principal directions per side, then CCA.

    Args:
        cov_aa, cov_bb, cov_ab: covariance blocks as in :func:`cca_from_covariance`.
        keep: fraction of the singular-value (or variance) mass each side keeps (paper: 0.99).
        convention: see :func:`svcca_dims`.
        eps: relative eigenvalue floor applied before the SVD truncation.

    Returns:
        :class:`CanonicalCorrelations`; ``dims_a``/``dims_b`` are the kept directions, ``mean`` the SVCCA ρ̄.
    """
    cov_aa, cov_bb, cov_ab = _check_blocks(cov_aa, cov_bb, cov_ab)
    svcca_dims(np.zeros(0), keep, convention)  # validates keep and convention even for empty inputs
    return _svcca(cov_ab, _Spectrum.of(cov_aa, eps), _Spectrum.of(cov_bb, eps), keep, convention)


def pwcca_from_covariance(
    cov_aa: np.ndarray, cov_bb: np.ndarray, cov_ab: np.ndarray, *, eps: float = 1e-10
) -> PWCCAResult:
    """Projection-weighted CCA (Morcos et al. 2018) from covariance blocks.

    Args:
        cov_aa, cov_bb, cov_ab: covariance blocks as in :func:`cca_from_covariance`.
        eps: relative eigenvalue floor.

    Returns:
        :class:`PWCCAResult`; weights come from the side with fewer non-degenerate directions (A on ties).
    """
    cov_aa, cov_bb, cov_ab = _check_blocks(cov_aa, cov_bb, cov_ab)
    return _pwcca(cov_ab, _Spectrum.of(cov_aa, eps), _Spectrum.of(cov_bb, eps))


def linear_cka_from_covariance(cov_aa: np.ndarray, cov_bb: np.ndarray, cov_ab: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019), feature-space form ‖Σ_ab‖²_F / (‖Σ_aa‖_F ‖Σ_bb‖_F); 0 if a side is constant.

    Args:
        cov_aa, cov_bb, cov_ab: covariance blocks as in :func:`cca_from_covariance`.

    Returns:
        CKA in [0, 1].
    """
    cov_aa, cov_bb, cov_ab = _check_blocks(cov_aa, cov_bb, cov_ab)
    return _cka(cov_aa, cov_bb, cov_ab)


def _frobenius(x: np.ndarray) -> tuple[float, float]:
    """‖x‖_F as (scale, norm of x/scale), so huge entries cannot overflow the sum of squares."""
    scale = float(np.abs(x).max()) if x.size else 0.0
    return (scale, float(np.linalg.norm(x / scale))) if scale > 0 else (0.0, 0.0)


def _cka(cov_aa: np.ndarray, cov_bb: np.ndarray, cov_ab: np.ndarray) -> float:
    return _cka_from_norms(_frobenius(cov_aa), _frobenius(cov_bb), _frobenius(cov_ab))


def _cka_from_norms(aa: tuple[float, float], bb: tuple[float, float], ab: tuple[float, float]) -> float:
    (scale_aa, norm_aa), (scale_bb, norm_bb), (scale_ab, norm_ab) = aa, bb, ab
    if scale_aa == 0 or scale_bb == 0:
        return 0.0
    ratio = scale_ab / np.sqrt(scale_aa) / np.sqrt(scale_bb)
    value = (norm_ab * ratio) ** 2 / (norm_aa * norm_bb)
    return float(np.clip(value, 0.0, 1.0))


def cka_matrix(moments: MultiMoments, layers_a: Sequence[str], layers_b: Sequence[str]) -> pd.DataFrame:
    """Linear CKA between every layer of ``layers_a`` and every layer of ``layers_b`` from one joint statistic.

    Args:
        moments: a :class:`MultiMoments` whose blocks include all named layers, accumulated on aligned samples
            (normally one pooled sample per image, see ``samples_from_maps(mode="pooled")``).
        layers_a: block names for the rows (e.g. model A's layers).
        layers_b: block names for the columns.

    Returns:
        DataFrame with columns ``layer_a``, ``layer_b``, ``linear_cka``, one row per pair (row-major).
    """
    if moments.n < 2:
        raise StageInputError(f"layer × layer CKA needs at least 2 samples; the statistic holds n={moments.n}")
    within = {name: _frobenius(moments.block(name, name, ddof=0)) for name in {*layers_a, *layers_b}}
    rows = []
    for la in layers_a:
        for lb in layers_b:
            value = _cka_from_norms(within[la], within[lb], _frobenius(moments.block(la, lb, ddof=0)))
            rows.append((la, lb, value))
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "linear_cka"])
