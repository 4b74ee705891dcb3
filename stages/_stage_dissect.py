"""The Network Dissection stages over one layer: ``thresholds`` then ``iou``.

* ``thresholds`` — ``thresholds`` (unit, threshold, count): exact ``numpy.quantile(values, 1 - q)`` per unit,
  from :class:`~repdissect.stages.TopQuantile` (top-k) or, past the memory budget,
  :class:`~repdissect.stages.RadixQuantile` (exact radix select over several passes); extras ``method``,
  ``passes``.
* ``iou`` — ``unit_label`` (unit, label, name, category, intersection, activation, truth, iou), ``units``
  (unit, label, name, category, iou, interpretable, then ``<cat>_label``/``<cat>_name``/``<cat>_iou``),
  ``summary`` (units, interpretable_units, unique_detectors_total, iou_threshold, ``detectors_<cat>``,
  ``unique_detectors_<cat>``, union); extras ``images``.
"""

from __future__ import annotations

from typing import Any

from ..core import Context, StageOutput, StatisticStage, register_stage
from ._errors import StageInputError
from ._lazy import LazyModule
from ._stage_inputs import layer_parts, read_part

__all__ = ["ThresholdsStage", "IoUStage"]

_thresholds = LazyModule("._thresholds")
_iou = LazyModule("._iou")
_iou_tables = LazyModule("._iou_tables")


@register_stage
class ThresholdsStage(StatisticStage):
    """Per-unit top-quantile threshold, exact and mergeable (top-k; radix select past the memory budget)."""

    name = "thresholds"
    version = 1
    depends_on = ("._thresholds", "._topk", "._stage_inputs", "._activations")

    def _method(self, ctx: Context) -> tuple[int, str, int]:
        extract = ctx.inputs["activations"]
        images = int(extract.extras["images"])
        shape = tuple(extract.extras["layer_shapes"][ctx.params["layer"]])
        budget = int(ctx.node.exec_params.get("memory_budget_mb", 256)) * 2**20
        dtype = extract.manifest["params"].get("storage_dtype", "float32")
        method = _thresholds.threshold_method(images, shape, dtype, float(ctx.params["quantile"]), budget)
        return images, method, budget

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(layer_parts(ctx, "activations"))))

    def new_statistic(self, ctx: Context) -> Any:
        images, method, budget = self._method(ctx)
        cls = _thresholds.TopQuantile if method == "topk" else _thresholds.RadixQuantile
        return cls(images, float(ctx.params["quantile"]), budget)

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        stat.update(read_part(layer_parts(ctx, "activations")[shard])[1])

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        method = "topk" if isinstance(stat, _thresholds.TopQuantile) else "radix"
        passes = stat.passes if method == "radix" else 1
        return StageOutput(tables={"thresholds": stat.result()}, extras={"method": method, "passes": passes})


#: images per IoUTally.update within a shard
IOU_IMAGES_PER_UPDATE = 64


@register_stage
class IoUStage(StatisticStage):
    """Network Dissection IoU tally of one layer: integer counts per shard, merged by addition."""

    name = "iou"
    # 2: [iou].union keyed (NetDissect's "category-images" or NetDissect-Lite's rule); summary has ``union``
    version = 2
    uses_device = True
    depends_on = ("._iou", "._iou_geometry", "._iou_kernels", "._iou_tables", "._stage_inputs", "._activations")

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(layer_parts(ctx, "activations"))))

    def new_statistic(self, ctx: Context) -> Any:
        dataset = ctx.dataset()
        if not dataset.concepts:
            raise StageInputError(
                f"dataset kind {dataset.kind!r} has no concept labels, so units cannot be dissected; use a dataset "
                "with masks (synthetic, broden) or disable dissection"
            )
        return _iou.IoUTally(dataset.concepts, dataset.seg_size, device=ctx.device(), union=ctx.params["union"])

    def statistic_types(self, ctx: Context) -> type:
        return _iou.IoUTally

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        ids, acts = read_part(layer_parts(ctx, "activations")[shard])
        thresholds = ctx.inputs["thresholds"].table("thresholds").column("threshold").to_numpy()
        dataset = ctx.dataset()
        # Counted in groups of images: the counts are integer sums (the same in any grouping), and a group's
        # float32 maps, label maps and label tables are a fraction of the shard's (the demo's conv2 shard of 500
        # images added 300 MiB counted whole)
        for start in range(0, len(ids), IOU_IMAGES_PER_UPDATE):
            part = slice(start, start + IOU_IMAGES_PER_UPDATE)
            stat.update(acts[part], thresholds, dataset.load(ids[part]), ids[part])

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        tables = _iou_tables.iou_tables(stat, ctx.dataset().concepts, float(ctx.params["iou_threshold"]))
        tables["summary"]["union"] = stat.union
        return StageOutput(tables=tables, extras={"images": int(stat.images)})
