"""Regression from moments: lasso == scikit-learn, least squares == lstsq, held-out loss == direct computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import Lasso

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    JointMoments,
    lasso_gram,
    least_squares_gram,
    regression_from_moments,
)


def _related(seed: int = 0, n: int = 600, ca: int = 4, cb: int = 7, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, cb)) @ rng.standard_normal((cb, cb)) + rng.uniform(-3, 3, cb)
    weights = rng.standard_normal((cb, ca)) * (rng.random((cb, ca)) < 0.5)
    a = b @ weights + noise * rng.standard_normal((n, ca)) * rng.uniform(0.5, 2, ca) + rng.uniform(-3, 3, ca)
    return a, b


def _moments(a, b) -> JointMoments:
    m = JointMoments(a.shape[1], b.shape[1])
    m.update(a, b)
    return m


def _standardise(x, mean, std):
    return (x - mean) / std


def _split(a, b, n_train):
    return (a[:n_train], b[:n_train]), (a[n_train:], b[n_train:])


def _sklearn_objective(x, y, coef, alpha):
    residual = y - x @ coef - (y.mean() - x.mean(axis=0) @ coef)
    return residual @ residual / (2 * len(y)) + alpha * np.abs(coef).sum()


ALPHAS = [0.2, 0.05, 0.01, 0.002]


def test_lasso_equals_sklearn_coefficients_and_objective():
    a, b = _related(seed=1)
    result = regression_from_moments(
        _moments(a, b), _moments(*_related(seed=2)), ALPHAS, tol=1e-13, max_sweeps=100000, return_coef=True
    )
    assert result.converged.all()
    xs = _standardise(b, b.mean(axis=0), b.std(axis=0))
    ys = _standardise(a, a.mean(axis=0), a.std(axis=0))
    for k, alpha in enumerate(ALPHAS):
        for t in range(a.shape[1]):
            reference = Lasso(alpha=alpha, tol=1e-14, max_iter=1_000_000).fit(xs, ys[:, t])
            ours = result.coef[k][:, t]
            np.testing.assert_allclose(ours, reference.coef_, atol=1e-6)
            assert abs(reference.intercept_) < 1e-10  # standardised data: intercept 0, as in the moment solution
            assert _sklearn_objective(xs, ys[:, t], ours, alpha) == pytest.approx(
                _sklearn_objective(xs, ys[:, t], reference.coef_, alpha), abs=1e-9
            )


def test_lasso_gram_warm_start_and_cold_start_agree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    y = x @ rng.standard_normal((6, 3)) + rng.standard_normal((400, 3))
    x, y = x - x.mean(0), y - y.mean(0)
    gram, xty, y_sq = x.T @ x / 400, x.T @ y / 400, (y**2).mean(0)
    cold = lasso_gram(gram, xty, 0.05, y_sq=y_sq, tol=1e-14, max_sweeps=100000)
    warm_start = lasso_gram(gram, xty, 0.2, y_sq=y_sq, tol=1e-14, max_sweeps=100000).coef
    warm = lasso_gram(gram, xty, 0.05, y_sq=y_sq, coef_init=warm_start, tol=1e-14, max_sweeps=100000)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-8)
    assert (cold.gap <= 1e-14 * y_sq).all() and cold.converged
    for t in range(3):  # unstandardised targets, plain sklearn Lasso on centred data
        ref = Lasso(alpha=0.05, tol=1e-14, max_iter=1_000_000).fit(x, y[:, t])
        np.testing.assert_allclose(cold.coef[:, t], ref.coef_, atol=1e-6)


def test_least_squares_equals_lstsq_and_heldout_loss_is_direct():
    a, b = _related(seed=4, n=900)
    (a_tr, b_tr), (a_ho, b_ho) = _split(a, b, 600)
    result = regression_from_moments(
        _moments(a_tr, b_tr), _moments(a_ho, b_ho), [0.0, 0.01], tol=1e-12, return_coef=True
    )
    mean_b, std_b, mean_a, std_a = b_tr.mean(0), b_tr.std(0), a_tr.mean(0), a_tr.std(0)
    xs, ys = _standardise(b_tr, mean_b, std_b), _standardise(a_tr, mean_a, std_a)
    reference = np.linalg.lstsq(xs, ys, rcond=None)[0]
    np.testing.assert_allclose(result.coef[0], reference, atol=1e-6)
    assert (result.nonzero[0] == b.shape[1]).all()
    # Held-out loss straight from the held-out samples, standardised with the train statistics.
    x_ho, y_ho = _standardise(b_ho, mean_b, std_b), _standardise(a_ho, mean_a, std_a)
    for k in range(2):
        mse = ((y_ho - x_ho @ result.coef[k]) ** 2).mean(axis=0)
        np.testing.assert_allclose(result.heldout_loss[k], mse / y_ho.var(axis=0), rtol=1e-9)
        train_mse = ((ys - xs @ result.coef[k]) ** 2).mean(axis=0)
        np.testing.assert_allclose(result.train_loss[k], train_mse, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(result.nonzero[k], (result.coef[k] != 0).sum(axis=0))


def test_independent_data_loss_is_one_and_exact_relation_is_zero():
    rng = np.random.default_rng(5)
    b = rng.standard_normal((20000, 5))
    independent = rng.standard_normal((20000, 3))
    exact = b @ rng.standard_normal((5, 3)) + 2.0
    for a, expected, tol in ((independent, 1.0, 0.01), (exact, 0.0, 1e-6)):
        result = regression_from_moments(_moments(a[:15000], b[:15000]), _moments(a[15000:], b[15000:]), [0.0])
        np.testing.assert_allclose(result.heldout_loss[0], expected, atol=tol)


def test_sparsity_grows_with_alpha_and_large_alpha_uses_nothing():
    a, b = _related(seed=6)
    result = regression_from_moments(_moments(a, b), _moments(*_related(seed=7)), [0.0, 0.01, 0.1, 1.0])
    mean_used = result.nonzero.mean(axis=1)
    assert (np.diff(mean_used) <= 0).all()
    assert mean_used[-1] == 0 and mean_used[0] == b.shape[1]
    np.testing.assert_allclose(result.train_loss[-1], 1.0)


def test_direction_b_from_a_swaps_roles():
    a, b = _related(seed=8)
    ho = _related(seed=9)
    forward = regression_from_moments(_moments(b, a), _moments(ho[1], ho[0]), [0.0, 0.05])
    backward = regression_from_moments(_moments(a, b), _moments(*ho), [0.0, 0.05], direction="b_from_a")
    np.testing.assert_allclose(backward.heldout_loss, forward.heldout_loss, rtol=1e-10)
    np.testing.assert_array_equal(backward.nonzero, forward.nonzero)


def test_dead_and_duplicated_channels_stay_finite_and_are_flagged():
    a, b = _related(seed=10, cb=5)
    b = np.concatenate([b, b[:, :2], np.zeros((len(b), 1))], axis=1)  # duplicates + a dead input
    a = np.concatenate([a, np.full((len(a), 1), 7.0)], axis=1)  # a dead target
    (a_tr, b_tr), (a_ho, b_ho) = _split(a, b, 400)
    result = regression_from_moments(_moments(a_tr, b_tr), _moments(a_ho, b_ho), [0.0, 0.001, 0.1], return_coef=True)
    assert result.excluded_targets.tolist() == [a.shape[1] - 1]
    assert result.excluded_inputs.tolist() == [b.shape[1] - 1]
    for field in ("heldout_loss", "train_loss", "coef"):
        assert np.isfinite(getattr(result, field)).all()
    assert (result.heldout_loss < 1.0).all()


def test_target_constant_in_heldout_only_is_excluded():
    a, b = _related(seed=11)
    a_ho = a[400:].copy()
    a_ho[:, 0] = 1.0
    result = regression_from_moments(_moments(a[:400], b[:400]), _moments(a_ho, b[400:]), [0.0])
    assert result.excluded_targets.tolist() == [0]
    assert np.isfinite(result.heldout_loss).all()


@pytest.mark.parametrize(
    "alphas,kwargs,match",
    [
        ([-0.1], {}, "alphas must be"),
        ([], {}, "alphas must be"),
        ([0.1], {"direction": "both"}, "direction"),
    ],
)
def test_validation(alphas, kwargs, match):
    a, b = _related()
    with pytest.raises(StageInputError, match=match):
        regression_from_moments(_moments(a, b), _moments(a, b), alphas, **kwargs)


def test_gram_helpers_validate():
    with pytest.raises(StageInputError, match="alpha > 0"):
        lasso_gram(np.eye(2), np.ones(2), 0.0)
    with pytest.raises(StageInputError, match="same P"):
        least_squares_gram(np.eye(3), np.ones((2, 1)))
    with pytest.raises(StageInputError, match="held-out"):
        regression_from_moments(JointMoments(2, 2), JointMoments(2, 3))


def _correlated_problem(seed: int, n: int = 1000, p: int = 16, t: int = 4, mixing: float = 0.9):
    """Centred inputs whose columns share a strong common factor (ill-conditioned G), and their targets."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((n, 3))
    x = mixing * common @ rng.standard_normal((3, p)) + (1 - mixing) * rng.standard_normal((n, p))
    y = x @ (rng.standard_normal((p, t)) * (rng.random((p, t)) < 0.3)) + 0.5 * rng.standard_normal((n, t))
    x, y = x - x.mean(0), y - y.mean(0)
    return x, y, x.T @ x / n, x.T @ y / n, (y**2).mean(0)


@pytest.mark.parametrize("seed, alpha", [(20, 0.002), (21, 0.01), (22, 0.05), (23, 0.3)])
def test_anderson_acceleration_reaches_plain_descents_optimum_and_sklearns(seed, alpha):
    x, y, gram, xty, y_sq = _correlated_problem(seed)
    plain = lasso_gram(gram, xty, alpha, y_sq=y_sq, tol=1e-14, max_sweeps=200_000, anderson_depth=0)
    accelerated = lasso_gram(gram, xty, alpha, y_sq=y_sq, tol=1e-14, max_sweeps=200_000)
    assert plain.converged and accelerated.converged
    np.testing.assert_allclose(accelerated.coef, plain.coef, atol=1e-8)
    np.testing.assert_array_equal(accelerated.coef == 0, plain.coef == 0)  # the same support, exact zeros
    for t in range(y.shape[1]):
        reference = Lasso(alpha=alpha, tol=1e-14, max_iter=1_000_000).fit(x, y[:, t])
        np.testing.assert_allclose(accelerated.coef[:, t], reference.coef_, atol=1e-6)


def test_anderson_acceleration_needs_fewer_sweeps_on_correlated_inputs():
    # Sweep counts, not times: the iterates are deterministic.
    _, _, gram, xty, y_sq = _correlated_problem(24, n=2000, p=24, t=8)
    plain = lasso_gram(gram, xty, 0.001, y_sq=y_sq, tol=1e-8, max_sweeps=200_000, anderson_depth=0)
    accelerated = lasso_gram(gram, xty, 0.001, y_sq=y_sq, tol=1e-8, max_sweeps=200_000)
    assert plain.converged and accelerated.converged
    assert accelerated.sweeps * 4 < plain.sweeps, (accelerated.sweeps, plain.sweeps)


def test_anderson_acceleration_on_iterates_that_stop_moving_stays_finite_and_silent():
    # Orthonormal inputs: coordinate descent is exact after one sweep, so every later difference is zero.
    gram, xty = np.eye(4), np.array([[0.9, -0.2], [0.05, 0.4], [-0.7, 0.0], [0.3, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution = lasso_gram(gram, xty, 0.1, tol=0.0, max_sweeps=30, anderson_depth=3)
    np.testing.assert_allclose(solution.coef, np.sign(xty) * np.maximum(np.abs(xty) - 0.1, 0.0))
    assert solution.sweeps == 30 and np.isfinite(solution.gap).all()


@pytest.mark.parametrize("depth", [-1, 2.5, True, "5"])
def test_anderson_depth_is_validated(depth):
    with pytest.raises(StageInputError, match="anderson_depth"):
        lasso_gram(np.eye(2), np.ones(2), 0.1, anderson_depth=depth)
