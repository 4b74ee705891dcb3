"""The location-stability stages (Zhang et al.): ``stability`` per layer and the ``stability_center`` baseline.

* ``stability`` — ``unit_landmark`` (unit, landmark, landmark_name, images, deviation, valid), ``units``
  (unit, landmarks, instability, constant, valid), ``summary`` (units, valid_units, landmarks, top_k,
  instability).
* ``stability_center`` — the same three tables for the image-centre predictor (one pseudo-unit 0), using
  ``top_k`` visible images per landmark drawn by a seeded generator (the units' sample size).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..core import Context, Stage, StageOutput, StatisticStage, register_stage
from ._lazy import LazyModule
from ._stage_inputs import layer_parts

__all__ = ["StabilityStage", "StabilityCenterStage"]

_activations = LazyModule("._activations")
_stability = LazyModule("._stability")


@register_stage
class StabilityStage(StatisticStage):
    """Location instability of one layer's units against the dataset's landmarks (Zhang et al.)."""

    name = "stability"
    version = 1
    depends_on = ("._stability", "._topk", "._stage_inputs", "._activations")

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(layer_parts(ctx, "activations", "summaries"))))

    def new_statistic(self, ctx: Context) -> Any:
        return _stability.LandmarkTopK(ctx.dataset().image_size, int(ctx.params["top_k"]))

    def statistic_types(self, ctx: Context) -> type:
        return _stability.LandmarkTopK

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        summaries = _activations.read_summaries(pq.read_table(layer_parts(ctx, "activations", "summaries")[shard]))
        stat.update(summaries.max, summaries.argmax, summaries.shape[1:], ctx.dataset().load(summaries.image),
                    summaries.image)

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        return StageOutput(tables=_stability.stability_tables(stat, ctx.dataset().landmark_names))


@register_stage
class StabilityCenterStage(Stage):
    """The image-centre predictor's location instability (the baseline every unit should beat)."""

    name = "stability_center"
    version = 1
    depends_on = ("._stability", "._topk")

    def run(self, ctx: Context) -> StageOutput:
        dataset = ctx.dataset()
        landmarks, visible = [], []
        for rng in dataset.shards(int(ctx.execution.get("shard_size", 512))):
            batch = dataset.load(np.arange(rng.start, rng.stop))
            landmarks.append(batch.landmarks)
            visible.append(batch.landmark_visible)
        tables = _stability.center_baseline(np.concatenate(landmarks), np.concatenate(visible), dataset.image_size,
                                            dataset.landmark_names, sample_size=int(ctx.params["top_k"]), seed=0)
        return StageOutput(tables=tables)
