"""CCA, SVCCA and paper-form PWCCA vectorised over stacked moment states (jackknife replicates, permutations).

The same definitions and rank rule as :mod:`._cca` (eigenvalues ≤ eps·λ_max dropped, canonical correlations
clipped to [0, 1], PWCCA weights from the side with fewer non-degenerate directions, A on ties), computed for
R replicates at once: each side's eigen-decomposition is one batched ``eigh``, and directions beyond a
replicate's rank are masked to zero so one batched SVD serves every replicate. Inputs are the centred scatter
blocks M (R, p, p), M (R, q, q), M (R, p, q); every index is invariant to the scatter's scale. ``spectra``:
both sides' decompositions when the caller already has them (:meth:`MomentState.spectrum`).
"""

from __future__ import annotations

import numpy as np

from ._cca import svcca_dims
from ._factor_cache import sym_eigh
from ._lapack import svd

__all__ = ["cca_mean_batched", "svcca_batched", "pwcca_morcos_batched"]


Spectrum = tuple[np.ndarray, np.ndarray]


def _spectra(m: np.ndarray, eps: float, pre: Spectrum | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(λ decreasing ≥ 0, V, rank) of a scatter stack; ``pre`` is its decomposition when already known."""
    if pre is None:
        lam, vec = sym_eigh((m + np.swapaxes(m, 1, 2)) * 0.5)  # identical replicates factorised once
        lam, vec = np.maximum(lam[:, ::-1], 0.0), vec[:, :, ::-1]
    else:
        lam, vec = pre
    top = lam[:, :1] if lam.shape[1] else np.zeros((lam.shape[0], 1))
    rank = np.where(top[:, 0] > 0, (lam > eps * top).sum(axis=1), 0)
    return lam, vec, rank


def _whitener(lam: np.ndarray, vec: np.ndarray, keep: np.ndarray) -> np.ndarray:
    mask = np.arange(lam.shape[1])[None, :] < keep[:, None]
    inv = np.where(mask, 1.0 / np.sqrt(np.where(mask & (lam > 0), lam, 1.0)), 0.0)
    return vec * inv[:, None, :]


def _masked_mean(s: np.ndarray, k: np.ndarray) -> np.ndarray:
    take = np.arange(s.shape[1])[None, :] < k[:, None]
    total = np.where(take, np.clip(s, 0.0, 1.0), 0.0).sum(axis=1)
    return np.where(k > 0, total / np.maximum(k, 1), 0.0)


def cca_mean_batched(mxx: np.ndarray, myy: np.ndarray, mxy: np.ndarray, eps: float = 1e-10,
                     spectra: tuple[Spectrum, Spectrum] | None = None) -> np.ndarray:
    """(R,) mean canonical correlation over the non-degenerate directions of both sides."""
    lx, vx, rx = _spectra(mxx, eps, spectra[0] if spectra else None)
    ly, vy, ry = _spectra(myy, eps, spectra[1] if spectra else None)
    wx, wy = _whitener(lx, vx, rx), _whitener(ly, vy, ry)
    s = svd(np.swapaxes(wx, 1, 2) @ mxy @ wy, compute_uv=False)
    return _masked_mean(s, np.minimum(rx, ry))


def svcca_batched(mxx: np.ndarray, myy: np.ndarray, mxy: np.ndarray, keep: float = 0.99, eps: float = 1e-10,
                  convention: str = "singular_values", spectra: tuple[Spectrum, Spectrum] | None = None) -> np.ndarray:
    """(R,) SVCCA ρ̄: each replicate keeps its own leading directions (:func:`svcca_dims`), then CCA."""
    lx, vx, rx = _spectra(mxx, eps, spectra[0] if spectra else None)
    ly, vy, ry = _spectra(myy, eps, spectra[1] if spectra else None)
    mx = np.array([min(svcca_dims(l, keep, convention), r) for l, r in zip(lx, rx)], dtype=np.int64)
    my = np.array([min(svcca_dims(l, keep, convention), r) for l, r in zip(ly, ry)], dtype=np.int64)
    wx, wy = _whitener(lx, vx, mx), _whitener(ly, vy, my)
    s = svd(np.swapaxes(wx, 1, 2) @ mxy @ wy, compute_uv=False)
    return _masked_mean(s, np.minimum(mx, my))


def pwcca_morcos_batched(mxx: np.ndarray, myy: np.ndarray, mxy: np.ndarray, eps: float = 1e-10,
                         spectra: tuple[Spectrum, Spectrum] | None = None) -> np.ndarray:
    """(R,) PWCCA with the paper's weights α_i = Σ_j |⟨h_i, x_j⟩| (see :func:`pwcca_from_covariance`)."""
    lx, vx, rx = _spectra(mxx, eps, spectra[0] if spectra else None)
    ly, vy, ry = _spectra(myy, eps, spectra[1] if spectra else None)
    wx, wy = _whitener(lx, vx, rx), _whitener(ly, vy, ry)
    u, s, vt = svd(np.swapaxes(wx, 1, 2) @ mxy @ wy, full_matrices=False)
    k = np.minimum(rx, ry)
    side_a = rx <= ry
    proj_a = mxx @ (wx @ u)  # (R, p, m): covariance of canonical variate i with neuron j of A
    proj_b = myy @ (wy @ np.swapaxes(vt, 1, 2))
    alpha = np.where(side_a[:, None], np.abs(proj_a).sum(axis=1), np.abs(proj_b).sum(axis=1))
    take = np.arange(alpha.shape[1])[None, :] < k[:, None]
    alpha = np.where(take, alpha, 0.0)
    total = alpha.sum(axis=1)
    value = (alpha * np.clip(s, 0.0, 1.0)).sum(axis=1)
    return np.where(total > 0, value / np.where(total > 0, total, 1.0), 0.0)
