"""Comparison metrics beyond SVCCA and CKA, from moments and (as test references) from raw arrays.

Every ``*_moments`` function takes stacked moment states (:class:`MomentState`: R replicates — the full data and
the leave-one-group-out jackknife replicates, or permuted pairs — of n, means, centred scatter M and the
fourth-order Σ a_t^i a_t^j) and two block names, and returns the (R,) values, vectorised over replicates.
The ``*_arrays`` functions are independent in-memory implementations on (samples × units) arrays X (n, p), Y (n, q).

* Debiased linear CKA (Kornblith et al. 2019, with Song et al. 2012's unbiased HSIC):
  HSIC_u ∝ ‖M_xy‖²_F − n/(n−2)·Σ_t a_t b_t + (Σa)(Σb)/((n−1)(n−2)), a_t = ‖x_t − μ_x‖², b_t likewise;
  CKA_d = HSIC_u(X, Y)/√(HSIC_u(X, X)·HSIC_u(Y, Y)). Needs n ≥ 4. A non-positive normaliser gives NaN
  (flagged, never clamped).
* Orthogonal Procrustes distance (Ding et al. 2021): 2 − 2‖M_xy‖_*/√(tr M_xx·tr M_yy) ∈ [0, 2].
* Generalized shape metric (Williams et al. 2021, netrep ``LinearMetric(alpha, score_method="angular")``):
  partial whitening Z = V diag(α + (1 − α)λ^{-1/2}) Vᵀ of each side's scatter (λ floored at netrep's 1e-7),
  θ = arccos(‖Z_x M_xy Z_y‖_* / √(tr(Z_x M_xx Z_x)·tr(Z_y M_yy Z_y))) ∈ [0, π/2]; α = 1 is the angular Procrustes
  distance, α = 0 a CCA-based distance (cos θ = mean canonical correlation when p = q). A metric: it obeys the
  triangle inequality. (netrep's floor is absolute, on the scatter of the data as given.)
* Fréchet distance between the Gaussian fits N(μ_x, Σ_x), N(μ_y, Σ_y) (the FID formula, on any layer; 2-Wasserstein):
  d² = ‖μ_x − μ_y‖² + tr Σ_x + tr Σ_y − 2‖Σ_x^{1/2}Σ_y^{1/2}‖_* with covariance divisor n − 1. It compares the
  *same coordinates*, so it needs p = q (NaN otherwise), and across seeds it mixes basis and distribution.
* RSA (Kriegeskorte et al. 2008) on per-sample rows only: RDM_ij = 1 − Pearson corr(r_i, r_j) over units,
  compared by Spearman ρ of the upper triangles.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from .._errors import StageInputError
from ._factor_cache import memoised
from ._grouped import MomentState
from ._lapack import eigh, svd

__all__ = [
    "NETREP_EIGVAL_TOL",
    "linear_cka_moments",
    "debiased_cka_moments",
    "procrustes_moments",
    "shape_metric_moments",
    "frechet_moments",
    "debiased_cka_arrays",
    "procrustes_arrays",
    "shape_metric_arrays",
    "frechet_arrays",
    "rsa_arrays",
    "rdm_correlation",
]

#: netrep's eigenvalue floor in ``whiten`` (absolute, on XᵀX of the centred data).
NETREP_EIGVAL_TOL = 1e-7


def _blocks(state: MomentState, a: str, b: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sa, sb = state.block(a), state.block(b)
    return state.m2[:, sa, sa], state.m2[:, sb, sb], state.m2[:, sa, sb]


def _trace(m: np.ndarray) -> np.ndarray:
    return np.einsum("rii->r", m)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def linear_cka_moments(state: MomentState, a: str, b: str) -> np.ndarray:
    """(R,) biased linear CKA ‖M_xy‖²_F / (‖M_xx‖_F ‖M_yy‖_F); NaN for a constant side."""
    mxx, myy, mxy = _blocks(state, a, b)
    norm = lambda m: np.sqrt((m**2).sum(axis=(1, 2)))  # noqa: E731
    return np.clip(_ratio(norm(mxy) ** 2, norm(mxx) * norm(myy)), 0.0, 1.0)


def _hsic_u(m: np.ndarray, cross_sq: np.ndarray, tr_x: np.ndarray, tr_y: np.ndarray, n: np.ndarray) -> np.ndarray:
    return (m**2).sum(axis=(1, 2)) - n / (n - 2) * cross_sq + tr_x * tr_y / ((n - 1) * (n - 2))


def debiased_cka_moments(state: MomentState, a: str, b: str) -> np.ndarray:
    """(R,) debiased linear CKA; NaN where n < 4 or an unbiased self-HSIC is ≤ 0."""
    mxx, myy, mxy = _blocks(state, a, b)
    i, j = state.index[a], state.index[b]
    n = state.n
    tx, ty = _trace(mxx), _trace(myy)
    with np.errstate(invalid="ignore", divide="ignore"):
        hxy = _hsic_u(mxy, state.sq[:, i, j], tx, ty, n)
        hxx = _hsic_u(mxx, state.sq[:, i, i], tx, tx, n)
        hyy = _hsic_u(myy, state.sq[:, j, j], ty, ty, n)
        value = np.where((hxx > 0) & (hyy > 0), hxy / np.sqrt(np.abs(hxx * hyy)), np.nan)
    return np.where(n >= 4, value, np.nan)


def _nuclear(m: np.ndarray) -> np.ndarray:
    # Procrustes and the α = 1 shape metric take the nuclear norm of the same cross block: computed once.
    return memoised("nuclear", m, lambda x: svd(x, compute_uv=False).sum(axis=-1)).copy()


def procrustes_moments(state: MomentState, a: str, b: str) -> np.ndarray:
    """(R,) Ding et al.'s orthogonal Procrustes distance 2 − 2‖M_xy‖_*/√(tr M_xx tr M_yy) (NaN: constant side)."""
    mxx, myy, mxy = _blocks(state, a, b)
    cos = _ratio(_nuclear(mxy), np.sqrt(_trace(mxx) * _trace(myy)))
    return 2.0 - 2.0 * np.minimum(cos, 1.0)


def _partial_whitener(spectrum: tuple[np.ndarray, np.ndarray], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """netrep's partial whitening of a scatter stack from its decomposition (λ ≥ 0 (R, p), V (R, p, p)):
    (Z (R, p, p), tr(Z M Z) (R,))."""
    lam, vec = spectrum
    d = alpha + (1.0 - alpha) / np.sqrt(np.maximum(lam, NETREP_EIGVAL_TOL))
    z = (vec * d[:, None, :]) @ np.swapaxes(vec, 1, 2)
    return z, (d**2 * lam).sum(axis=1)


def shape_metric_moments(state: MomentState, a: str, b: str, alpha: float = 1.0) -> np.ndarray:
    """(R,) netrep's angular shape distance (radians, [0, π/2]) with regularisation ``alpha`` ∈ [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise StageInputError(f"shape metric alpha must be in [0, 1]; got {alpha}")
    mxx, myy, mxy = _blocks(state, a, b)
    if alpha == 1.0:
        cos = _ratio(_nuclear(mxy), np.sqrt(_trace(mxx) * _trace(myy)))
    else:
        zx, vx = _partial_whitener(state.spectrum(a), alpha)
        zy, vy = _partial_whitener(state.spectrum(b), alpha)
        cos = _ratio(_nuclear(zx @ mxy @ zy), np.sqrt(vx * vy))
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _sqrt_psd(spectrum: tuple[np.ndarray, np.ndarray], scale: np.ndarray) -> np.ndarray:
    """(R, p, p) square root of the PSD stack with decomposition ``spectrum`` (λ ≥ 0, V) times ``scale`` (R,)."""
    lam, vec = spectrum
    return (vec * np.sqrt(lam * scale[:, None])[:, None, :]) @ np.swapaxes(vec, 1, 2)


def frechet_moments(state: MomentState, a: str, b: str) -> np.ndarray:
    """(R,) squared Fréchet distance between the Gaussian fits of blocks a and b (NaN unless same width)."""
    mxx, myy, _ = _blocks(state, a, b)
    if mxx.shape[1] != myy.shape[1]:
        return np.full(state.n.size, np.nan)
    dof = np.maximum(state.n - 1, 1.0)
    cx, cy = mxx / dof[:, None, None], myy / dof[:, None, None]
    mean_term = ((state.mean[:, state.block(a)] - state.mean[:, state.block(b)]) ** 2).sum(axis=1)
    cross = _nuclear(_sqrt_psd(state.spectrum(a), 1.0 / dof) @ _sqrt_psd(state.spectrum(b), 1.0 / dof))
    return np.maximum(mean_term + _trace(cx) + _trace(cy) - 2.0 * cross, 0.0)


# ------------------------------------------------------------------------------------ array references


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise StageInputError(f"need (n, p) and (n, q) arrays with the same rows; got {x.shape} and {y.shape}")
    return x, y


def debiased_cka_arrays(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased CKA from the n × n Gram matrices with Song et al.'s U-statistic (zeroed diagonals). O(n²)."""
    x, y = _pair(x, y)
    n = x.shape[0]
    if n < 4:
        raise StageInputError(f"debiased CKA needs n ≥ 4 samples; got {n}")

    def hsic(k: np.ndarray, l: np.ndarray) -> float:
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
        one_k, one_l = k.sum(axis=1), l.sum(axis=1)
        value = np.sum(k * l) + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_k @ one_l
        return float(value / (n * (n - 3)))

    k, l = x @ x.T, y @ y.T
    hkk, hll = hsic(k, k), hsic(l, l)
    return float(hsic(k, l) / np.sqrt(hkk * hll)) if hkk > 0 and hll > 0 else float("nan")


def procrustes_arrays(x: np.ndarray, y: np.ndarray) -> float:
    """Ding et al.'s ``procrustes`` on neurons × samples A = Xᵀ, B = Yᵀ: centre rows, unit Frobenius, 2 − 2‖ABᵀ‖_*."""
    x, y = _pair(x, y)
    a, b = (x - x.mean(0)).T, (y - y.mean(0)).T
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(2.0 - 2.0 * svd(a @ b.T, compute_uv=False).sum())


def shape_metric_arrays(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> float:
    """netrep's ``LinearMetric(alpha, center_columns=True, zero_pad=True, score_method='angular')`` fitted and
    scored on the same data: zero-pad to equal width, centre, partially whiten, align by SVD, angle (radians)."""
    x, y = _pair(x, y)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    x, y = x - x.mean(0), y - y.mean(0)

    def whiten(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if alpha == 1.0:
            return z, np.eye(z.shape[1])
        lam, vec = eigh(z.T @ z)
        lam = np.maximum(lam, NETREP_EIGVAL_TOL)
        d = alpha + (1 - alpha) * lam ** (-0.5)
        zmat = (vec * d[None, :]) @ vec.T
        return z @ zmat, zmat

    xw, zx = whiten(x)
    yw, zy = whiten(y)
    u, _, vt = svd(xw.T @ yw)
    xa, ya = x @ (zx @ u), y @ (zy @ vt.T)
    cos = np.sum(xa * ya) / (np.linalg.norm(xa) * np.linalg.norm(ya))
    return float(np.arccos(np.clip(cos, -1.0, 1.0)))


def frechet_arrays(x: np.ndarray, y: np.ndarray) -> float:
    """Squared Fréchet distance of the Gaussian fits, with ``scipy.linalg.sqrtm`` as in the FID reference code."""
    from scipy import linalg

    x, y = _pair(x, y)
    if x.shape[1] != y.shape[1]:
        raise StageInputError(f"the Fréchet distance compares the same coordinates; widths {x.shape[1]} ≠ {y.shape[1]}")
    cx, cy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(cx @ cy)
    covmean = np.real(covmean)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(cx) + np.trace(cy) - 2.0 * np.trace(covmean))


def rdm_correlation(x: np.ndarray) -> np.ndarray:
    """(k(k−1)/2,) upper triangle of the correlation-distance RDM of k samples (rows) over units.

    A sample with constant units (zero variance over units) has correlation 0 with every other sample.
    """
    x = np.asarray(x, np.float64)
    c = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(c, axis=1)
    c = c / np.where(norm > 0, norm, 1.0)[:, None]
    i, j = np.triu_indices(x.shape[0], k=1)
    # One (k, k) product instead of k(k−1)/2 row pairs gathered into two (k²/2, units) temporaries. einsum's own
    # loop (not BLAS, whose blocking depends on k) makes each entry a function of its two rows only, so an RDM
    # restricted to some rows equals the RDM of those rows bit for bit (the RSA jackknife reuses it that way;
    # tied distances then stay tied).
    return 1.0 - np.einsum("ik,jk->ij", c, c, optimize=False)[i, j]


def rsa_arrays(x: np.ndarray, y: np.ndarray) -> float:
    """RSA: Spearman ρ between the correlation-distance RDMs of X and Y (same samples)."""
    x, y = _pair(x, y)
    if x.shape[0] < 4:
        raise StageInputError(f"RSA needs at least 4 samples; got {x.shape[0]}")
    rho = stats.spearmanr(rdm_correlation(x), rdm_correlation(y)).statistic
    return float(rho) if np.isfinite(rho) else float("nan")
