"""The ``similarity`` stage: every registered metric, layer × layer, with jackknife s.e. and a permutation null.

One node per model pair. It streams the pooled (one sample per image: the spatial mean of each channel, read
from extraction's summary parts) activations of every layer of both models into one
:class:`~repdissect.stages.compare.GroupedMoments` (per-group raw sums with the fourth-order terms of debiased
CKA; an image's jackknife group is a seeded hash of its index) and one
:class:`~repdissect.stages.compare.SubsetRows` (the fixed seeded subset of ``subset`` images for RSA and the
permutation null), and publishes :func:`~repdissect.stages.compare.similarity_table` over all (layer of A,
layer of B) pairs:

``similarity``  layer_a, layer_b, metric, metric_kind, value, se, ci_low, ci_high, jackknife_value, null_mean, null_q95,
                p_value, n, n_subset, groups
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import Context, StageOutput, StatisticStage, register_stage
from ._errors import StageInputError
from ._lazy import LazyModule
from ._stage_inputs import aligned_pooled, layer_blocks, layer_x_layer_shards, read_pooled_part

__all__ = ["SimilarityStage"]

_compare = LazyModule(".compare")


_ESTIMATES = ("value", "se", "ci_low", "ci_high", "jackknife_value", "null_mean", "null_q95")


def _flag_undefined(table: Any) -> Any:
    """Cached tables hold no NaN: ``valid`` (value defined), ``has_se``, ``has_null`` flag what is undefined
    (Fréchet of different widths, debiased CKA of a constant layer, a null that cannot move), whose cells are
    then 0 (p-value 1)."""
    table = table.copy()
    table.insert(table.columns.get_loc("value") + 1, "valid", np.isfinite(table["value"].to_numpy(float)))
    table["has_se"] = np.isfinite(table["se"].to_numpy(float))
    table["has_null"] = np.isfinite(table["p_value"].to_numpy(float))
    for column in _ESTIMATES:
        table[column] = np.nan_to_num(table[column].to_numpy(float), nan=0.0, posinf=0.0, neginf=0.0)
    table["p_value"] = np.nan_to_num(table["p_value"].to_numpy(float), nan=1.0)
    return table


@register_stage
class SimilarityStage(StatisticStage):
    """Layer × layer similarity for every registered metric, with uncertainty, from per-group sums."""

    name = "similarity"
    # 2: pooled samples are the float32 spatial means extraction stores (summaries), not means of the
    # float16-stored maps (differences ~1e-4 relative)
    version = 2
    #: the science modules this stage's result depends on (closed under their imports)
    depends_on = (".compare._grouped", ".compare._uncertainty", ".compare._registry", ".compare._threads",
                  ".compare._beyond", ".compare._cca_batched", ".compare._cca", ".compare._lapack",
                  ".compare._moments", ".compare._correlation", ".compare._pwcca_google", ".compare._factor_cache",
                  "._stage_inputs", "._activations")

    def shards(self, ctx: Context) -> list[Any]:
        return layer_x_layer_shards(ctx)

    def new_statistic(self, ctx: Context) -> dict[str, Any]:
        names, sizes = layer_blocks(ctx)
        p = ctx.params
        return {
            "moments": _compare.GroupedMoments(sizes, names, int(p["groups"])),
            "subset": _compare.SubsetRows(sizes, names, int(p["subset"]), int(p["seed"])),
        }

    def statistic_types(self, ctx: Context) -> dict[str, type]:
        return {"moments": _compare.GroupedMoments, "subset": _compare.SubsetRows}

    def update(self, ctx: Context, stat: dict[str, Any], shard_index: int, shard: Any) -> None:
        # Pooled samples are the units' spatial means, which extraction already stored (summary parts):
        # the maps themselves are never read here.
        ids, _ = read_pooled_part(ctx.inputs["a"].parts(f"summaries@{ctx.params['layers_a'][0]}")[shard])
        blocks = []
        for name in stat["moments"].names:
            role, layer = name.split(":", 1)
            blocks.append(aligned_pooled(ctx, role, layer, ids).astype(np.float64))
        stat["moments"].update(*blocks, group=_compare.group_of(ids, int(ctx.params["groups"]), int(ctx.params["seed"])))
        stat["subset"].update(*blocks, ids=ids)

    def publish(self, ctx: Context, stat: dict[str, Any]) -> StageOutput:
        p = ctx.params
        moments, subset = stat["moments"], stat["subset"]
        if moments.n < 4:
            raise StageInputError(f"the similarity stage needs at least 4 images; got {moments.n}. Use more images "
                                  "or set [similarity].enabled = false")
        names = moments.names
        pairs = [(a, b) for a in names if a.startswith("a:") for b in names if b.startswith("b:")]
        table = _compare.similarity_table(
            moments, pairs, list(p["metrics"]), subset=subset.rows(), subset_ids=subset.ids,
            permutations=int(p["permutations"]), seed=int(p["seed"]), group_seed=int(p["seed"]),
        )
        table["layer_a"] = table["layer_a"].str.slice(2)
        table["layer_b"] = table["layer_b"].str.slice(2)
        table = _flag_undefined(table)
        return StageOutput(tables={"similarity": table}, extras={"samples": moments.n, "subset": int(subset.ids.size)})
