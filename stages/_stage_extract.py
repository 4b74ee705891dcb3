"""The ``extract`` stage: forward hooks on the configured layers, activation parts + per-unit summaries.

Tables (``@<layer>`` marks one table per layer): ``activations@<layer>`` (parts: image, activations),
``summaries@<layer>`` (parts: image, max, argmax, mean), ``units@<layer>`` (unit, mean, mean_max, max,
dead), ``shards`` (shard, start, stop). Extras: ``layer_shapes``, ``images``.

The dataset-wide part is two statistics per run of shards: :class:`~repdissect.stages.UnitMeans` per
layer and :class:`~repdissect.core.ShardRanges`; the big per-shard outputs (activations, summaries) are
staged as parts and never travel through the scheduler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import Context, ShardRanges, StageOutput, StatisticStage, digest, register_stage
from ._lazy import LazyModule
from ._stage_train import model_spec_from_params

__all__ = ["ExtractStage", "load_network"]

_activations = LazyModule("._activations")
_extraction = LazyModule("._extraction")
_model_cache = LazyModule("._model_cache")
_unit_means = LazyModule("._unit_means")
_models = LazyModule("._models")
_training = LazyModule("._training")
_device = LazyModule("._device")

#: name of the shard-range statistic next to the per-layer ones (layer names never start with "_")
_SHARDS = "_shard"


def load_network(ctx: Context) -> Any:
    """The network an ``extract`` node describes, built once per worker process and reused."""
    params = ctx.params
    model_key = digest({k: v for k, v in params.items() if k not in ("layers", "storage_dtype", "batch_size")}
                       | {"upstream": {r: e.key for r, e in ctx.inputs.items()}})

    def build() -> Any:
        spec = model_spec_from_params(params, weights=params.get("weights_path"))
        state = _training.load_checkpoint(ctx.inputs["weights"].file("model.pt")) if "weights" in ctx.inputs else None
        return _models.build_model(spec, seed=int(params["seed"]), state_dict=state)

    return _model_cache.cached_model(model_key, build)


@register_stage
class ExtractStage(StatisticStage):
    """Forward hooks on the configured layers; activation parts + per-unit summaries per shard of images."""

    name = "extract"
    # 2: non-null activation schema, row-group streamed parts, float16 summaries = float32 ones;
    # 3: shape/dtype also on the activations field (parts may be encoded by polars)
    # 4: forward batches fixed by the dataset (image i in batch i // batch_size), shards aligned to them
    version = 4
    uses_device = True
    depends_on = ("._stage_train", "._extraction", "._activations", "._unit_means", "._model_cache", "._models",
                  "._cnn", "._model_registry", "._checkpoints", "._training", "._train_config", "._device",
                  "._cpu_kernels", "._torch_build", "._interpretable", "._optim")

    def shards(self, ctx: Context) -> list[Any]:
        # Shards are whole numbers of forward batches, so the shard layout never changes a batch's images.
        batch = int(ctx.params["batch_size"])
        size = -(-int(ctx.execution["shard_size"]) // batch) * batch
        return [[r.start, r.stop] for r in ctx.dataset().shards(size)]

    def new_statistic(self, ctx: Context) -> dict[str, Any]:
        return {**{layer: _unit_means.UnitMeans() for layer in ctx.params["layers"]}, _SHARDS: ShardRanges()}

    def statistic_types(self, ctx: Context) -> dict[str, type]:
        return {**{layer: _unit_means.UnitMeans for layer in ctx.params["layers"]}, _SHARDS: ShardRanges}

    def update(self, ctx: Context, stat: dict[str, Any], shard_index: int, shard: Any) -> None:
        _device.check_device_params(dict(ctx.params), ctx.device(), training=False)
        model = load_network(ctx)
        layers = list(ctx.params["layers"])

        def open_part(layer: str, schema: pa.Schema, *, row_group_size: int) -> Any:
            # Activation parts are written row group by row group from background threads, overlapping
            # the next batches' forward passes when a core is free for it; polars encodes them when
            # installed (2–7× less CPU than pyarrow on these long list columns, same tables when read).
            return ctx.open_part(f"activations@{layer}", shard_index, schema,
                                 engine=ctx.execution.get("parquet_engine", "auto"),
                                 row_group_size=row_group_size, **_extraction.PARQUET_OPTIONS)

        outputs = _extraction.extract_shard(model, layers, ctx.dataset(), np.arange(shard[0], shard[1]),
                                            batch_size=int(ctx.params["batch_size"]), device=ctx.device(),
                                            dtype=ctx.params["storage_dtype"], write_parts=open_part)
        for layer, out in outputs.items():
            ctx.write_part(f"summaries@{layer}", shard_index, out.summaries)
            stat[layer].merge(_unit_means.UnitMeans.from_summaries(out.summaries))
        stat[_SHARDS].update(shard_index, shard[0], shard[1])

    def publish(self, ctx: Context, stat: dict[str, Any]) -> StageOutput:
        tables: dict[str, Any] = {f"units@{layer}": stat[layer].result() for layer in ctx.params["layers"]}
        shards = stat[_SHARDS].result()
        tables["shards"] = shards
        shapes = {}
        for layer in ctx.params["layers"]:
            part = ctx.staging / f"activations@{layer}" / "part-00000.parquet"
            shapes[layer] = list(_activations.activation_shape(pq.read_schema(part)))
        images = int(sum(stop - start for start, stop in zip(shards.column("start").to_pylist(),
                                                              shards.column("stop").to_pylist())))
        return StageOutput(tables=tables, extras={"layer_shapes": shapes, "images": images})
