"""The findings table is computed from the stage tables: each verdict follows its numbers, and flips with them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from repdissect.reports._findings import findings_frame, findings_table

LAYERS = ["conv1", "conv2"]
MODELS = [("cnn", LAYERS)]


def _iou(trained_objects=(30, 32, 31), random_objects=(2, 3, 1)):
    rows = []
    for role, objects in (("trained", trained_objects), ("random", random_objects)):
        for seed, n in enumerate(objects):
            for layer in LAYERS:
                rows.append({"model": "cnn", "layer": layer, "role": role, "instance": f"s{seed}-{role}",
                             "detectors_color": 5, "detectors_object": n, "detectors_part": 2,
                             "detectors_material": 1, "detectors_scene": 0})
    return pd.DataFrame(rows)


def _stability(trained=(0.050, 0.052, 0.051), random=(0.090, 0.088, 0.091)):
    rows = [{"model": "cnn", "layer": layer, "role": role, "instability": v}
            for role, values in (("trained", trained), ("random", random)) for v in values for layer in LAYERS]
    return pd.DataFrame(rows)


def _compare(seed_svcca=0.6, null_svcca=0.3):
    rows, reg = [], []
    for kind, svcca, corr, loss in (("seed", seed_svcca, 0.7, 0.3), ("unrelated", null_svcca, 0.4, 0.7)):
        for k in range(3):
            for layer in LAYERS:
                jitter = 0.01 * k
                rows.append({"model": "cnn", "a": f"a{k}", "b": f"b{k}", "kind": kind, "layer": layer,
                             "svcca_mean": svcca + jitter, "pwcca": svcca + jitter, "linear_cka": svcca + jitter,
                             "hungarian_mean_corr": corr + jitter, "semi_a_to_b_mean_corr": corr + jitter,
                             "semi_b_to_a_mean_corr": corr + jitter})
                for alpha, loss_at, used in ((0.0, loss, 16.0), (0.01, loss + 0.02, 3.0), (0.1, loss + 0.3, 1.0)):
                    for direction in ("a->b", "b->a"):
                        reg.append({"model": "cnn", "a": f"a{k}", "b": f"b{k}", "kind": kind, "layer": layer,
                                    "alpha": alpha, "direction": direction, "heldout_loss": loss_at + jitter,
                                    "mean_nonzero": used, "n_inputs": 16})
    return pd.DataFrame(rows), pd.DataFrame(reg)


def _verdicts(iou=None, stability=None, center=0.08, compare=None):
    summary, reg = compare if compare is not None else _compare()
    found = findings_frame(_iou() if iou is None else iou, _stability() if stability is None else stability, center,
                           summary, reg, MODELS)
    return {(f.claim.split(" ")[0] + ":" + f.paper.split(" ")[0] + ":" + f.claim[-20:], f.layer): f.holds
            for f in found}, found


def test_every_finding_holds_on_data_that_shows_it():
    verdicts, found = _verdicts()
    assert len(found) == 1 + 2 + len(LAYERS) + 1  # detectors, 2 × instability, similarity per layer, L1
    assert all(f.holds is True for f in found), [(f.claim, f.measured) for f in found if not f.holds]
    l1 = next(f for f in found if f.paper == "Li et al. 2016")
    assert "α = 0.01" in l1.measured and "3.0/16" in l1.measured


@pytest.mark.parametrize("change, claim_fragment", [
    ({"iou": _iou(random_objects=(40, 41, 39))}, "object/part/material"),
    ({"iou": _iou(trained_objects=(30, 2, 31))}, "object/part/material"),  # the gap is within 2 std
    ({"stability": _stability(random=(0.052, 0.050, 0.051))}, "than random-init nets'"),
    ({"center": 0.052}, "than the image centre"),
    ({"compare": _compare(null_svcca=0.65)}, "on every metric"),
])
def test_changing_an_input_flips_its_verdict(change, claim_fragment):
    _, before = _verdicts()
    _, after = _verdicts(**change)
    flipped = [(a.claim, a.layer) for a, b in zip(after, before) if a.holds != b.holds]
    assert flipped and all(claim_fragment in claim for claim, _ in flipped)
    assert all(not a.holds for a in after if claim_fragment in a.claim and a.layer == "conv2")


def test_sparse_regression_fails_when_sparsity_costs_too_much():
    summary, reg = _compare()
    reg.loc[reg.alpha == 0.01, "heldout_loss"] += 0.2
    _, found = _verdicts(compare=(summary, reg))
    l1 = next(f for f in found if f.paper == "Li et al. 2016")
    assert l1.holds is False and "does NOT hold" == l1.verdict()


def test_a_failing_sparse_regression_shows_the_curve_around_the_rule_corner():
    # the demo's shape: within the loss bound only at 49 % of the channels, within a quarter only at +0.130,
    # and the point between misses both narrowly (25.2 % at +0.054)
    from repdissect.reports._findings import check_sparse_regression

    rows = [{"model": "cnn", "layer": "conv4", "kind": "seed", "a": "s0", "b": "s1", "alpha": alpha,
             "heldout_loss": 0.422 + up, "mean_nonzero": used, "n_inputs": 128}
            for alpha, up, used in ((0.0, 0.0, 128.0), (0.001, 0.001, 117.0), (0.01, 0.018, 63.2),
                                    (0.03, 0.054, 32.2), (0.1, 0.130, 11.0))]
    found = check_sparse_regression(pd.DataFrame(rows), "cnn", "conv4", "conv4")
    assert found.holds is False
    assert found.measured == ("least squares loss 0.422; α = 0.01: 63.2/128 channels (49.4%) at +0.018; "
                              "α = 0.03: 32.2/128 channels (25.2%) at +0.054; "
                              "α = 0.1: 11.0/128 channels (8.6%) at +0.130")
    rows[3]["mean_nonzero"] = 31.9  # a quarter of the channels, still +0.054: the point is now inside one bound
    found = check_sparse_regression(pd.DataFrame(rows), "cnn", "conv4", "conv4")
    assert found.holds is False and "α = 0.1" not in found.measured and found.measured.endswith("at +0.054")


def test_missing_data_is_not_a_verdict():
    empty = pd.DataFrame()
    found = findings_frame(empty, empty, math.nan, empty, empty, MODELS)
    assert all(f.holds is None for f in found)


def test_findings_table_in_the_report_matches_the_stage_tables(fake_run):
    from repdissect.reports._data import RunData
    from repdissect.reports._findings import run_findings

    result, index = fake_run
    table = pd.read_csv(index.parent / "tables" / "0_findings.csv")
    found = [f for f in run_findings(RunData(result)) if f.holds is not None]
    assert list(table["Holds"]) == [f.verdict() for f in found]
    assert list(table["Measured"]) == [f.measured for f in found]
    text = (index.parent / "tables" / "0_findings.md").read_text()
    assert "Findings:" in text


def test_category_table_rows_add_up_to_the_total(fake_run):
    result, index = fake_run
    table = pd.read_csv(index.parent / "tables" / "12_category_detectors.csv")
    for _, group in table.groupby("Layer"):
        total = group[group.Category == "total"]
        cats = group[group.Category != "total"]
        for col in ("Detector units (trained)", "Unique detectors (random init)"):
            assert np.isclose(cats[f"{col}_mean"].sum(), total[f"{col}_mean"].iloc[0])


def test_unit_galleries_for_every_trained_seed(fake_run):
    from repdissect.reports._plots import safe_name

    result, index = fake_run
    page = index.read_text()
    trained = [i for i in result.plan.instances if i.init == "trained"]
    assert len(trained) == 3
    for inst in trained:
        assert (index.parent / "units" / safe_name(inst.name)).is_dir()
        assert f"({inst.name})</h2>" in page or f"({inst.name})" in page
