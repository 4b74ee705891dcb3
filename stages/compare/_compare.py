"""One call per (model pair, layer pair): every comparison metric from the train and held-out joint moments.

The constraint: the pipeline stage holds only two :class:`JointMoments` (train split, held-out split) per layer
pair, so :func:`compare_moments` derives everything from them and returns plain pandas tables the stage saves as
Parquet. Similarity metrics (correlation, matchings, CCA family, CKA) use the merged moments of both splits by
default (more samples); regression is fitted on the train split and scored on the held-out split.

:func:`compare_arrays` is the same computation for users who already hold two (samples × units) arrays (the
``repdissect compare A.npy B.npy`` command): it splits the rows into train/held-out at random, accumulates the
moments and returns the ``metric, value`` table.

Tables of :func:`compare_moments` (only those of the requested metric groups are present):

``units``               side ("a"/"b"), unit, mean, std, dead, within_max_corr, within_partner
``correlation``         unit_a, unit_b, corr — between-net correlation, Ca·Cb rows            [correlation]
``within_correlation``  net ("a"/"b"), unit_i, unit_j, corr — within-net pairs with i < j        [correlation]
``matches``             method, unit_a, unit_b, corr, rank — methods semi_a_to_b, semi_b_to_a,
                        hungarian, bottleneck; rank 0 = highest corr within the method           [matching]
``hopcroft_karp``       threshold, matched, max_possible, fraction                              [matching]
``regression``          alpha, direction, heldout_loss, train_loss, mean_nonzero, n_targets,
                        n_inputs, converged, sweeps — one row per (direction, α)               [regression]
``cca``                 index, corr, pwcca_weight — all canonical correlations and the paper-form
                        PWCCA weights (pwcca_morcos)                             [cca or pwcca_morcos]
``svcca``               index, corr — canonical correlations of the SVD-reduced subspaces           [svcca]
``pwcca``               index, corr, weight — google/svcca's PWCCA directions (side in metrics)     [pwcca]
``metrics``             metric, value — every scalar below, long form (what the CLI prints)
``summary``             the same scalars as one wide row (columns = metric names)

Scalars (float values; the group that produces them in brackets):

* always: n_train, n_heldout, units_a, units_b, dead_units_a, dead_units_b
* [correlation or matching]: within_a_mean_max_corr, within_b_mean_max_corr (Li et al.'s within-net baseline)
* [matching]: semi_a_to_b_mean_corr, semi_b_to_a_mean_corr, hungarian_mean_corr, semi_hungarian_agreement
  (fraction of A's units whose semi-matching partner is their Hungarian partner), bottleneck_threshold,
  bottleneck_mean_corr, hk_matched_t<t> per threshold (e.g. hk_matched_t0.5)
* [cca]: cca_mean, cca_dims_a, cca_dims_b — [svcca]: svcca_mean, svcca_dims_a, svcca_dims_b — [pwcca]: pwcca —
  [linear_cka]: linear_cka — [pwcca_morcos]: pwcca_morcos (the paper's canonical-variate weights);
  ``pwcca`` is google/svcca's ``compute_pwcca`` convention (:mod:`._pwcca_google`), with pwcca_side (0 = A, 1 = B)
* [regression], for <dir> in a_from_b, b_from_a: lstsq_heldout_loss_<dir>, lstsq_mean_nonzero_<dir> (α = 0) and
  lasso_alpha<α>_heldout_loss_<dir>, lasso_alpha<α>_mean_nonzero_<dir> (e.g. lasso_alpha0.01_heldout_loss_a_from_b)
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd

from .._errors import StageInputError
from ._cca import cca_family, linear_cka_from_covariance
from ._correlation import correlation_from_covariance, dead_units, within_net_max_correlation
from ._matching import Matching, bottleneck_matching, hungarian_matching, matched_counts, semi_matching
from ._moments import JointMoments
from ._pwcca_google import pwcca_google_from_moments
from ._regression import DEFAULT_ALPHAS, regression_from_moments
from ._threads import with_one_blas_thread

__all__ = ["METRICS", "DEFAULT_THRESHOLDS", "compare_moments", "compare_arrays"]

#: Metric groups accepted by ``metrics=``.
METRICS: tuple[str, ...] = (
    "correlation", "matching", "regression", "cca", "svcca", "pwcca", "pwcca_morcos", "linear_cka"
)

#: Default correlation thresholds for the Hopcroft–Karp matched-pair counts.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check_metrics(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = [str(m).strip() for m in metrics if str(m).strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise StageInputError(f"unknown metric(s) {unknown or chosen}; choose from {list(METRICS)}")
    return [m for m in METRICS if m in chosen]


def _number(value: float) -> str:
    return f"{value:g}"


def _matches_frame(named: Sequence[tuple[str, Matching]]) -> pd.DataFrame:
    frames = []
    for method, matching in named:
        order = np.lexsort((matching.unit_a, -matching.corr))
        rank = np.empty(len(matching), dtype=np.int64)
        rank[order] = np.arange(len(matching))
        frames.append(
            pd.DataFrame(
                {
                    "method": method,
                    "unit_a": matching.unit_a.astype(np.int64),
                    "unit_b": matching.unit_b.astype(np.int64),
                    "corr": matching.corr,
                    "rank": rank,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@with_one_blas_thread  # every read-out is eigh/SVD/products of C × C blocks (see ._threads)
def compare_moments(
    train: JointMoments,
    heldout: JointMoments | None = None,
    *,
    metrics: Sequence[str] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    svcca_keep: float = 0.99,
    svcca_convention: Literal["singular_values", "variance"] = "singular_values",
    eps: float = 1e-10,
    dead_tol: float = 1e-10,
    similarity_on: Literal["all", "train"] = "all",
    lasso_tol: float = 1e-6,
    max_sweeps: int = 2000,
    correlation_tables: bool = True,
    pwcca_epsilon: float = 0.0,
) -> dict[str, pd.DataFrame]:
    """All comparison metrics of one layer pair from its train and held-out joint moments.

    Args:
        train: joint moments of the training split, A = (Ca) channels, B = (Cb) channels.
        heldout: joint moments of the held-out split (needed for ``"regression"``; ``None`` or empty to skip).
        metrics: metric groups from :data:`METRICS` (default all).
        alphas: regression α path on standardised channels; 0 = least squares.
        thresholds: correlation thresholds for the Hopcroft–Karp counts.
        svcca_keep, svcca_convention: SVCCA truncation (see :func:`svcca_from_covariance`).
        eps: relative eigenvalue floor for the CCA family.
        dead_tol: dead-unit tolerance (see :func:`dead_units`).
        similarity_on: ``"all"`` uses train ⊕ held-out moments for the similarity metrics, ``"train"`` only train.
        lasso_tol, max_sweeps: coordinate-descent stopping rule.
        correlation_tables: include the long ``correlation``/``within_correlation`` tables (large for fc layers).
        pwcca_epsilon: google/svcca's ``epsilon`` for ``pwcca`` (neurons with scaled variance < ε dropped, ε·I added).

    Returns:
        Dict of DataFrames, documented in the module docstring.
    """
    groups = _check_metrics(metrics)
    if not isinstance(train, JointMoments):
        raise StageInputError(f"train must be a JointMoments; got {type(train).__name__}")
    if heldout is not None and (heldout.ca, heldout.cb) != (train.ca, train.cb):
        raise StageInputError(
            f"train moments are ({train.ca}, {train.cb}) channels but held-out moments ({heldout.ca}, {heldout.cb})"
        )
    if heldout is not None and heldout.n == 0:
        heldout = None
    if "regression" in groups and heldout is None:
        raise StageInputError(
            "metric 'regression' is scored on held-out data but no held-out moments were given; "
            "pass heldout=JointMoments(...) or drop 'regression' from metrics"
        )
    if similarity_on not in ("all", "train"):
        raise StageInputError(f"similarity_on must be 'all' or 'train'; got {similarity_on!r}")
    moments = train.copy().merge(heldout) if (heldout is not None and similarity_on == "all") else train
    if moments.n < 2:
        raise StageInputError(f"comparison needs at least 2 samples; the moments hold n={moments.n}")

    ca, cb = train.ca, train.cb
    tables: dict[str, pd.DataFrame] = {}
    scalars: dict[str, float] = {
        "n_train": float(train.n),
        "n_heldout": float(heldout.n if heldout is not None else 0),
        "units_a": float(ca),
        "units_b": float(cb),
    }
    cov = moments.covariance(ddof=0)
    mean = moments.mean
    variance = np.maximum(np.diag(cov), 0.0)
    dead = dead_units(variance, mean, dead_tol)
    dead_a, dead_b = dead[:ca], dead[ca:]
    scalars["dead_units_a"] = float(dead_a.sum())
    scalars["dead_units_b"] = float(dead_b.sum())

    corr = correlation_from_covariance(cov, mean, dead_tol=dead_tol)
    corr_ab = corr[:ca, ca:]
    within_a, partner_a = within_net_max_correlation(corr[:ca, :ca], dead_a)
    within_b, partner_b = within_net_max_correlation(corr[ca:, ca:], dead_b)
    tables["units"] = pd.DataFrame(
        {
            "side": np.r_[np.full(ca, "a"), np.full(cb, "b")],
            "unit": np.r_[np.arange(ca), np.arange(cb)].astype(np.int64),
            "mean": mean,
            "std": np.sqrt(variance),
            "dead": dead,
            "within_max_corr": np.r_[within_a, within_b],
            "within_partner": np.r_[partner_a, partner_b],
        }
    )

    if {"correlation", "matching"} & set(groups):
        # Li et al.'s within-net baseline: how well a unit is matched by another unit of its own net.
        scalars["within_a_mean_max_corr"] = float(within_a[~dead_a].mean()) if (~dead_a).any() else 0.0
        scalars["within_b_mean_max_corr"] = float(within_b[~dead_b].mean()) if (~dead_b).any() else 0.0
    if "correlation" in groups:
        if correlation_tables:
            tables["correlation"] = pd.DataFrame(
                {
                    "unit_a": np.repeat(np.arange(ca, dtype=np.int64), cb),
                    "unit_b": np.tile(np.arange(cb, dtype=np.int64), ca),
                    "corr": corr_ab.ravel(),
                }
            )
            parts = []
            for net, block in (("a", corr[:ca, :ca]), ("b", corr[ca:, ca:])):
                i, j = np.triu_indices(block.shape[0], k=1)
                parts.append(
                    pd.DataFrame(
                        {"net": net, "unit_i": i.astype(np.int64), "unit_j": j.astype(np.int64), "corr": block[i, j]}
                    )
                )
            tables["within_correlation"] = pd.concat(parts, ignore_index=True)

    if "matching" in groups:
        alive_a, alive_b = ~dead_a, ~dead_b
        semi_ab = semi_matching(corr_ab, alive_a, alive_b)
        semi_ba_raw = semi_matching(corr_ab.T, alive_b, alive_a)
        semi_ba = Matching(semi_ba_raw.unit_b, semi_ba_raw.unit_a, semi_ba_raw.corr)
        hungarian = hungarian_matching(corr_ab, alive_a, alive_b)
        bottleneck_t, bottleneck = bottleneck_matching(corr_ab, alive_a, alive_b)
        tables["matches"] = _matches_frame(
            [("semi_a_to_b", semi_ab), ("semi_b_to_a", semi_ba), ("hungarian", hungarian), ("bottleneck", bottleneck)]
        )
        thresholds_arr = np.asarray(list(thresholds), dtype=np.float64)
        counts = matched_counts(corr_ab, thresholds_arr, alive_a, alive_b)
        possible = int(min(alive_a.sum(), alive_b.sum()))
        tables["hopcroft_karp"] = pd.DataFrame(
            {
                "threshold": thresholds_arr,
                "matched": counts,
                "max_possible": np.full(counts.size, possible, dtype=np.int64),
                "fraction": counts / possible if possible else np.zeros(counts.size),
            }
        )
        partner = dict(zip(hungarian.unit_a.tolist(), hungarian.unit_b.tolist()))
        agree = [partner.get(ua) == ub for ua, ub in zip(semi_ab.unit_a.tolist(), semi_ab.unit_b.tolist())]
        scalars.update(
            {
                "semi_a_to_b_mean_corr": semi_ab.mean,
                "semi_b_to_a_mean_corr": semi_ba.mean,
                "hungarian_mean_corr": hungarian.mean,
                "semi_hungarian_agreement": float(np.mean(agree)) if agree else 0.0,
                "bottleneck_threshold": bottleneck_t,
                "bottleneck_mean_corr": bottleneck.mean,
            }
        )
        for t, count in zip(thresholds_arr, counts):
            scalars[f"hk_matched_t{_number(t)}"] = float(count)

    cov_aa, cov_bb, cov_ab = cov[:ca, :ca], cov[ca:, ca:], cov[:ca, ca:]
    if "pwcca" in groups:
        m2 = moments.comoment
        google = pwcca_google_from_moments(
            moments.n, mean[:ca], mean[ca:], m2[:ca, :ca], m2[ca:, ca:], m2[:ca, ca:], epsilon=pwcca_epsilon
        )
        scalars["pwcca"] = google.value
        scalars["pwcca_side"] = 0.0 if google.side == "a" else 1.0
        tables["pwcca"] = pd.DataFrame(
            {"index": np.arange(google.corrs.size, dtype=np.int64), "corr": google.corrs, "weight": google.weights}
        )
    if {"cca", "svcca", "pwcca_morcos"} & set(groups):
        full, sv, pw = cca_family(
            cov_aa, cov_bb, cov_ab, keep=svcca_keep, convention=svcca_convention, eps=eps
        )
        if "cca" in groups or "pwcca_morcos" in groups:
            tables["cca"] = pd.DataFrame(
                {"index": np.arange(pw.corrs.size, dtype=np.int64), "corr": pw.corrs, "pwcca_weight": pw.weights}
            )
        if "cca" in groups:
            scalars.update(
                {"cca_mean": full.mean, "cca_dims_a": float(full.dims_a), "cca_dims_b": float(full.dims_b)}
            )
        if "pwcca_morcos" in groups:
            scalars["pwcca_morcos"] = pw.value
        if "svcca" in groups:
            tables["svcca"] = pd.DataFrame({"index": np.arange(sv.corrs.size, dtype=np.int64), "corr": sv.corrs})
            scalars.update(
                {"svcca_mean": sv.mean, "svcca_dims_a": float(sv.dims_a), "svcca_dims_b": float(sv.dims_b)}
            )
    if "linear_cka" in groups:
        scalars["linear_cka"] = linear_cka_from_covariance(cov_aa, cov_bb, cov_ab)

    if "regression" in groups:
        assert heldout is not None
        rows = []
        for direction in ("a_from_b", "b_from_a"):
            result = regression_from_moments(
                train, heldout, alphas, direction=direction, tol=lasso_tol, max_sweeps=max_sweeps, dead_tol=dead_tol
            )
            n_targets = result.targets.size
            for k, alpha in enumerate(result.alphas):
                loss = float(result.heldout_loss[k].mean()) if n_targets else 0.0
                used = float(result.nonzero[k].mean()) if n_targets else 0.0
                rows.append(
                    {
                        "alpha": float(alpha),
                        "direction": direction,
                        "heldout_loss": loss,
                        "train_loss": float(result.train_loss[k].mean()) if n_targets else 0.0,
                        "mean_nonzero": used,
                        "n_targets": int(n_targets),
                        "n_inputs": int(result.inputs.size),
                        "converged": bool(result.converged[k]),
                        "sweeps": int(result.sweeps[k]),
                    }
                )
                name = "lstsq" if alpha == 0 else f"lasso_alpha{_number(alpha)}"
                scalars[f"{name}_heldout_loss_{direction}"] = loss
                scalars[f"{name}_mean_nonzero_{direction}"] = used
        tables["regression"] = pd.DataFrame(rows)

    tables["metrics"] = pd.DataFrame({"metric": list(scalars), "value": [float(v) for v in scalars.values()]})
    tables["summary"] = pd.DataFrame([scalars])
    return tables


def _accumulate(a: np.ndarray, b: np.ndarray, rows: np.ndarray, chunk: int = 65536) -> JointMoments:
    """Joint moments of the given rows, in chunks so the float64 working copy stays small."""
    moments = JointMoments(a.shape[1], b.shape[1])
    for start in range(0, rows.size, chunk):
        part = rows[start : start + chunk]
        moments.update(a[part], b[part])
    return moments


def compare_arrays(
    a: np.ndarray,
    b: np.ndarray,
    metrics: Sequence[str] | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    groups: int = 10,
    permutations: int = 99,
    subset: int = 500,
    **options: object,
) -> pd.DataFrame:
    """Compare two (samples × units) activation arrays; the ``repdissect compare`` command's computation.

    Args:
        a: (n, Ca) activations of net A (rows = samples).
        b: (n, Cb) activations of net B on the same samples.
        metrics: names from :data:`METRICS` (metric groups of :func:`compare_moments`) and/or from the metric
            registry (:data:`~._registry.REGISTRY`: debiased_cka, procrustes, shape_alpha*, frechet, rsa, …);
            ``"all"`` for both; default (None) every group of :data:`METRICS` only.
        holdout_fraction: fraction of rows held out (random, ``seed``) to score the regression.
        seed: seed of the train/held-out split, the jackknife groups, the subset and the permutations.
        alphas, thresholds: see :func:`compare_moments`.
        groups: jackknife groups (rows are assigned by a seeded hash of the row index).
        permutations: permutations of B's rows for the null (0: none).
        subset: rows of the fixed seeded subset used by RSA and the permutation null.
        **options: further keyword arguments of :func:`compare_moments` (e.g. ``svcca_keep``).

    Returns:
        DataFrame with columns ``metric`` (str) and ``value`` (float); when a registry metric is selected also
        ``se``, ``ci_low``, ``ci_high`` (jackknife) and ``p_value`` (permutation null), NaN for the rows they do
        not apply to (e.g. ``n_train``) and for undefined values (``frechet`` of different widths, debiased CKA
        of a constant side).
    """
    from ._registry import REGISTRY

    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = None if metrics is None else [str(m).strip() for m in metrics if str(m).strip()]
    if chosen == ["all"]:
        chosen = [*METRICS, *REGISTRY]
    if chosen is not None:
        unknown = [m for m in chosen if m not in METRICS and m not in REGISTRY]
        if unknown or not chosen:
            raise StageInputError(
                f"unknown metric(s) {unknown or chosen}; choose from {list(METRICS)} or {list(REGISTRY)}"
            )
    legacy = list(METRICS) if chosen is None else [m for m in METRICS if m in chosen]
    registry = [] if chosen is None else [m for m in REGISTRY if m in chosen]
    groups_ = legacy
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
        raise StageInputError(
            f"both arrays must be 2-D (samples, units); got shapes {getattr(a, 'shape', type(a).__name__)} and "
            f"{getattr(b, 'shape', type(b).__name__)}. Reshape conv maps to (N·H·W, C) or pool them first"
        )
    if a.shape[0] != b.shape[0]:
        raise StageInputError(
            f"A has {a.shape[0]} samples (rows) but B has {b.shape[0]}; rows must be the same samples in the same order"
        )
    if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
        raise StageInputError(f"arrays must be numeric; got dtypes {a.dtype} and {b.dtype}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StageInputError("the arrays contain NaN or inf values; drop or fix those rows first")
    if not 0.0 < holdout_fraction < 1.0:
        raise StageInputError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
    n = a.shape[0]
    n_heldout = int(round(n * holdout_fraction)) if "regression" in groups_ else 0
    min_samples = 4
    if n < min_samples or ("regression" in groups_ and (n_heldout < 2 or n - n_heldout < 2)):
        raise StageInputError(
            f"too few samples: got {n} rows; need at least {min_samples}, and with 'regression' at least 2 rows in "
            f"each split (holdout_fraction={holdout_fraction} gives {n_heldout} held-out rows). Provide more samples"
        )
    out = pd.DataFrame({"metric": pd.Series(dtype=str), "value": pd.Series(dtype=float)})
    if legacy:
        order = np.random.default_rng(seed).permutation(n)
        heldout_rows, train_rows = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
        train = _accumulate(a, b, train_rows)
        heldout = _accumulate(a, b, heldout_rows) if n_heldout else None
        tables = compare_moments(
            train,
            heldout,
            metrics=groups_,
            alphas=alphas,
            thresholds=thresholds,
            correlation_tables=False,
            **options,  # type: ignore[arg-type]
        )
        out = tables["metrics"]
    if registry:
        table = _registry_arrays(a, b, registry, groups=groups, permutations=permutations, subset=subset, seed=seed)
        extra = table[["metric", "value", "se", "ci_low", "ci_high", "p_value"]]
        # a metric computed both ways keeps compare_moments' value (its conventions for degenerate input) and
        # gains the registry's uncertainty columns
        shared = extra.metric.isin(out.metric)
        out = out.merge(extra[shared].drop(columns="value"), on="metric", how="left")
        out = pd.concat([out, extra[~shared]], ignore_index=True) if len(out) else extra.reset_index(drop=True)
    if registry:
        for column in ("se", "ci_low", "ci_high", "p_value"):
            if column not in out:
                out[column] = np.nan
    return out.reset_index(drop=True)


def _registry_arrays(
    a: np.ndarray, b: np.ndarray, names: Sequence[str], *, groups: int, permutations: int, subset: int, seed: int
) -> pd.DataFrame:
    """The registry metrics of two arrays with jackknife and permutation null (see :func:`similarity_table`)."""
    from ._grouped import GroupedMoments, SubsetRows, group_of
    from ._uncertainty import similarity_table

    ids = np.arange(a.shape[0])
    grouped = GroupedMoments([a.shape[1], b.shape[1]], ["a", "b"], groups)
    rows = SubsetRows([a.shape[1], b.shape[1]], ["a", "b"], size=min(subset, a.shape[0]), seed=seed)
    for start in range(0, a.shape[0], 65536):
        part = slice(start, start + 65536)
        grouped.update(a[part], b[part], group=group_of(ids[part], groups, seed))
        rows.update(a[part], b[part], ids=ids[part])
    return similarity_table(grouped, [("a", "b")], names, subset=rows.rows(), subset_ids=rows.ids,
                            permutations=permutations, seed=seed, group_seed=seed)
