"""The registry of similarity/distance metrics usable in layer × layer tables with uncertainty.

Each entry names one scalar metric of two channel blocks, says whether larger means more similar
(``"similarity"``) or less (``"distance"``), and gives its function of stacked moment states (vectorised over
replicates, see :mod:`._beyond`) — or, for RSA, of per-sample rows only. Users select metrics by name
(``--metrics``, ``[similarity].metrics``); :func:`resolve_metrics` validates a selection.

Moment-based: linear_cka, debiased_cka, cca_mean, svcca, pwcca (google/svcca's convention), pwcca_morcos (the
paper's canonical-variate weights), procrustes, shape_alpha1, shape_alpha0.5, shape_alpha0, frechet.
Rows only: rsa.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from .._errors import StageInputError
from ._beyond import (
    debiased_cka_moments,
    frechet_moments,
    linear_cka_moments,
    procrustes_moments,
    rsa_arrays,
    shape_metric_moments,
)
from ._cca_batched import cca_mean_batched, pwcca_morcos_batched, svcca_batched
from ._grouped import MomentState
from ._pwcca_google import pwcca_google_from_moments
from ._threads import one_blas_thread

__all__ = ["Metric", "REGISTRY", "DEFAULT_METRICS", "resolve_metrics"]


@dataclass(frozen=True)
class Metric:
    """One registered metric."""

    name: str
    kind: str  #: "similarity" (higher = more alike) or "distance"
    description: str
    moments: Callable[[MomentState, str, str], np.ndarray] | None = None  #: (R,) values from moment states
    rows: Callable[[np.ndarray, np.ndarray], float] | None = None  #: value from per-sample rows (RSA)

    def similarity_sign(self) -> float:
        """+1 for similarities, −1 for distances (so that larger × sign = more alike)."""
        return 1.0 if self.kind == "similarity" else -1.0


def _per_replicate(fn: Callable[..., float]) -> Callable[[MomentState, str, str], np.ndarray]:
    """Lift a function of covariance blocks (one replicate) to stacked states; NaN where n < 2."""

    def lifted(state: MomentState, a: str, b: str) -> np.ndarray:
        with one_blas_thread():
            return _loop(state, a, b)

    def _loop(state: MomentState, a: str, b: str) -> np.ndarray:
        sa, sb = state.block(a), state.block(b)
        out = np.full(state.n.size, np.nan)
        for r in range(state.n.size):
            if state.n[r] >= 2:
                m = state.m2[r]
                out[r] = fn(m[sa, sa], m[sb, sb], m[sa, sb], mean_a=state.mean[r, sa], mean_b=state.mean[r, sb],
                            n=int(state.n[r]))
        return out

    return lifted


def _batched(fn: Callable[..., np.ndarray]) -> Callable[[MomentState, str, str], np.ndarray]:
    """Lift a batched function of scatter blocks to stacked states; NaN where n < 2."""

    def lifted(state: MomentState, a: str, b: str) -> np.ndarray:
        sa, sb = state.block(a), state.block(b)
        m = state.m2
        spectra = (state.spectrum(a), state.spectrum(b))
        return np.where(state.n >= 2, fn(m[:, sa, sa], m[:, sb, sb], m[:, sa, sb], spectra=spectra), np.nan)

    return lifted


def _pwcca_google(aa, bb, ab, *, mean_a, mean_b, n):  # type: ignore[no-untyped-def]
    return pwcca_google_from_moments(n, mean_a, mean_b, aa, bb, ab).value


_ENTRIES = [
    Metric("linear_cka", "similarity", "linear CKA (Kornblith et al. 2019), biased HSIC", moments=linear_cka_moments),
    Metric("debiased_cka", "similarity", "linear CKA with the unbiased HSIC (Song et al. 2012)",
           moments=debiased_cka_moments),
    Metric("cca_mean", "similarity", "mean canonical correlation ρ̄", moments=_batched(cca_mean_batched)),
    Metric("svcca", "similarity", "SVCCA ρ̄ (99% of singular-value mass per side)", moments=_batched(svcca_batched)),
    Metric("pwcca", "similarity", "PWCCA, google/svcca compute_pwcca convention", moments=_per_replicate(_pwcca_google)),
    Metric("pwcca_morcos", "similarity", "PWCCA, canonical-variate weights (paper text)",
           moments=_batched(pwcca_morcos_batched)),
    Metric("procrustes", "distance", "orthogonal Procrustes distance 2 − 2‖M_xy‖_*/√(tr·tr) (Ding et al. 2021)",
           moments=procrustes_moments),
    Metric("shape_alpha1", "distance", "angular shape metric α=1 (netrep; angular Procrustes), radians",
           moments=partial(shape_metric_moments, alpha=1.0)),
    Metric("shape_alpha0.5", "distance", "angular shape metric α=0.5 (netrep), radians",
           moments=partial(shape_metric_moments, alpha=0.5)),
    Metric("shape_alpha0", "distance", "angular shape metric α=0 (netrep; CCA-like), radians",
           moments=partial(shape_metric_moments, alpha=0.0)),
    Metric("frechet", "distance", "squared Fréchet distance of the Gaussian fits (same width only)",
           moments=frechet_moments),
    Metric("rsa", "similarity", "RSA: Spearman ρ of correlation-distance RDMs on the fixed subset", rows=rsa_arrays),
]

#: name → :class:`Metric`, in display order.
REGISTRY: dict[str, Metric] = {m.name: m for m in _ENTRIES}

#: The default selection: every registered metric.
DEFAULT_METRICS: tuple[str, ...] = tuple(REGISTRY)


def resolve_metrics(names: Sequence[str] | str | None) -> list[Metric]:
    """Validate a metric selection (names, a comma-separated string, or None = all) → registry entries."""
    if names is None:
        return list(REGISTRY.values())
    if isinstance(names, str):
        names = names.split(",")
    chosen = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown or not chosen:
        raise StageInputError(f"unknown metric(s) {unknown or chosen}; choose from {list(REGISTRY)}")
    return [REGISTRY[n] for n in dict.fromkeys(chosen)]
