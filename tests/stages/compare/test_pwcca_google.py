"""PWCCA in google/svcca's convention from moments vs a from-the-formula reference on samples."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    JointMoments,
    compare_arrays,
    pwcca_arrays,
    pwcca_google_arrays,
    pwcca_google_from_moments,
)


def _moments(a, b):
    m = JointMoments(a.shape[1], b.shape[1])
    for pa, pb in zip(np.array_split(a, 3), np.array_split(b, 3)):
        m.update(pa, pb)
    p, c = a.shape[1], m.comoment
    return m.n, m.mean[:p], m.mean[p:], c[:p, :p], c[p:, p:], c[:p, p:]


def _acts(seed, n=500, p=7, q=12, dead_a=(), dead_b=(), collinear_b=False, scale_b=1.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5))
    a = np.maximum(z @ rng.standard_normal((5, p)) + rng.standard_normal((n, p)), 0) + 1
    b = np.maximum(z @ rng.standard_normal((5, q)) + 0.5 * rng.standard_normal((n, q)), 0) * scale_b
    a[:, list(dead_a)] = 0.0
    b[:, list(dead_b)] = 0.0
    if collinear_b:
        b[:, -1] = b[:, 0] + b[:, 1]
    return a, b


CASES = {
    "uneven widths": dict(kw={}, epsilon=0.0),
    "swapped widths": dict(kw={}, epsilon=0.0, swap=True),
    "rank-deficient wider side": dict(kw=dict(dead_b=(3,), collinear_b=True), epsilon=0.0),
    "dead units both sides": dict(kw=dict(dead_a=(2,), dead_b=(3, 4)), epsilon=1e-10),
    "dead units, side b chosen": dict(kw=dict(dead_a=(2,), dead_b=(3, 4)), epsilon=1e-10, swap=True),
    "equal widths, large offset": dict(kw=dict(q=7, scale_b=1000.0), epsilon=0.0),
    "dead unit on the other side, epsilon 0": dict(kw=dict(p=10, q=8, dead_a=(4,)), epsilon=0.0, signs="canonical"),
    "dead units both sides, epsilon 0": dict(kw=dict(dead_a=(2,), dead_b=(3,)), epsilon=0.0, signs="canonical"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(2))
def test_google_pwcca_from_moments_equals_formula_on_samples(case, seed):
    spec = CASES[case]
    a, b = _acts(seed, **spec["kw"])
    if spec.get("swap"):
        a, b = b, a
    signs = spec.get("signs", "numpy")
    ref = pwcca_google_arrays(a, b, epsilon=spec["epsilon"], signs=signs)
    got = pwcca_google_from_moments(*_moments(a, b), epsilon=spec["epsilon"], signs=signs)
    assert got.side == ref.side == ("a" if got.kept_a <= got.kept_b else "b")
    np.testing.assert_allclose(got.weights, ref.weights, atol=1e-10)
    np.testing.assert_allclose(got.corrs, ref.corrs, atol=1e-10)
    assert got.value == pytest.approx(ref.value, abs=1e-10)
    assert got.weights.sum() == pytest.approx(1.0)


def test_google_convention_differs_from_the_paper_form_and_is_default():
    a, b = _acts(0)
    google = pwcca_google_from_moments(*_moments(a, b)).value
    paper = pwcca_arrays(a, b).value
    assert abs(google - paper) > 1e-3
    table = compare_arrays(a, b, metrics=["pwcca", "pwcca_morcos"])
    values = dict(zip(table.metric, table.value))
    assert values["pwcca"] == pytest.approx(google, abs=1e-9)
    assert values["pwcca_morcos"] == pytest.approx(paper, abs=1e-9)


def test_independent_data_gives_small_pwcca_in_both_conventions():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4000, 10)) + 2.0, rng.standard_normal((4000, 16))
    ref = pwcca_google_arrays(a, b)
    got = pwcca_google_from_moments(*_moments(a, b))
    assert got.value == pytest.approx(ref.value, abs=1e-10)
    assert got.value < 0.1 and pwcca_arrays(a, b).value < 0.1


def test_dead_units_on_the_chosen_side_with_epsilon_zero_get_zero_weight():
    a, b = _acts(2, dead_a=(1, 3))
    got = pwcca_google_from_moments(*_moments(a, b), epsilon=0.0)
    assert got.side == "a" and np.isfinite(got.value)
    assert (got.weights == 0).sum() >= 1


def test_bad_input_is_refused():
    with pytest.raises(StageInputError, match="at least 2 samples"):
        pwcca_google_from_moments(1, np.zeros(2), np.zeros(2), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(StageInputError, match="epsilon"):
        pwcca_google_from_moments(5, np.zeros(2), np.zeros(2), np.eye(2), np.eye(2), np.zeros((2, 2)), epsilon=-1)
