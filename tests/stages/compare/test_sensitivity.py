"""Ding et al. 2021's principal-component deletion test: deletion algebra, rank statistics, an analytic fixture."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from repdissect.stages import StageInputError
from repdissect.stages.compare import (
    Metric,
    delete_components,
    deletion_counts,
    principal_components,
    rank_statistics,
    sensitivity_rows,
    sensitivity_summary,
)


def _cloud(n: int = 400, p: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + 3.0


@pytest.mark.parametrize("order", ["low", "high"])
@pytest.mark.parametrize("count", [0, 1, 3, 6])
def test_deletion_removes_exactly_the_chosen_components(order, count):
    x = _cloud()
    mean, basis, variances = principal_components(x)
    out = delete_components(x, mean, basis, count, order)
    p = basis.shape[1]
    gone = basis[:, p - count :] if order == "low" else basis[:, :count]
    kept = basis[:, : p - count] if order == "low" else basis[:, count:]
    centred = out - mean
    assert np.abs(centred @ gone).max(initial=0.0) < 1e-9  # nothing left along the deleted directions
    np.testing.assert_allclose(centred @ kept, (x - mean) @ kept, atol=1e-9)  # the rest untouched
    kept_variance = variances[: p - count] if order == "low" else variances[count:]
    np.testing.assert_allclose(np.cov(out, rowvar=False).trace(), kept_variance.sum(), rtol=1e-9, atol=1e-9)


def test_low_and_high_deletions_are_complementary():
    x = _cloud()
    mean, basis, _ = principal_components(x)
    for k in range(7):
        low, high = delete_components(x, mean, basis, 6 - k, "low"), delete_components(x, mean, basis, k, "high")
        np.testing.assert_allclose((x - low) + (x - high), x - mean, atol=1e-9)


def test_principal_components_match_numpy_svd():
    x = _cloud()
    _, basis, variances = principal_components(x)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(variances, s**2 / (x.shape[0] - 1), rtol=1e-10)
    np.testing.assert_allclose(np.abs(basis.T @ vt.T), np.eye(6), atol=1e-8)


@pytest.mark.parametrize("units, steps, expected", [(8, 12, list(range(8))), (64, 4, [0, 21, 42, 63]), (2, 2, [0, 1])])
def test_deletion_counts(units, steps, expected):
    assert deletion_counts(units, steps).tolist() == expected


def _ding_reference(x, y):
    """js-d/sim_metric experiments/utils.py get_rank_corrs, restated with scipy."""
    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    one = lambda r: r.pvalue / 2 if r.statistic > 0 else 1 - r.pvalue / 2  # noqa: E731
    qx = np.array([stats.percentileofscore(x, v, "rank") / 100 for v in x])
    qy = np.array([stats.percentileofscore(y, v, "rank") / 100 for v in y])
    return rho.statistic, one(rho), tau.statistic, one(tau), np.mean((qx < 0.2) & (qy > 0.8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_statistics_equal_dings_definitions(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(40)
    y = np.round(x + rng.standard_normal(40), 1)  # ties on one side
    got = rank_statistics(x, y)
    want = _ding_reference(x, y)
    np.testing.assert_allclose([got["rho"], got["rho_p"], got["tau"], got["tau_p"], got["bad_frac"]], want, rtol=1e-10)
    assert got["rows"] == 40


@pytest.mark.parametrize(
    "x, y, rho, p",
    [
        ([0, 0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 0.5),  # a metric that never moves: no ranking
        ([0, 1e-17, -1e-16, 2e-16, 0], [0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 0.5),  # rounding noise is not movement
        ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5], 1.0, None),
        ([5, 4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4, 0.5], -1.0, None),
    ],
)
def test_rank_statistics_edge_cases(x, y, rho, p):
    got = rank_statistics(np.array(x, float), np.array(y, float))
    assert got["rho"] == pytest.approx(rho)
    if p is not None:
        assert got["rho_p"] == p and got["tau"] == 0.0
    assert np.isnan(rank_statistics(np.array([1.0, np.nan]), np.array([1.0, 2.0]))["rho"])


def _fixture(n: int = 6000, p: int = 6, seed: int = 0):
    """Independent units with decreasing variances, every one equally informative: the class is the sign of the
    sum of the standardised units. Deleting components (= units here) lowers the probe's accuracy step by step."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, p))
    x = z * np.linspace(3.0, 1.0, p)
    labels = (z.sum(axis=1) > 0).astype(int)
    train = np.arange(n) % 2 == 0
    return x, labels, train


def _variance_removed(x, y):
    return 1.0 - np.var(y, axis=0).sum() / np.var(x, axis=0).sum()


def test_analytic_fixture_tracking_metric_scores_one_and_blind_metric_zero():
    x, labels, train = _fixture()
    tracking = Metric("variance_removed", "distance", "share of variance deleted", rows=_variance_removed)
    top = principal_components(x[train])[1][:, 0]  # the deletion basis's first component: never deleted here
    blind = Metric("top_unit_only", "distance", "looks only along the top principal component",
                   rows=lambda a, b: float(abs(np.var(b @ top) - np.var(a @ top))))
    rows = sensitivity_rows({"0": x}, labels, train, [tracking, blind, "procrustes", "linear_cka", "cca_mean"],
                            orders=["low"], steps=6, design="self", rows_limit=3000)
    acc = rows[rows.metric == "procrustes"].sort_values("components")
    assert acc.accuracy_full.iloc[0] > 0.97
    assert (np.diff(acc.accuracy_deleted) < 0).all(), "each deleted informative unit costs accuracy"
    np.testing.assert_allclose(acc.variance_deleted.iloc[1:], np.cumsum(np.linspace(1, 3, 6) ** 2)[:5]
                               / (np.linspace(1, 3, 6) ** 2).sum(), atol=0.03)
    summary = sensitivity_summary(rows, "self").set_index("metric")
    assert summary.loc["variance_removed", "rho"] == pytest.approx(1.0)
    assert summary.loc["variance_removed", "rho_p"] < 0.01
    # the top component is never deleted (lowest variance goes first): the blind metric does not move at all
    assert summary.loc["top_unit_only", "rho"] == 0.0 and summary.loc["top_unit_only", "rho_p"] == 0.5
    # Procrustes and CKA grow with every deletion; CCA only sees that the kept subspace is linearly intact
    assert summary.loc["procrustes", "rho"] == pytest.approx(1.0)
    assert summary.loc["linear_cka", "rho"] == pytest.approx(1.0)
    assert summary.loc["cca_mean", "rho"] == 0.0
    assert (summary.bad_frac == 0).all() and (summary.rows == 6).all()


def test_seeds_design_pairs_every_reference_with_every_deleted_seed():
    x, labels, train = _fixture(n=800)
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    reps = {"0": x, "1": x @ q + 0.5 * rng.standard_normal(x.shape)}
    rows = sensitivity_rows(reps, labels, train, ["procrustes", "rsa"], orders=["low", "high"], steps=3)
    assert set(zip(rows.reference, rows.deleted)) == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    assert len(rows) == 4 * 2 * 3 * 2
    full = rows[(rows.components == 0) & (rows.order == "low")]
    same = full[full.reference == full.deleted]
    np.testing.assert_allclose(same[same.metric == "procrustes"].value, 0.0, atol=1e-9)
    np.testing.assert_allclose(same[same.metric == "rsa"].value, 1.0, atol=1e-12)
    cross = full[(full.reference == "0") & (full.deleted == "1")].set_index("metric").value
    assert cross["procrustes"] > 0.01
    from repdissect.stages.compare import procrustes_arrays, rsa_arrays

    held = ~train
    assert cross["procrustes"] == pytest.approx(procrustes_arrays(x[held], reps["1"][held]), abs=1e-10)
    assert cross["rsa"] == pytest.approx(rsa_arrays(x[held][:300], reps["1"][held][:300]), abs=1e-10)
    assert len(sensitivity_summary(rows, "seeds")) == 4 and (sensitivity_summary(rows, "seeds").rows == 12).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"design": "pairs"}, "unknown design"),
        ({"orders": ["middle"]}, "unknown deletion order"),
        ({"metrics": ["nope"]}, "unknown metric"),
        ({"train": np.ones(40, bool)}, "held-out"),
    ],
)
def test_bad_input_is_refused_with_one_clear_message(kwargs, message):
    x, labels, train = _fixture(n=40)
    args = {"reps": {"0": x}, "labels": labels, "train": train, **kwargs}
    with pytest.raises(StageInputError, match=message):
        sensitivity_rows(args.pop("reps"), args.pop("labels"), args.pop("train"), **args)
