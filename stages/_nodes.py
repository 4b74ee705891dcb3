"""The pipeline stages: thin wrappers that read cached inputs, call the science, return tables.

Each stage's docstring lists its output tables and columns (the reports read exactly these). Params that
reach a stage through ``ctx.params`` are the result-affecting ones the DAG put in the cache key; execution
settings come through ``ctx.execution``. The math lives in the private modules next to this one and is
usable without the pipeline.

Stages and their tables (``@<layer>`` marks one table per layer):

* ``train`` — ``history`` (epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds); file ``model.pt``;
  extras ``weights_sha256``, ``final_val_acc``.
* ``extract`` — ``activations@<layer>`` (parts: image, activations), ``summaries@<layer>`` (parts: image,
  max, argmax, mean), ``units@<layer>`` (unit, mean, mean_max, max, dead), ``shards`` (shard, start, stop).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ..pipeline._hashing import digest
from ..pipeline._stage import Context, ShardedStage, Stage, StageOutput, register_stage
from ._bundle import bundle, unbundle
from ._extraction import PARQUET_OPTIONS, UnitMeans, cached_model, extract_shard
from ._models import ModelSpec, build_model
from ._training import TrainConfig, load_checkpoint, state_dict_digest, train_model

__all__ = ["TrainStage", "ExtractStage", "model_spec_from_params"]


def model_spec_from_params(params: dict[str, Any], weights: str | None = None) -> ModelSpec:
    return ModelSpec(architecture=params["architecture"], arch_kwargs=dict(params["arch"]),
                     num_classes=params.get("num_classes"), weights=weights,
                     input_mean=tuple(params["input_mean"]), input_std=tuple(params["input_std"]))


@register_stage
class TrainStage(Stage):
    """Train one model spec from one seed on the dataset's class labels (deterministic on the CPU)."""

    name = "train"
    version = 1
    uses_device = True

    def run(self, ctx: Context) -> StageOutput:
        params = ctx.params
        spec = model_spec_from_params(params)
        config = TrainConfig.from_dict(params["train"])
        started = time.time()
        threads = int(ctx.execution.get("torch_threads") or 0) or None
        state, history = train_model(spec, ctx.dataset(), seed=int(params["seed"]), config=config,
                                     device=ctx.device(), num_threads=threads)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
        final = history.iloc[-1]
        return StageOutput(
            tables={"history": history},
            files={"model.pt": buffer.getvalue()},
            extras={"weights_sha256": state_dict_digest(state), "final_val_acc": float(final["val_acc"]),
                    "final_train_acc": float(final["train_acc"]), "epochs": int(len(history)),
                    "train_seconds": time.time() - started},
        )


def load_network(ctx: Context, activations_role: str | None = None) -> torch.nn.Module:
    """The network an ``extract`` node describes, built once per worker process and reused."""
    params = ctx.params
    model_key = digest({k: v for k, v in params.items() if k not in ("layers", "storage_dtype")}
                       | {"upstream": {r: e.key for r, e in ctx.inputs.items()}})

    def build() -> torch.nn.Module:
        spec = model_spec_from_params(params, weights=params.get("weights_path"))
        state = load_checkpoint(ctx.inputs["weights"].file("model.pt")) if "weights" in ctx.inputs else None
        return build_model(spec, seed=int(params["seed"]), state_dict=state)

    return cached_model(model_key, build)


@register_stage
class ExtractStage(ShardedStage):
    """Forward hooks on the configured layers; activation parts + per-unit summaries per shard of images."""

    name = "extract"
    version = 1
    uses_device = True

    def shards(self, ctx: Context) -> list[Any]:
        return [[r.start, r.stop] for r in ctx.dataset().shards(int(ctx.execution["shard_size"]))]

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        model = load_network(ctx)
        layers = list(ctx.params["layers"])
        outputs = extract_shard(model, layers, ctx.dataset(), np.arange(shard[0], shard[1]),
                                batch_size=int(ctx.execution["batch_size"]), device=ctx.device(),
                                dtype=ctx.params["storage_dtype"])
        states = {}
        for layer, out in outputs.items():
            ctx.write_part(f"activations@{layer}", shard_index, out.activations,
                           row_group_size=max(out.activations.num_rows, 1), **PARQUET_OPTIONS)
            ctx.write_part(f"summaries@{layer}", shard_index, out.summaries)
            states[layer] = UnitMeans.from_summaries(out.summaries).to_table()
        states["_shard"] = pa.table({"shard": [shard_index], "start": [shard[0]], "stop": [shard[1]]})
        return bundle(states)

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        ta, tb = unbundle(a), unbundle(b)
        merged = {}
        for name in ta:
            if name == "_shard":
                merged[name] = pa.concat_tables([ta[name], tb[name]])
            else:
                merged[name] = UnitMeans.from_table(ta[name]).merge(UnitMeans.from_table(tb[name])).to_table()
        return bundle(merged)

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        states = unbundle(merged)
        tables: dict[str, Any] = {}
        shapes = {}
        for layer in ctx.params["layers"]:
            stat = UnitMeans.from_table(states[layer])
            tables[f"units@{layer}"] = pd.DataFrame({
                "unit": np.arange(len(stat.mean)), "mean": stat.mean, "mean_max": stat.mean_max,
                "max": stat.max, "dead": stat.dead,
            })
        tables["shards"] = states["_shard"].sort_by("shard")
        for layer in ctx.params["layers"]:
            part = ctx.staging / f"activations@{layer}" / "part-00000.parquet"
            import pyarrow.parquet as pq

            from ._activations import activation_shape

            shapes[layer] = list(activation_shape(pq.read_schema(part)))
        return StageOutput(tables=tables, extras={"layer_shapes": shapes, "images": int(sum(
            s[1] - s[0] for s in zip(tables["shards"].column("start").to_pylist(),
                                     tables["shards"].column("stop").to_pylist())))})
