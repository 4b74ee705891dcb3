"""Ding et al. 2021's sensitivity test of representation dissimilarity metrics: principal-component deletion.

Ding, Denain & Steinhardt 2021, "Grounding Representation Similarity with Statistical Testing" (NeurIPS;
code js-d/sim_metric, ``experiments/pca_deletion``): a metric is *sensitive* when the changes it reports track
changes in function. They delete principal components of one network's representation, measure each metric's
dissimilarity to a reference representation and the change in a linear probe's accuracy, and rank-correlate the
two over the (seed pair, deletion) rows of one layer: Spearman ρ with a one-sided p-value (p/2 when ρ > 0,
else 1 − p/2), Kendall τ likewise, and the failure rate ``bad_frac`` = the fraction of rows the metric ranks
among its 20 % most similar while the accuracy change ranks among its 20 % largest (percentile ranks, ties
averaged). Their gist [lit]: CKA is the least sensitive to deleting low-variance components, Procrustes the
most balanced.

Here, on (samples × units) arrays of one layer of several seeds, with the images split into the probe's
training images and held-out images:

* the deletion basis is the principal components of the deleted seed's training rows; deleting ``k``
  components projects them out of the held-out rows *in the original coordinates*
  (x ↦ x − (x − μ) V_k V_kᵀ), so every metric — Fréchet distance too, which needs the same coordinates — and the
  probe see the same units. Ding et al. keep the remaining components' coordinates (uᵀx, width p − k) and
  rescale by p/(p − k); for the rotation- and scale-invariant metrics (CKA, CCA family, Procrustes, shape
  metrics, RSA) that gives the same values. ``order="low"`` deletes the lowest-variance components first (their
  protocol: keep the top p − k), ``order="high"`` the highest-variance first;
* the probe is multinomial logistic regression (scikit-learn, on standardised units) trained on the *full*
  representation's training rows and evaluated on the held-out rows with k components deleted (the network's
  readout is fixed; Ding et al. retrain a probe per deletion);
* a row (reference seed r, deleted seed s, k) holds each metric's dissimilarity between r's full held-out
  rows and s's with k components deleted, and the functional difference |acc_r(0) − acc_s(k)|. The design
  ``"self"`` uses r = s only (dissimilarity to the original vs the probe's accuracy drop); ``"seeds"`` uses every
  ordered seed pair, r = s included (Ding et al. restrict to pairs containing the seed whose probe is best;
  with a handful of seeds every pair is used).

Dissimilarity is the distance itself, or 1 − similarity (rank statistics only need the order). Values within
1e-10 of each other are ties (rounding noise of an unchanged representation); a metric whose dissimilarity
never moves has no ranking and scores ρ = τ = 0 (p = 0.5) rather than NaN.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .._errors import StageInputError
from ._beyond import rdm_correlation, rsa_arrays
from ._lapack import eigh
from ._registry import Metric, resolve_metrics
from ._uncertainty import _rows_state

__all__ = [
    "principal_components",
    "delete_components",
    "deletion_counts",
    "fit_probe",
    "probe_accuracy",
    "rank_statistics",
    "sensitivity_rows",
    "sensitivity_summary",
    "sensitivity_test",
]

Order = Literal["low", "high"]
_ORDERS = ("low", "high")
_DESIGNS = ("self", "seeds")
_TIE = 1e-10


def principal_components(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of rows x (n, p): ``(mean (p,), basis (p, p) with columns by decreasing variance, variances (p,))``."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise StageInputError(f"PCA needs a (samples ≥ 2, units) matrix; got shape {x.shape}")
    mean = x.mean(axis=0)
    lam, vec = eigh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))
    order = np.argsort(lam)[::-1]
    return mean, vec[:, order], np.maximum(lam[order], 0.0)


def delete_components(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, count: int, order: Order = "low") -> np.ndarray:
    """Rows x (n, p) with ``count`` principal components projected out, in the original coordinates.

    Args:
        x: (n, p) rows.
        mean, basis: from :func:`principal_components` (basis columns by decreasing variance).
        count: components to delete, 0 ≤ count ≤ p.
        order: ``"low"`` deletes the lowest-variance components first, ``"high"`` the highest first.

    Returns:
        (n, p) x − (x − μ) V_d V_dᵀ with V_d the deleted columns (the mean is kept).
    """
    if order not in _ORDERS:
        raise StageInputError(f"unknown deletion order {order!r}; use one of {list(_ORDERS)}")
    x = np.asarray(x, np.float64)
    p = basis.shape[1]
    if not 0 <= count <= p:
        raise StageInputError(f"can delete 0 … {p} components; got {count}")
    if count == 0:
        return x.copy()
    deleted = basis[:, p - count :] if order == "low" else basis[:, :count]
    return x - ((x - mean) @ deleted) @ deleted.T


def deletion_counts(units: int, steps: int) -> np.ndarray:
    """About ``steps`` component counts 0 … units − 1, evenly spaced (never all: a constant representation
    has no defined metric)."""
    if units < 2 or steps < 2:
        raise StageInputError(f"the deletion test needs ≥ 2 units and ≥ 2 steps; got units={units}, steps={steps}")
    return np.unique(np.round(np.linspace(0, units - 1, steps)).astype(int))


def fit_probe(x: np.ndarray, labels: np.ndarray, c: float = 1.0, max_iter: int = 1000):  # type: ignore[no-untyped-def]
    """Multinomial logistic-regression probe on standardised units (scikit-learn ``LogisticRegression``, L2, C)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    if np.unique(labels).size < 2:
        raise StageInputError(f"a probe needs at least 2 classes among its training labels; got {np.unique(labels)}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(x, np.float64), labels)
    return probe


def probe_accuracy(probe, x: np.ndarray, labels: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Fraction of rows of x whose predicted class equals ``labels``."""
    return float(np.mean(probe.predict(np.asarray(x, np.float64)) == np.asarray(labels)))


def _percentile_ranks(v: np.ndarray) -> np.ndarray:
    # scipy.stats.percentileofscore(v, v_i, kind="rank") / 100 for every i: the average rank over ties / n.
    return stats.rankdata(v, method="average") / v.size


def _untie(v: np.ndarray) -> np.ndarray:
    """Merge values within the tie tolerance (rounding noise) before ranking."""
    v = np.asarray(v, np.float64)
    out = v.copy()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    start = 0
    for i in range(1, v.size + 1):
        if i == v.size or sorted_v[i] - sorted_v[start] > _TIE * max(1.0, abs(sorted_v[start])):
            out[order[start:i]] = sorted_v[start]
            start = i
    return out


def rank_statistics(dissimilarity: np.ndarray, functional: np.ndarray) -> dict[str, float]:
    """Ding et al.'s rank statistics of dissimilarities vs functional differences (rows with both finite).

    Returns:
        ``rho, rho_p, tau, tau_p`` (one-sided toward a positive association), ``bad_frac`` and ``rows``;
        ρ = τ = 0, p = 0.5 when either side never moves; all NaN with fewer than 3 rows.
    """
    d = np.asarray(dissimilarity, np.float64)
    f = np.asarray(functional, np.float64)
    keep = np.isfinite(d) & np.isfinite(f)
    d, f = _untie(d[keep]), _untie(f[keep])
    out = {"rho": np.nan, "rho_p": np.nan, "tau": np.nan, "tau_p": np.nan, "bad_frac": np.nan, "rows": int(d.size)}
    if d.size < 3:
        return out
    if np.ptp(d) == 0 or np.ptp(f) == 0:
        out.update(rho=0.0, rho_p=0.5, tau=0.0, tau_p=0.5)
    else:
        for name, fn in (("rho", stats.spearmanr), ("tau", stats.kendalltau)):
            res = fn(d, f)
            r, p = float(res.statistic), float(res.pvalue)
            out[name], out[f"{name}_p"] = r, (p / 2 if r > 0 else 1 - p / 2)
    out["bad_frac"] = float(np.mean((_percentile_ranks(d) < 0.2) & (_percentile_ranks(f) > 0.8)))
    return out


def _rdm_ranks(x: np.ndarray) -> np.ndarray:
    """Centred, unit-norm ranks of the correlation-distance RDM (Spearman ρ = their dot product)."""
    r = stats.rankdata(rdm_correlation(x))
    r = r - r.mean()
    norm = np.linalg.norm(r)
    return r / norm if norm > 0 else r * np.nan


def _values(metrics: Sequence[Metric], x: np.ndarray, y: np.ndarray, rows_limit: int,
            reference_ranks: np.ndarray | None) -> dict[str, float]:
    """Every metric between x and y; RSA (the registry entry) reuses the reference side's RDM ranks."""
    state = None
    out = {}
    for m in metrics:
        if m.moments is not None:
            if state is None:
                state = _rows_state(x, y)
            out[m.name] = float(m.moments(state, "x", "y")[0])
        elif m.rows is rsa_arrays and reference_ranks is not None:
            out[m.name] = float(reference_ranks @ _rdm_ranks(y[:rows_limit]))
        else:
            out[m.name] = float(m.rows(x[:rows_limit], y[:rows_limit]))  # type: ignore[misc]
    return out


def sensitivity_rows(
    reps: Mapping[str, np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    metrics: Sequence[str | Metric] | None = None,
    *,
    orders: Sequence[Order] = ("low", "high"),
    steps: int = 12,
    design: Literal["self", "seeds"] = "seeds",
    rows_limit: int = 300,
) -> pd.DataFrame:
    """The (reference seed, deleted seed, order, components deleted, metric) rows of the deletion test on one layer.

    Args:
        reps: ``{seed: (n, p) rows}`` of one layer, the same n images in the same order for every seed.
        labels: (n,) class labels of the images.
        train: (n,) bool, True for the probe's (and the PCA's) training images, False for held-out images.
        metrics: registry names or :class:`Metric` entries (default every registered metric).
        orders: deletion orders (``"low"``: lowest-variance components first, Ding et al.; ``"high"``).
        steps: about how many deletion counts 0 … p − 1 (:func:`deletion_counts`).
        design: ``"self"`` (reference = the deleted seed) or ``"seeds"`` (every ordered pair, self included).
        rows_limit: at most this many held-out rows for metrics computed from rows (RSA is O(rows²)).

    Returns:
        DataFrame ``reference, deleted, order, components, variance_deleted, metric, metric_kind, value,
        dissimilarity, accuracy_full, accuracy_deleted, accuracy_drop, functional`` with accuracy_full = the
        deleted seed's probe on its full held-out rows, accuracy_drop = accuracy_full − accuracy_deleted and
        functional = |acc_reference(0) − accuracy_deleted|.
    """
    if design not in _DESIGNS:
        raise StageInputError(f"unknown design {design!r}; use one of {list(_DESIGNS)}")
    chosen = resolve_metrics(None) if metrics is None else [
        m if isinstance(m, Metric) else resolve_metrics([m])[0] for m in metrics]
    if not chosen:
        raise StageInputError("the deletion test needs at least one metric; got an empty list")
    labels = np.asarray(labels).reshape(-1)
    train = np.asarray(train, bool).reshape(-1)
    seeds = list(reps)
    if not seeds:
        raise StageInputError("the deletion test needs the representation of at least one seed")
    arrays = {s: np.asarray(reps[s], np.float64) for s in seeds}
    shapes = {s: a.shape for s, a in arrays.items()}
    n = labels.size
    if any(a.ndim != 2 or a.shape[0] != n for a in arrays.values()) or train.size != n:
        raise StageInputError(f"every seed needs (n, units) rows of the same {n} images as labels and train; got "
                              f"{shapes}, train of {train.size}")
    held = ~train
    if train.sum() < 2 or held.sum() < 4:
        raise StageInputError(f"the deletion test needs ≥ 2 training and ≥ 4 held-out images; got {int(train.sum())} "
                              f"and {int(held.sum())}. Use more images")
    for order in orders:
        if order not in _ORDERS:
            raise StageInputError(f"unknown deletion order {order!r}; use one of {list(_ORDERS)}")
    probes, full_acc, pcs = {}, {}, {}
    for s in seeds:
        probes[s] = fit_probe(arrays[s][train], labels[train])
        full_acc[s] = probe_accuracy(probes[s], arrays[s][held], labels[held])
        pcs[s] = principal_components(arrays[s][train])
    ranks = ({s: _rdm_ranks(arrays[s][held][:rows_limit]) for s in seeds}
             if any(m.rows is rsa_arrays for m in chosen) else {})
    pairs = [(s, s) for s in seeds] if design == "self" else [(r, s) for r in seeds for s in seeds]
    rows = []
    for s in seeds:
        mean, basis, variances = pcs[s]
        total = variances.sum()
        heldout_s = arrays[s][held]
        for order in orders:
            for count in deletion_counts(basis.shape[1], steps):
                deleted = delete_components(heldout_s, mean, basis, int(count), order)
                acc = probe_accuracy(probes[s], deleted, labels[held])
                gone = variances[basis.shape[1] - count :] if order == "low" else variances[:count]
                fraction = float(gone.sum() / total) if count and total > 0 else 0.0
                for r in (r for r, t in pairs if t == s):
                    values = _values(chosen, arrays[r][held], deleted, rows_limit, ranks.get(r))
                    for name, value in values.items():
                        kind = next(m.kind for m in chosen if m.name == name)
                        rows.append({
                            "reference": r, "deleted": s, "order": order, "components": int(count),
                            "variance_deleted": fraction, "metric": name, "metric_kind": kind, "value": value,
                            "dissimilarity": value if kind == "distance" else 1.0 - value,
                            "accuracy_full": full_acc[s], "accuracy_deleted": acc,
                            "accuracy_drop": full_acc[s] - acc, "functional": abs(full_acc[r] - acc),
                        })
    return pd.DataFrame(rows)


def sensitivity_summary(rows: pd.DataFrame, design: Literal["self", "seeds"] = "self") -> pd.DataFrame:
    """Rank statistics per (order, metric) of :func:`sensitivity_rows` output.

    ``design="self"`` keeps only rows whose reference is the deleted seed; ``"seeds"`` uses every row.

    Returns:
        DataFrame ``order, metric, metric_kind, rho, rho_p, tau, tau_p, bad_frac, rows`` in first-appearance order.
    """
    if design not in _DESIGNS:
        raise StageInputError(f"unknown design {design!r}; use one of {list(_DESIGNS)}")
    if rows.empty:
        return pd.DataFrame(columns=["order", "metric", "metric_kind", "rho", "rho_p", "tau", "tau_p", "bad_frac", "rows"])
    sub = rows[rows.reference == rows.deleted] if design == "self" else rows
    out = []
    for (order, metric), group in sub.groupby(["order", "metric"], sort=False):
        out.append({"order": order, "metric": metric, "metric_kind": group.metric_kind.iloc[0],
                    **rank_statistics(group.dissimilarity.to_numpy(), group.functional.to_numpy())})
    return pd.DataFrame(out)


def sensitivity_test(
    layers: Mapping[str, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    train: np.ndarray,
    metrics: Sequence[str | Metric] | None = None,
    *,
    orders: Sequence[Order] = ("low", "high"),
    steps: int = 12,
    rows_limit: int = 300,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole test on several layers: :func:`sensitivity_rows` (design ``"seeds"``, which holds the ``"self"``
    rows) per layer and :func:`sensitivity_summary` for both designs, as NaN-free tables for the cache.

    Args:
        layers: ``{layer: {seed: (n, p) rows}}``.
        labels, train, metrics, orders, steps, rows_limit: as :func:`sensitivity_rows`.

    Returns:
        ``(summary, rows)``: summary ``layer, design, order, metric, metric_kind, rho, rho_p, tau, tau_p,
        bad_frac, rows, defined``; rows as :func:`sensitivity_rows` with ``layer`` first and ``valid`` after
        ``value``. Undefined cells are 0 and flagged False.
    """
    try:  # one BLAS thread: results bit-identical in-process and on single-threaded workers (and faster here)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limit = contextlib.nullcontext()
    else:
        limit = threadpool_limits(limits=1)
    with limit:
        return _sensitivity_test(layers, labels, train, metrics, orders, steps, rows_limit)


def _sensitivity_test(layers: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray, train: np.ndarray,
                      metrics: Sequence[str | Metric] | None, orders: Sequence[Order], steps: int,
                      rows_limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    details, summaries = [], []
    for layer, reps in layers.items():
        table = sensitivity_rows(reps, labels, train, metrics, orders=orders, steps=steps, design="seeds",
                                 rows_limit=rows_limit)
        table.insert(0, "layer", layer)
        details.append(table)
        for design in _DESIGNS:
            summary = sensitivity_summary(table, design)
            summary.insert(0, "design", design)
            summary.insert(0, "layer", layer)
            summaries.append(summary)
    detail = pd.concat(details, ignore_index=True)
    detail.insert(detail.columns.get_loc("value") + 1, "valid", np.isfinite(detail["value"].to_numpy(float)))
    for column in ("value", "dissimilarity"):
        detail[column] = np.nan_to_num(detail[column].to_numpy(float), nan=0.0, posinf=0.0, neginf=0.0)
    summary = pd.concat(summaries, ignore_index=True)
    summary["defined"] = np.isfinite(summary["rho"].to_numpy(float))
    for column in ("rho", "rho_p", "tau", "tau_p", "bad_frac"):
        summary[column] = np.nan_to_num(summary[column].to_numpy(float), nan=0.0)
    return summary, detail
