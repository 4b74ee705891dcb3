"""The ``sensitivity`` stage: Ding et al. 2021's principal-component deletion test of every comparison metric.

One node per model with trained seeds on a dataset with class labels. It streams the pooled (spatial mean per
channel) activations of every listed layer of every trained seed, with the images' class labels, into one
:class:`~repdissect.stages.compare.SubsetRows` (the ``images`` images with the smallest seeded hash of their
index: all of them when the dataset is smaller), then per layer runs
:func:`~repdissect.stages.compare.sensitivity_rows` — probes trained on the dataset's ``train`` split, metrics and
accuracies on its held-out (``val``) split — and publishes:

``sensitivity``       layer, design, order, metric, metric_kind, rho, rho_p, tau, tau_p, bad_frac, rows, defined
``sensitivity_rows``  layer, reference, deleted, order, components, variance_deleted, metric, metric_kind, value,
                      valid, dissimilarity, accuracy_full, accuracy_deleted, accuracy_drop, functional

(cached tables hold no NaN: ``defined``/``valid`` flag undefined cells, which are 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import Context, StageOutput, StatisticStage, register_stage
from ._errors import StageInputError
from ._lazy import LazyModule
from ._stage_inputs import aligned_pooled, read_pooled_part

__all__ = ["SensitivityStage"]

_compare = LazyModule(".compare")

_LABEL = "label"


def _blocks(ctx: Context) -> tuple[list[str], list[int]]:
    names, sizes = [], []
    for role in ctx.params["roles"]:
        shapes = ctx.inputs[role].extras["layer_shapes"]
        for layer in ctx.params["layers"]:
            names.append(f"{role}:{layer}")
            sizes.append(int(shapes[layer][0]))
    return names + [_LABEL], sizes + [1]


@register_stage
class SensitivityStage(StatisticStage):
    """Principal-component deletion vs linear-probe accuracy, rank-correlated per metric and layer."""

    name = "sensitivity"
    # 2: pooled samples are the float32 spatial means extraction stores (summaries), not means of the
    # float16-stored maps (differences ~1e-4 relative); the maps are no longer read (demo map tasks +343 → +129 MiB)
    version = 2
    #: the science modules this stage's result depends on (closed under their imports)
    depends_on = (".compare._sensitivity", ".compare._grouped", ".compare._uncertainty", ".compare._registry",
                  ".compare._threads", ".compare._beyond", ".compare._cca_batched", ".compare._cca",
                  ".compare._lapack", ".compare._moments", ".compare._correlation", ".compare._pwcca_google",
                  ".compare._factor_cache", "._stage_inputs", "._activations")

    def shards(self, ctx: Context) -> list[Any]:
        first = ctx.params["roles"][0]
        return list(range(len(ctx.inputs[first].parts(f"activations@{ctx.params['layers'][0]}"))))

    def new_statistic(self, ctx: Context) -> Any:
        names, sizes = _blocks(ctx)
        return _compare.SubsetRows(sizes, names, int(ctx.params["images"]), int(ctx.params["seed"]))

    def statistic_types(self, ctx: Context) -> type:
        return _compare.SubsetRows

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        # Pooled samples are the units' spatial means, which extraction already stored (summary parts, float32
        # means of the float32 maps): the maps themselves are never read here, as in the CKA stage.
        p = ctx.params
        ids, _ = read_pooled_part(ctx.inputs[p["roles"][0]].parts(f"summaries@{p['layers'][0]}")[shard])
        blocks = []
        for name in stat.names[:-1]:
            role, layer = name.split(":", 1)
            blocks.append(np.asarray(aligned_pooled(ctx, role, layer, ids), dtype=np.float64))
        labels = ctx.dataset().load(np.asarray(ids, np.int64)).class_label
        if labels is None:
            raise StageInputError("the sensitivity test needs class labels for its probes; this dataset has none. "
                                  "Set [sensitivity].enabled = false")
        blocks.append(np.asarray(labels, np.float64)[:, None])
        stat.update(*blocks, ids=ids)

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        p = ctx.params
        rows = stat.rows()
        labels = rows.pop(_LABEL)[:, 0].astype(np.int64)
        ids = stat.ids
        known = labels >= 0
        train = np.isin(ids, ctx.dataset().split_indices("train"))
        if (train & known).sum() < 2 or (~train & known).sum() < 4:
            raise StageInputError(
                f"the sensitivity test needs ≥ 2 labelled training and ≥ 4 labelled held-out images; got "
                f"{int((train & known).sum())} and {int((~train & known).sum())}. Use more images or set "
                "[sensitivity].enabled = false")
        layers = {layer: {str(role)[1:]: rows[f"{role}:{layer}"][known] for role in p["roles"]}
                  for layer in p["layers"]}
        summary, detail = _compare.sensitivity_test(
            layers, labels[known], train[known], list(p["metrics"]), orders=list(p["orders"]), steps=int(p["steps"]),
            rows_limit=int(p["rsa_images"]))
        return StageOutput(tables={"sensitivity": summary, "sensitivity_rows": detail},
                           extras={"images": int(known.sum()), "heldout": int((~train & known).sum())})
