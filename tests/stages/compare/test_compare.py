"""compare_moments / compare_arrays: table schemas, agreement with the building blocks, validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    METRICS,
    JointMoments,
    compare_arrays,
    compare_moments,
    hungarian_matching,
    linear_cka_gram,
    pwcca_arrays,
    pwcca_google_arrays,
    svcca_arrays,
)

SCHEMAS = {
    "units": ["side", "unit", "mean", "std", "dead", "within_max_corr", "within_partner"],
    "correlation": ["unit_a", "unit_b", "corr"],
    "within_correlation": ["net", "unit_i", "unit_j", "corr"],
    "matches": ["method", "unit_a", "unit_b", "corr", "rank"],
    "hopcroft_karp": ["threshold", "matched", "max_possible", "fraction"],
    "regression": [
        "alpha", "direction", "heldout_loss", "train_loss", "mean_nonzero",
        "n_targets", "n_inputs", "converged", "sweeps",
    ],
    "cca": ["index", "corr", "pwcca_weight"],
    "svcca": ["index", "corr"],
    "metrics": ["metric", "value"],
}


def _activations(seed: int = 0, n: int = 3000, ca: int = 10, cb: int = 8):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5))
    a = np.maximum(z @ rng.standard_normal((5, ca)) + 0.5 * rng.standard_normal((n, ca)), 0).astype(np.float32)
    b = np.maximum(z @ rng.standard_normal((5, cb)) + 0.5 * rng.standard_normal((n, cb)), 0).astype(np.float32)
    a[:, 4] = 0.0  # a dead ReLU unit
    return a, b


def _split(a, b, n_train):
    train, heldout = JointMoments(a.shape[1], b.shape[1]), JointMoments(a.shape[1], b.shape[1])
    train.update(a[:n_train], b[:n_train])
    heldout.update(a[n_train:], b[n_train:])
    return train, heldout


def test_tables_have_documented_schemas_and_no_nan():
    a, b = _activations()
    tables = compare_moments(*_split(a, b, 2400), alphas=[0.0, 0.01, 0.1], thresholds=[0.5, 0.9])
    for name, columns in SCHEMAS.items():
        assert list(tables[name].columns) == columns, name
        numeric = tables[name].select_dtypes("number")
        assert np.isfinite(numeric.to_numpy(dtype=float)).all(), name
    summary = tables["summary"]
    assert len(summary) == 1
    assert dict(zip(tables["metrics"].metric, tables["metrics"].value)) == summary.iloc[0].to_dict()
    units = tables["units"]
    assert units.query("side == 'a' and unit == 4").dead.item()
    assert int(summary.dead_units_a.item()) == 1 and int(summary.dead_units_b.item()) == 0
    assert len(tables["correlation"]) == 10 * 8
    assert len(tables["within_correlation"]) == 10 * 9 // 2 + 8 * 7 // 2
    assert set(tables["matches"].method) == {"semi_a_to_b", "semi_b_to_a", "hungarian", "bottleneck"}
    assert set(tables["regression"].direction) == {"a_from_b", "b_from_a"}
    assert len(tables["regression"]) == 6
    assert (tables["hopcroft_karp"].max_possible == 8).all()
    assert summary.semi_a_to_b_mean_corr.item() >= summary.hungarian_mean_corr.item()
    assert summary.bottleneck_mean_corr.item() <= summary.hungarian_mean_corr.item() + 1e-12


def test_metrics_agree_with_building_blocks_on_all_samples():
    a, b = _activations(seed=1)
    tables = compare_moments(*_split(a, b, 2000), metrics=["svcca", "pwcca", "pwcca_morcos", "linear_cka", "matching"])
    values = dict(zip(tables["metrics"].metric, tables["metrics"].value))
    assert values["svcca_mean"] == pytest.approx(svcca_arrays(a, b).mean, abs=1e-9)
    assert values["pwcca_morcos"] == pytest.approx(pwcca_arrays(a, b).value, abs=1e-9)
    # dead unit with epsilon = 0: google's value hangs on LAPACK's singular-vector signs (see _pwcca_google)
    assert values["pwcca"] == pytest.approx(pwcca_google_arrays(a, b).value, abs=0.03)
    assert values["linear_cka"] == pytest.approx(linear_cka_gram(a[::3], b[::3]), abs=0.05)  # subsample for n²
    alive = ~np.all(a == a[0], axis=0)
    corr = np.corrcoef(np.c_[a[:, alive], b], rowvar=False)[: alive.sum(), alive.sum() :]
    assert values["hungarian_mean_corr"] == pytest.approx(hungarian_matching(corr).mean, abs=1e-9)
    matches = tables["matches"]
    hungarian = matches[matches.method == "hungarian"].sort_values("rank")
    assert (np.diff(hungarian["corr"].to_numpy()) <= 0).all()
    assert "regression" not in tables and "cca" in tables


def test_similarity_on_train_uses_only_train_moments():
    a, b = _activations(seed=2)
    train, heldout = _split(a, b, 1500)
    only_train = compare_moments(train, heldout, metrics=["linear_cka"], similarity_on="train")
    reference = compare_moments(train, None, metrics=["linear_cka"])
    assert only_train["metrics"].value.tolist()[-1] == reference["metrics"].value.tolist()[-1]
    merged = compare_moments(train, heldout, metrics=["linear_cka"])
    assert merged["summary"].linear_cka.item() != reference["summary"].linear_cka.item()


def test_permuted_copy_is_perfectly_matched_and_predicted():
    a, _ = _activations(seed=3)
    a = np.delete(a, 4, axis=1)
    perm = np.random.default_rng(0).permutation(a.shape[1])
    b = a[:, perm] * 2.5
    values = compare_arrays(a, b).set_index("metric").value
    for name in ("semi_a_to_b_mean_corr", "semi_b_to_a_mean_corr", "hungarian_mean_corr", "bottleneck_threshold"):
        assert values[name] == pytest.approx(1.0, abs=1e-6), name
    assert values["hk_matched_t0.9"] == a.shape[1]
    assert values["svcca_mean"] == pytest.approx(1.0, abs=1e-6)
    assert values["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert values["lstsq_heldout_loss_a_from_b"] == pytest.approx(0.0, abs=1e-6)


def test_compare_arrays_metric_selection_and_names():
    a, b = _activations(seed=4, n=400)
    table = compare_arrays(a, b, metrics=["cca", "linear_cka"])
    assert list(table.columns) == ["metric", "value", "se", "ci_low", "ci_high", "p_value"]
    names = set(table.metric)
    cka = table.set_index("metric").loc["linear_cka"]
    assert cka.se > 0 and cka.p_value <= 0.05  # registry metric: jackknife s.e. and permutation p
    assert np.isnan(table.set_index("metric").loc["cca_mean", "se"])
    assert {"cca_mean", "linear_cka", "n_train"} <= names
    assert not any(name.startswith(("svcca", "hungarian", "lasso")) for name in names)
    assert list(compare_arrays(a, b, metrics=["cca"]).columns) == ["metric", "value"]
    full = compare_arrays(a, b, metrics="all", alphas=[0.0, 0.05])
    assert {"svcca_mean", "pwcca", "hungarian_mean_corr", "lasso_alpha0.05_heldout_loss_b_from_a"} <= set(full.metric)
    assert {"debiased_cka", "procrustes", "shape_alpha0.5", "rsa", "pwcca_morcos"} <= set(full.metric)
    defined = full[full.metric != "frechet"]  # Fréchet needs equal widths (10 vs 8 here): NaN
    assert np.isfinite(defined.value).all()


def test_compare_arrays_split_is_seeded():
    a, b = _activations(seed=5, n=500)
    first = compare_arrays(a, b, metrics=["regression"], alphas=[0.0], seed=3)
    again = compare_arrays(a, b, metrics=["regression"], alphas=[0.0], seed=3)
    other = compare_arrays(a, b, metrics=["regression"], alphas=[0.0], seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)
    counts = first.set_index("metric").value
    assert counts["n_heldout"] == 100 and counts["n_train"] == 400


@pytest.mark.parametrize(
    "a,b,kwargs,match",
    [
        (np.zeros((10, 2, 2)), np.zeros((10, 2)), {}, "2-D"),
        (np.zeros((10, 2)), np.zeros((11, 2)), {}, "10 samples.*11"),
        (np.full((10, 2), np.nan), np.zeros((10, 2)), {}, "NaN"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"metrics": ["cca"]}, "too few samples"),
        (np.zeros((6, 2)), np.zeros((6, 2)), {}, "too few samples"),
        (np.zeros((10, 2)), np.zeros((10, 2)), {"metrics": ["svcca", "procrustez"]}, r"procrustez.*choose from"),
        (np.zeros((10, 2)), np.zeros((10, 2)), {"holdout_fraction": 1.5}, "holdout_fraction"),
    ],
)
def test_compare_arrays_validation(a, b, kwargs, match):
    with pytest.raises(StageInputError, match=match):
        compare_arrays(a, b, **kwargs)


def test_compare_moments_validation():
    a, b = _activations(seed=6, n=200)
    train, heldout = _split(a, b, 150)
    with pytest.raises(StageInputError, match="held-out"):
        compare_moments(train, None)
    with pytest.raises(StageInputError, match="channels"):
        compare_moments(train, JointMoments(3, 3), metrics=["cca"])
    with pytest.raises(StageInputError, match="at least 2 samples"):
        compare_moments(JointMoments(2, 2), metrics=["cca"])
    assert set(METRICS) == {"correlation", "matching", "regression", "cca", "svcca", "pwcca", "pwcca_morcos", "linear_cka"}


def test_all_dead_side_gives_finite_zeros():
    rng = np.random.default_rng(7)
    a, b = np.zeros((300, 4)), rng.standard_normal((300, 3))
    values = compare_arrays(a, b, metrics=list(METRICS)).set_index("metric").value
    assert np.isfinite(values).all()
    for name in ("hungarian_mean_corr", "svcca_mean", "pwcca", "linear_cka", "cca_mean"):
        assert values[name] == 0.0, name
    assert values["dead_units_a"] == 4


def test_layer_identification_does_not_count_a_metric_undefined_for_some_candidates():
    """Fréchet is NaN between layers of different widths: picking the only defined layer is no pass."""
    from repdissect.stages.compare import layer_identification

    rows = []
    for la in ("l1", "l2"):
        for lb in ("l1", "l2"):
            rows.append({"a": "s0", "b": "s1", "layer_a": la, "layer_b": lb, "metric": "frechet",
                         "metric_kind": "distance", "value": 0.5 if la == lb else np.nan})
            rows.append({"a": "s0", "b": "s1", "layer_a": la, "layer_b": lb, "metric": "linear_cka",
                         "metric_kind": "similarity", "value": 0.9 if la == lb else 0.1})
    table = layer_identification(pd.DataFrame(rows), ["l1", "l2"]).set_index("metric")
    assert table.loc["linear_cka", "accuracy"] == 1.0 and table.loc["linear_cka", "trials"] == 4
    assert table.loc["frechet", "trials"] == 0 and np.isnan(table.loc["frechet", "accuracy"])
