"""SVD and symmetric eigen-decomposition that do not give up where LAPACK's fast driver does.

``numpy.linalg.svd`` calls LAPACK's divide-and-conquer ``gesdd``, which on rare, perfectly finite,
rank-deficient matrices stops with "SVD did not converge" (a known LAPACK/OpenBLAS behaviour; seen here on a
128 × 128 whitened cross-covariance of a principal-component-deleted layer in Ding et al.'s deletion test, where
the QR-iteration driver ``gesvd`` succeeds on the same bytes). ``numpy.linalg.eigh``'s ``syevd`` can fail the
same way. One failed factorisation would abort a whole run, so every comparison metric factorises through
:func:`svd` and :func:`eigh`:

* the normal path *is* numpy's call (``pinv`` too, whose SVD is ``gesdd`` as well), so results are bit-identical to ``numpy.linalg`` wherever it converges;
* on ``LinAlgError`` the same matrix (each matrix of a stack) goes to scipy's slower, more robust driver
  (``gesvd`` for the SVD, ``syevr`` / ``syev`` for ``eigh``), with numpy's output conventions (descending singular
  values, ascending eigenvalues, the same shapes); a matrix that holds NaN or inf still raises.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["svd", "eigh", "pinv"]


def _finite_or_raise(matrix: np.ndarray, what: str) -> None:
    if not np.isfinite(matrix).all():
        raise np.linalg.LinAlgError(f"{what}: the matrix holds NaN or inf")


def _svd_gesvd(matrix: np.ndarray, full_matrices: bool, compute_uv: bool):
    """scipy's ``gesvd`` on each matrix of a stack (..., m, n), shaped as ``numpy.linalg.svd`` returns."""
    _finite_or_raise(matrix, "svd")
    lead, (m, n) = matrix.shape[:-2], matrix.shape[-2:]
    flat = matrix.reshape((-1, m, n))
    parts = [scipy.linalg.svd(x, full_matrices=full_matrices, compute_uv=compute_uv, lapack_driver="gesvd",
                              check_finite=False) for x in flat]
    if not compute_uv:
        return np.stack(parts).reshape(lead + (min(m, n),)) if parts else np.zeros(lead + (min(m, n),))
    u, s, vt = (np.stack([p[i] for p in parts]) for i in range(3))
    return u.reshape(lead + u.shape[1:]), s.reshape(lead + s.shape[1:]), vt.reshape(lead + vt.shape[1:])


def svd(matrix: np.ndarray, full_matrices: bool = True, compute_uv: bool = True):
    """``numpy.linalg.svd(matrix, full_matrices, compute_uv)`` for a matrix or a stack (..., m, n); where
    ``gesdd`` does not converge, LAPACK's ``gesvd`` on the same matrices (see the module docstring)."""
    try:
        return np.linalg.svd(matrix, full_matrices=full_matrices, compute_uv=compute_uv)
    except np.linalg.LinAlgError:
        return _svd_gesvd(np.asarray(matrix), full_matrices, compute_uv)


def _eigh_scipy(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _finite_or_raise(matrix, "eigh")
    lead, p = matrix.shape[:-2], matrix.shape[-1]
    values, vectors = [], []
    for x in matrix.reshape((-1, p, p)):
        try:
            lam, vec = scipy.linalg.eigh(x, driver="evr", check_finite=False)
        except np.linalg.LinAlgError:
            lam, vec = scipy.linalg.eigh(x, driver="ev", check_finite=False)
        values.append(lam)
        vectors.append(vec)
    if not values:
        return np.zeros(lead + (p,)), np.zeros(lead + (p, p))
    return np.stack(values).reshape(lead + (p,)), np.stack(vectors).reshape(lead + (p, p))


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.linalg.eigh(matrix)`` (lower triangle) for a symmetric matrix or a stack (..., p, p); where
    ``syevd`` does not converge, scipy's ``syevr`` (then ``syev``) on the same matrices."""
    try:
        return np.linalg.eigh(matrix)
    except np.linalg.LinAlgError:
        return _eigh_scipy(np.asarray(matrix))


def pinv(matrix: np.ndarray) -> np.ndarray:
    """``numpy.linalg.pinv(matrix)`` (default cut-off: singular values ≤ 1e-15 · s_max are dropped) of one matrix;
    where ``gesdd`` does not converge, the same pseudo-inverse from LAPACK's ``gesvd``."""
    try:
        return np.linalg.pinv(matrix)
    except np.linalg.LinAlgError:
        u, s, vt = _svd_gesvd(np.asarray(matrix, dtype=np.float64), False, True)
        keep = s > 1e-15 * (s.max() if s.size else 0.0)
        return (vt.T * np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)) @ u.T
