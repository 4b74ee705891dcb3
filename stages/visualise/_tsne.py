"""t-SNE of per-image representations (van der Maaten & Hinton 2008), seeded and deterministic.

``p_j|i ∝ exp(−‖x_i − x_j‖² / 2σ_i²)`` with σ_i set so the entropy of ``P(·|i)`` is ``ln(perplexity)``;
``p_ij = (p_j|i + p_i|j) / 2N``; ``q_ij ∝ (1 + ‖y_i − y_j‖²)⁻¹``; minimise KL(P‖Q). Inter-cluster distances
and cluster sizes carry no meaning; compare embeddings only at equal perplexity, init and seed.

Two backends: scikit-learn's Barnes–Hut ``TSNE`` (always available) and openTSNE (optional; FFT-accelerated
interpolation). ``"auto"`` uses openTSNE when installed and the set is at least ``OPENTSNE_FROM`` points
(measured: see the README's visualisation section), else scikit-learn. Both use PCA initialisation and
``random_state = seed``.
"""

from __future__ import annotations

import numpy as np

from .._errors import StageInputError
from .._stage_visualise import OPENTSNE_FROM

__all__ = ["tsne_embedding", "opentsne_available", "OPENTSNE_FROM"]


def opentsne_available() -> bool:
    try:
        import openTSNE  # noqa: F401
    except Exception:
        return False
    return True


def tsne_embedding(features: np.ndarray, *, perplexity: float = 30.0, seed: int = 0, method: str = "sklearn",
                   max_iter: int = 1000) -> np.ndarray:
    """``(N, 2)`` float64 t-SNE embedding of ``(N, D)`` features (standardised per column first).

    Args:
        features: one row per image (e.g. spatially pooled unit activations).
        perplexity: effective neighbours; must be < N (reduced to (N − 1) / 3 for tiny sets).
        seed: ``random_state`` of the backend.
        method: ``"sklearn"``, ``"opentsne"`` or ``"auto"``.
        max_iter: optimisation iterations (scikit-learn's default 1000; openTSNE runs 250 early-exaggeration
            plus ``max_iter − 250``).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise StageInputError(f"t-SNE needs (N ≥ 4, D) features; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise StageInputError("t-SNE: features contain NaN/inf; fix the extraction")
    if method not in ("sklearn", "opentsne", "auto"):
        raise StageInputError(f"t-SNE method must be 'sklearn', 'opentsne' or 'auto'; got {method!r}")
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    perplexity = float(min(perplexity, (x.shape[0] - 1) / 3))
    if method == "auto":
        method = "opentsne" if opentsne_available() and x.shape[0] >= OPENTSNE_FROM else "sklearn"
    if method == "opentsne":
        if not opentsne_available():
            raise StageInputError("t-SNE method 'opentsne' needs the openTSNE package: pip install openTSNE "
                                  "(or use method = 'sklearn')")
        from openTSNE import TSNE as OpenTSNE

        emb = OpenTSNE(n_components=2, perplexity=perplexity, initialization="pca", random_state=int(seed),
                       n_iter=max(1, int(max_iter) - 250), n_jobs=1, verbose=False).fit(x)
        return np.asarray(emb, dtype=np.float64)
    from sklearn.manifold import TSNE

    try:
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=int(seed),
                    max_iter=int(max_iter))
    except TypeError:  # scikit-learn < 1.5 calls it n_iter
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=int(seed),
                    n_iter=int(max_iter))
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)
