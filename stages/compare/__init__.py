"""Comparing the representations of two nets (Li et al. 2016; SVCCA, PWCCA, CKA), all from streamed moments.

Every metric is a function of one mergeable statistic per (model pair, layer pair): :class:`JointMoments`
(n, means and the full centred co-moment matrix of both nets' channels, float64). Memory is O((Ca + Cb)²),
independent of the number of images. The pipeline stage accumulates one statistic per split (train, held-out)
and calls :func:`compare_moments`; :func:`compare_arrays` does the same for two in-memory arrays (the
``repdissect compare`` command). The ``*_arrays`` functions are independent in-memory implementations on
(samples × units) arrays, used as test references and benchmark baselines.

Beyond that statistic: :class:`GroupedMoments` keeps the same sums per hashed jackknife group plus the
fourth-order terms of debiased CKA, so every registered metric (:data:`REGISTRY`: debiased CKA, Procrustes,
netrep shape metrics, Fréchet distance, google/svcca's PWCCA, …) comes with a leave-one-group-out jackknife
(:func:`jackknife`, total − group, no second pass); :class:`SubsetRows` keeps a fixed seeded image subset for
RSA and the permutation null; :func:`similarity_table` puts it together for layer × layer tables and
:func:`layer_identification` is Kornblith et al.'s sanity test; :func:`sensitivity_rows` /
:func:`sensitivity_summary` are Ding et al.'s principal-component deletion test.
"""

from ._arrays import (
    cca_arrays,
    correlation_arrays,
    linear_cka_arrays,
    linear_cka_gram,
    pwcca_arrays,
    svcca_arrays,
)
from ._cca import (
    CanonicalCorrelations,
    PWCCAResult,
    cca_family,
    cca_from_covariance,
    cka_matrix,
    linear_cka_from_covariance,
    pwcca_from_covariance,
    svcca_dims,
    svcca_from_covariance,
)
from ._compare import DEFAULT_THRESHOLDS, METRICS, compare_arrays, compare_moments
from ._correlation import correlation_from_covariance, dead_units, within_net_max_correlation
from ._matching import Matching, bottleneck_matching, hungarian_matching, matched_counts, semi_matching
from ._moments import PRECISIONS, JointMoments, MultiMoments
from ._regression import (
    DEFAULT_ALPHAS,
    LassoSolution,
    RegressionResult,
    lasso_gram,
    least_squares_gram,
    regression_from_moments,
)
from ._samples import samples_from_maps
from ._beyond import (
    debiased_cka_arrays,
    debiased_cka_moments,
    frechet_arrays,
    frechet_moments,
    linear_cka_moments,
    procrustes_arrays,
    procrustes_moments,
    rdm_correlation,
    rsa_arrays,
    shape_metric_arrays,
    shape_metric_moments,
)
from ._grouped import GroupedMoments, MomentState, SubsetRows, group_of, hash_ids
from ._pwcca_google import GooglePWCCAResult, pwcca_google_arrays, pwcca_google_from_moments
from ._registry import DEFAULT_METRICS, REGISTRY, Metric, resolve_metrics
from ._sanity import layer_identification
from ._sensitivity import (
    delete_components,
    deletion_counts,
    fit_probe,
    principal_components,
    probe_accuracy,
    rank_statistics,
    sensitivity_rows,
    sensitivity_summary,
    sensitivity_test,
)
from ._uncertainty import jackknife, permutation_pvalue, permuted_states, similarity_table

__all__ = [
    # statistics and sample preparation
    "JointMoments",
    "MultiMoments",
    "PRECISIONS",
    "samples_from_maps",
    # one call per layer pair
    "compare_moments",
    "compare_arrays",
    "METRICS",
    "DEFAULT_ALPHAS",
    "DEFAULT_THRESHOLDS",
    # correlation and matching
    "dead_units",
    "correlation_from_covariance",
    "within_net_max_correlation",
    "Matching",
    "semi_matching",
    "hungarian_matching",
    "matched_counts",
    "bottleneck_matching",
    # regression
    "LassoSolution",
    "RegressionResult",
    "lasso_gram",
    "least_squares_gram",
    "regression_from_moments",
    # CCA family and CKA from moments
    "CanonicalCorrelations",
    "PWCCAResult",
    "cca_family",
    "cca_from_covariance",
    "svcca_from_covariance",
    "svcca_dims",
    "pwcca_from_covariance",
    "linear_cka_from_covariance",
    "cka_matrix",
    # in-memory references on (samples × units) arrays
    "correlation_arrays",
    "cca_arrays",
    "svcca_arrays",
    "pwcca_arrays",
    "linear_cka_arrays",
    "linear_cka_gram",
    # google/svcca PWCCA convention
    "GooglePWCCAResult",
    "pwcca_google_from_moments",
    "pwcca_google_arrays",
    # per-group sums, metrics beyond CKA, registry and uncertainty
    "GroupedMoments",
    "MomentState",
    "SubsetRows",
    "group_of",
    "hash_ids",
    "linear_cka_moments",
    "debiased_cka_moments",
    "procrustes_moments",
    "shape_metric_moments",
    "frechet_moments",
    "debiased_cka_arrays",
    "procrustes_arrays",
    "shape_metric_arrays",
    "frechet_arrays",
    "rsa_arrays",
    "rdm_correlation",
    "Metric",
    "REGISTRY",
    "DEFAULT_METRICS",
    "resolve_metrics",
    "jackknife",
    "permutation_pvalue",
    "permuted_states",
    "similarity_table",
    "layer_identification",
    # Ding et al. 2021's principal-component deletion test
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
