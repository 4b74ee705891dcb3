"""The comparison stages between two networks: ``moments`` → ``compare`` per layer pair, ``cka`` per pair.

* ``moments`` — ``train`` and ``heldout``: serialised :class:`~repdissect.stages.compare.JointMoments`
  (n, means, centred co-moments in float64) of two nets' channels at one layer pair; images are split by a
  hash of their index (``holdout`` fraction held out).
* ``compare`` — the tables of :func:`~repdissect.stages.compare.compare_moments`: ``units``, ``correlation``,
  ``within_correlation``, ``matches``, ``hopcroft_karp``, ``regression``, ``cca``, ``svcca``, ``metrics``,
  ``summary``.
* ``cka`` — ``cka`` (layer_a, layer_b, linear_cka): layer × layer linear CKA of pooled (one per image) samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import Context, Stage, StageOutput, StatisticStage, register_stage
from ._errors import StageInputError
from ._lazy import LazyModule
from ._stage_inputs import (aligned_part, aligned_pooled, layer_blocks, layer_x_layer_shards, read_part,
                            read_pooled_part)

__all__ = ["MomentsStage", "CompareStage", "CKAStage", "heldout_mask"]

_compare = LazyModule(".compare")


def heldout_mask(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic per-image split: True for held-out images (a splitmix64 hash of the index < fraction)."""
    x = np.asarray(image_ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


_SPLITS = ("train", "heldout")


@register_stage
class MomentsStage(StatisticStage):
    """Streaming joint first/second moments of two nets' channels (train and held-out image splits)."""

    name = "moments"
    # 2: co-moments by chunked dsyrk (same values to rounding); 3: per-position samples of equal grids streamed
    # from the maps (update_maps: same sums in another order, equal to rounding); 4: batches summed about one
    # reference shift, settled once (equal to rounding), and the keyed precision (float32 products opt-in);
    # 5: reference shift 0 for near-zero-mean channels, float32 products summed over two chunks (equal to rounding)
    version = 5
    depends_on = (".compare._moments", ".compare._correlation", ".compare._samples", "._stage_inputs",
                  "._activations")

    def _channels(self, ctx: Context) -> tuple[int, int]:
        ca = ctx.inputs["a"].extras["layer_shapes"][ctx.params["layer_a"]][0]
        cb = ctx.inputs["b"].extras["layer_shapes"][ctx.params["layer_b"]][0]
        return int(ca), int(cb)

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(ctx.inputs["a"].parts(f"activations@{ctx.params['layer_a']}"))))

    def new_statistic(self, ctx: Context) -> dict[str, Any]:
        precision = ctx.params.get("precision", "float64")  # hand-built nodes may omit it
        return {split: _compare.JointMoments(*self._channels(ctx), precision) for split in _SPLITS}

    def statistic_types(self, ctx: Context) -> dict[str, type]:
        return {split: _compare.JointMoments for split in _SPLITS}

    def update(self, ctx: Context, stat: dict[str, Any], shard_index: int, shard: Any) -> None:
        p = ctx.params
        ids, acts_a = read_part(ctx.inputs["a"].parts(f"activations@{p['layer_a']}")[shard])
        acts_b = aligned_part(ctx, "b", p["layer_b"], ids)
        held = heldout_mask(ids, float(p["holdout"]))
        # Per-position samples of equal grids go straight from the maps into the rank-k update (no channels-last
        # float32 copy of the samples); other layouts are cut into samples first.
        direct = (p["samples"] == "positions" and acts_a.ndim == 4 and acts_b.ndim == 4
                  and acts_a.shape[2:] == acts_b.shape[2:])
        for split, mask in (("train", ~held), ("heldout", held)):
            if mask.any():
                if direct:  # the split's images gathered slice by slice, not copied out whole first
                    stat[split].update_maps(acts_a, acts_b, images=np.flatnonzero(mask))
                    continue
                a, b = _compare.samples_from_maps(acts_a[mask], acts_b[mask], mode=p["samples"], resize=p["resize"])
                stat[split].update(a, b)

    def publish(self, ctx: Context, stat: dict[str, Any]) -> StageOutput:
        n = {split: s.n for split, s in stat.items()}
        if n["train"] < 2:
            raise StageInputError(
                f"layer pair {ctx.params['layer_a']!r}/{ctx.params['layer_b']!r} has {n['train']} training samples; "
                "comparisons need at least 2 (use more images or a smaller [compare].holdout)"
            )
        if n["heldout"] < 1:  # the regression metrics are scored on held-out images
            raise StageInputError(
                f"layer pair {ctx.params['layer_a']!r}/{ctx.params['layer_b']!r} has no held-out samples: none of "
                f"the images fell into the [compare].holdout = {ctx.params['holdout']} split (drawn by a hash of "
                "the image index); use more images or a larger [compare].holdout"
            )
        return StageOutput(tables={split: s.to_table() for split, s in stat.items()}, extras={"samples": n})


@register_stage
class CompareStage(Stage):
    """Correlation, matching, regression, SVCCA/PWCCA/CKA of one layer pair from its moments."""

    name = "compare"
    # 2: pwcca is google/svcca's convention, the paper form is pwcca_morcos; 3: CCA and SVCCA take singular
    # values alone (no singular vectors: the same values to rounding); 4: the lasso is Anderson-accelerated (other
    # iterates, the same optimum to the duality-gap tolerance)
    version = 4
    #: the science modules this stage's result depends on (compare_arrays' registry path included)
    depends_on = (".compare._compare", ".compare._cca", ".compare._lapack", ".compare._correlation",
                  ".compare._matching", ".compare._moments", ".compare._regression", ".compare._pwcca_google",
                  ".compare._registry", ".compare._threads", ".compare._grouped", ".compare._uncertainty",
                  ".compare._beyond", ".compare._cca_batched", ".compare._factor_cache")

    def run(self, ctx: Context) -> StageOutput:
        p = ctx.params
        train = _compare.JointMoments.from_table(ctx.inputs["moments"].table("train"))
        heldout = _compare.JointMoments.from_table(ctx.inputs["moments"].table("heldout"))
        tables = _compare.compare_moments(train, heldout, alphas=list(p["alphas"]),
                                          thresholds=list(p["match_thresholds"]),
                                          svcca_keep=float(p["svcca_keep"]), lasso_tol=float(p["lasso_tol"]),
                                          max_sweeps=int(p["lasso_max_sweeps"]))
        return StageOutput(tables=tables)


@register_stage
class CKAStage(StatisticStage):
    """Layer × layer linear CKA between two models from one joint statistic of pooled samples."""

    name = "cka"
    # 2: co-moments by chunked dsyrk (same values to rounding); 3: pooled samples are the float32 spatial means
    # extraction stores (summaries), not means of the float16-stored maps (differences ~1e-4 relative);
    # 4: moments summed about one reference shift (equal to rounding), and the keyed precision; 5: reference
    # shift 0 for near-zero-mean channels, float32 products summed over two chunks (equal to rounding)
    version = 5
    depends_on = (".compare._cca", ".compare._lapack", ".compare._moments", ".compare._correlation", "._stage_inputs",
                  "._activations")

    def shards(self, ctx: Context) -> list[Any]:
        return layer_x_layer_shards(ctx)

    def new_statistic(self, ctx: Context) -> Any:
        names, sizes = layer_blocks(ctx)
        return _compare.MultiMoments(sizes, names, ctx.params.get("precision", "float64"))

    def statistic_types(self, ctx: Context) -> type:
        return _compare.MultiMoments

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        # Pooled samples are the units' spatial means, which extraction already stored (summary parts):
        # the maps themselves are never read here.
        ids, _ = read_pooled_part(ctx.inputs["a"].parts(f"summaries@{ctx.params['layers_a'][0]}")[shard])
        blocks = []
        for name in stat.names:
            role, layer = name.split(":", 1)
            blocks.append(aligned_pooled(ctx, role, layer, ids))
        stat.update(*blocks)

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        names = stat.names
        table = _compare.cka_matrix(stat, [n for n in names if n.startswith("a:")], [n for n in names if n.startswith("b:")])
        table["layer_a"] = table["layer_a"].str.slice(2)
        table["layer_b"] = table["layer_b"].str.slice(2)
        return StageOutput(tables={"cka": table}, extras={"samples": stat.n})
