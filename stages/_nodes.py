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
* ``thresholds`` — ``thresholds`` (unit, threshold, count): exact ``numpy.quantile(values, 1 - q)``.
* ``iou`` — ``unit_label`` (unit, label, name, category, intersection, activation, truth, iou), ``units``
  (unit, label, name, category, iou, interpretable, then ``<cat>_label``/``<cat>_name``/``<cat>_iou``),
  ``summary`` (units, interpretable_units, unique_detectors_total, iou_threshold, ``detectors_<cat>``,
  ``unique_detectors_<cat>``).
* ``stability`` — ``unit_landmark`` (unit, landmark, landmark_name, images, deviation, valid), ``units``
  (unit, landmarks, instability, constant, valid), ``summary`` (units, valid_units, landmarks, top_k,
  instability).
* ``stability_center`` — the same three tables for the image-centre predictor (one pseudo-unit 0), using
  ``top_k`` visible images per landmark drawn by a seeded generator (the units' sample size).
* ``moments`` — ``train`` and ``heldout``: serialised :class:`~repdissect.stages.compare.JointMoments`
  (n, means, centred co-moments in float64) of two nets' channels at one layer pair; images are split by a
  hash of their index (``holdout`` fraction held out).
* ``compare`` — the tables of :func:`~repdissect.stages.compare.compare_moments`: ``units``, ``correlation``,
  ``within_correlation``, ``matches``, ``hopcroft_karp``, ``regression``, ``cca``, ``svcca``, ``metrics``,
  ``summary``.
* ``cka`` — ``cka`` (layer_a, layer_b, linear_cka): layer × layer linear CKA of pooled (one per image) samples.
"""

from __future__ import annotations

import importlib
import io
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline._hashing import digest
from ..pipeline._stage import Context, ShardedStage, Stage, StageOutput, register_stage
from ._bundle import bundle, unbundle
from ._errors import StageInputError

if TYPE_CHECKING:  # the module itself is imported lazily (it pulls in torch)
    from ._models import ModelSpec


class _Lazy:
    """A module imported on first attribute access.

    Registering the stages must stay cheap: a fully cached rerun looks up keys and never needs torch or
    scipy, so the science modules load only when a stage actually computes.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name, __package__)
        return getattr(self._module, attr)


_activations = _Lazy("._activations")
_extraction = _Lazy("._extraction")
_models = _Lazy("._models")
_training = _Lazy("._training")
_thresholds = _Lazy("._thresholds")
_iou = _Lazy("._iou")
_stability = _Lazy("._stability")
_compare = _Lazy(".compare")


def _torch() -> ModuleType:
    return importlib.import_module("torch")

__all__ = ["TrainStage", "ExtractStage", "model_spec_from_params"]


def model_spec_from_params(params: dict[str, Any], weights: str | None = None) -> ModelSpec:
    return _models.ModelSpec(architecture=params["architecture"], arch_kwargs=dict(params["arch"]),
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
        config = _training.TrainConfig.from_dict(params["train"])
        started = time.time()
        threads = int(ctx.execution.get("torch_threads") or 0) or None
        state, history = _training.train_model(spec, ctx.dataset(), seed=int(params["seed"]), config=config,
                                     device=ctx.device(), num_threads=threads)
        buffer = io.BytesIO()
        _torch().save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
        final = history.iloc[-1]
        return StageOutput(
            tables={"history": history},
            files={"model.pt": buffer.getvalue()},
            extras={"weights_sha256": _training.state_dict_digest(state), "final_val_acc": float(final["val_acc"]),
                    "final_train_acc": float(final["train_acc"]), "epochs": int(len(history)),
                    "train_seconds": time.time() - started},
        )


def load_network(ctx: Context) -> Any:
    """The network an ``extract`` node describes, built once per worker process and reused."""
    params = ctx.params
    model_key = digest({k: v for k, v in params.items() if k not in ("layers", "storage_dtype", "batch_size")}
                       | {"upstream": {r: e.key for r, e in ctx.inputs.items()}})

    def build() -> Any:
        spec = model_spec_from_params(params, weights=params.get("weights_path"))
        state = _training.load_checkpoint(ctx.inputs["weights"].file("model.pt")) if "weights" in ctx.inputs else None
        return _models.build_model(spec, seed=int(params["seed"]), state_dict=state)

    return _extraction.cached_model(model_key, build)


@register_stage
class ExtractStage(ShardedStage):
    """Forward hooks on the configured layers; activation parts + per-unit summaries per shard of images."""

    name = "extract"
    # 2: non-null activation schema, row-group streamed parts, float16 summaries = float32 ones;
    # 3: shape/dtype also on the activations field (parts may be encoded by polars)
    # 4: forward batches fixed by the dataset (image i in batch i // batch_size), shards aligned to them
    version = 4
    uses_device = True

    def shards(self, ctx: Context) -> list[Any]:
        # Shards are whole numbers of forward batches, so the shard layout never changes a batch's images.
        batch = int(ctx.params["batch_size"])
        size = -(-int(ctx.execution["shard_size"]) // batch) * batch
        return [[r.start, r.stop] for r in ctx.dataset().shards(size)]

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
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
        states = {}
        for layer, out in outputs.items():
            ctx.write_part(f"summaries@{layer}", shard_index, out.summaries)
            states[layer] = _extraction.UnitMeans.from_summaries(out.summaries).to_table()
        states["_shard"] = pa.table({"shard": [shard_index], "start": [shard[0]], "stop": [shard[1]]})
        return bundle(states)

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        ta, tb = unbundle(a), unbundle(b)
        merged = {}
        for name in ta:
            if name == "_shard":
                merged[name] = pa.concat_tables([ta[name], tb[name]])
            else:
                merged[name] = _extraction.UnitMeans.from_table(ta[name]).merge(_extraction.UnitMeans.from_table(tb[name])).to_table()
        return bundle(merged)

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        states = unbundle(merged)
        tables: dict[str, Any] = {}
        shapes = {}
        for layer in ctx.params["layers"]:
            stat = _extraction.UnitMeans.from_table(states[layer])
            tables[f"units@{layer}"] = pd.DataFrame({
                "unit": np.arange(len(stat.mean)), "mean": stat.mean, "mean_max": stat.mean_max,
                "max": stat.max, "dead": stat.dead,
            })
        tables["shards"] = states["_shard"].sort_by("shard")
        for layer in ctx.params["layers"]:
            part = ctx.staging / f"activations@{layer}" / "part-00000.parquet"
            shapes[layer] = list(_activations.activation_shape(pq.read_schema(part)))
        return StageOutput(tables=tables, extras={"layer_shapes": shapes, "images": int(sum(
            s[1] - s[0] for s in zip(tables["shards"].column("start").to_pylist(),
                                     tables["shards"].column("stop").to_pylist())))})


def _layer_parts(ctx: Context, role: str, kind: str = "activations") -> list:
    return ctx.inputs[role].parts(f"{kind}@{ctx.params['layer']}")


def _read_part(path) -> tuple[np.ndarray, np.ndarray]:
    return _activations.table_to_arrays(pq.read_table(path))


@register_stage
class ThresholdsStage(ShardedStage):
    """Per-unit top-quantile threshold, exact and mergeable (top-k; radix select past the memory budget)."""

    name = "thresholds"
    version = 1

    def _plan(self, ctx: Context) -> tuple[int, str, int]:
        extract = ctx.inputs["activations"]
        images = int(extract.extras["images"])
        shape = tuple(extract.extras["layer_shapes"][ctx.params["layer"]])
        budget = int(ctx.node.exec_params.get("memory_budget_mb", 256)) * 2**20
        dtype = extract.manifest["params"].get("storage_dtype", "float32")
        method = _thresholds.threshold_method(images, shape, dtype, float(ctx.params["quantile"]), budget)
        return images, method, budget

    def _new(self, ctx: Context):
        images, method, budget = self._plan(ctx)
        cls = _thresholds.TopQuantile if method == "topk" else _thresholds.RadixQuantile
        return cls(images, float(ctx.params["quantile"]), budget)

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(_layer_parts(ctx, "activations"))))

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        stat = self._new(ctx)
        stat.update(_read_part(_layer_parts(ctx, "activations")[shard])[1])
        return stat.to_table()

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        cls = type(self._new(ctx))
        return cls.from_table(a).merge(cls.from_table(b)).to_table()

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        stat = type(self._new(ctx)).from_table(merged)
        _, method, _ = self._plan(ctx)
        passes = 1
        if method == "radix":  # later radix passes stream the parts again, in-process, memory-bounded
            while True:
                stat = stat.next_pass()
                if stat.done:
                    break
                passes += 1
                for path in _layer_parts(ctx, "activations"):
                    stat.update(_read_part(path)[1])
        return StageOutput(tables={"thresholds": stat.result()}, extras={"method": method, "passes": passes})


def heldout_mask(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic per-image split: True for held-out images (a splitmix64 hash of the index < fraction)."""
    x = np.asarray(image_ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _aligned_part(ctx: Context, role: str, layer: str, ids: np.ndarray) -> np.ndarray:
    """Activations of ``layer`` in extract entry ``role`` for exactly the images ``ids`` (any part layout)."""
    datasets = {r: e.manifest.get("digests", {}).get("dataset") for r, e in ctx.inputs.items()}
    if len(set(datasets.values())) > 1:  # equal image counts would otherwise pair unrelated images silently
        shown = ", ".join(f"{r}: {str(d)[:12]}" for r, d in sorted(datasets.items()))
        raise StageInputError(
            f"the compared models' activations come from different datasets (dataset digests {shown}); "
            "compare models extracted from the same dataset"
        )
    entry = ctx.inputs[role]
    shards = entry.table("shards").to_pandas()
    lo, hi = int(ids.min()), int(ids.max()) + 1
    chosen = [i for i, (start, stop) in enumerate(zip(shards["start"], shards["stop"])) if start < hi and stop > lo]
    parts = entry.parts(f"activations@{layer}")
    got_ids, got = zip(*(_read_part(parts[i]) for i in chosen)) if chosen else ((), ())
    all_ids = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
    rows = np.searchsorted(all_ids, ids)
    if rows.size and (rows.max() >= len(all_ids) or not np.array_equal(all_ids[rows], ids)):
        raise StageInputError(
            f"the two models' activations do not cover the same images (layer {layer!r}); compare models "
            "extracted from the same dataset"
        )
    return np.concatenate(got)[rows]


@register_stage
class MomentsStage(ShardedStage):
    """Streaming joint first/second moments of two nets' channels (train and held-out image splits)."""

    name = "moments"
    version = 1

    def _channels(self, ctx: Context) -> tuple[int, int]:
        ca = ctx.inputs["a"].extras["layer_shapes"][ctx.params["layer_a"]][0]
        cb = ctx.inputs["b"].extras["layer_shapes"][ctx.params["layer_b"]][0]
        return int(ca), int(cb)

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(ctx.inputs["a"].parts(f"activations@{ctx.params['layer_a']}"))))

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        p = ctx.params
        ids, acts_a = _read_part(ctx.inputs["a"].parts(f"activations@{p['layer_a']}")[shard])
        acts_b = _aligned_part(ctx, "b", p["layer_b"], ids)
        held = heldout_mask(ids, float(p["holdout"]))
        states = {}
        for split, mask in (("train", ~held), ("heldout", held)):
            stat = _compare.JointMoments(*self._channels(ctx))
            if mask.any():
                a, b = _compare.samples_from_maps(acts_a[mask], acts_b[mask], mode=p["samples"], resize=p["resize"])
                stat.update(a, b)
            states[split] = stat.to_table()
        return bundle(states)

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        ta, tb = unbundle(a), unbundle(b)
        return bundle({k: _compare.JointMoments.from_table(ta[k]).merge(_compare.JointMoments.from_table(tb[k])).to_table() for k in ta})

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        states = unbundle(merged)
        n = {k: _compare.JointMoments.from_table(v).n for k, v in states.items()}
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
        return StageOutput(tables=states, extras={"samples": n})


@register_stage
class CompareStage(Stage):
    """Correlation, matching, regression, SVCCA/PWCCA/CKA of one layer pair from its moments."""

    name = "compare"
    version = 1

    def run(self, ctx: Context) -> StageOutput:
        p = ctx.params
        train = _compare.JointMoments.from_table(ctx.inputs["moments"].table("train"))
        heldout = _compare.JointMoments.from_table(ctx.inputs["moments"].table("heldout"))
        tables = _compare.compare_moments(train, heldout, alphas=list(p["alphas"]), thresholds=list(p["match_thresholds"]),
                                 svcca_keep=float(p["svcca_keep"]))
        return StageOutput(tables=tables)


@register_stage
class CKAStage(ShardedStage):
    """Layer × layer linear CKA between two models from one joint statistic of pooled samples."""

    name = "cka"
    version = 1

    def _blocks(self, ctx: Context) -> tuple[list[str], list[int]]:
        names, sizes = [], []
        for role, key in (("a", "layers_a"), ("b", "layers_b")):
            shapes = ctx.inputs[role].extras["layer_shapes"]
            for layer in ctx.params[key]:
                names.append(f"{role}:{layer}")
                sizes.append(int(shapes[layer][0]))
        return names, sizes

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(ctx.inputs["a"].parts(f"activations@{ctx.params['layers_a'][0]}"))))

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        names, sizes = self._blocks(ctx)
        first = ctx.params["layers_a"][0]
        ids, _ = _read_part(ctx.inputs["a"].parts(f"activations@{first}")[shard])
        blocks = []
        for name in names:
            role, layer = name.split(":", 1)
            acts = _aligned_part(ctx, role, layer, ids)
            blocks.append(acts.astype(np.float32).mean(axis=(2, 3)))
        stat = _compare.MultiMoments(sizes, names)
        stat.update(*blocks)
        return stat.to_table()

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        return _compare.MultiMoments.from_table(a).merge(_compare.MultiMoments.from_table(b)).to_table()

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        stat = _compare.MultiMoments.from_table(merged)
        names, _ = self._blocks(ctx)
        table = _compare.cka_matrix(stat, [n for n in names if n.startswith("a:")], [n for n in names if n.startswith("b:")])
        table["layer_a"] = table["layer_a"].str.slice(2)
        table["layer_b"] = table["layer_b"].str.slice(2)
        return StageOutput(tables={"cka": table}, extras={"samples": stat.n})


@register_stage
class IoUStage(ShardedStage):
    """Network Dissection IoU tally of one layer: integer counts per shard, merged by addition."""

    name = "iou"
    version = 1
    uses_device = True

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(_layer_parts(ctx, "activations"))))

    def _new(self, ctx: Context) -> _iou.IoUTally:
        dataset = ctx.dataset()
        if not dataset.concepts:
            raise StageInputError(
                f"dataset kind {dataset.kind!r} has no concept labels, so units cannot be dissected; use a dataset "
                "with masks (synthetic, broden) or disable dissection"
            )
        return _iou.IoUTally(dataset.concepts, dataset.seg_size, device=ctx.device())

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        ids, acts = _read_part(_layer_parts(ctx, "activations")[shard])
        thresholds = ctx.inputs["thresholds"].table("thresholds").column("threshold").to_numpy()
        tally = self._new(ctx)
        tally.update(acts, thresholds, ctx.dataset().load(ids), ids)
        return tally.to_table()

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        return _iou.IoUTally.from_table(a).merge(_iou.IoUTally.from_table(b)).to_table()

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        tally = _iou.IoUTally.from_table(merged)
        tables = _iou.iou_tables(tally, ctx.dataset().concepts, float(ctx.params["iou_threshold"]))
        return StageOutput(tables=tables, extras={"images": int(tally.images)})


@register_stage
class StabilityStage(ShardedStage):
    """Location instability of one layer's units against the dataset's landmarks (Zhang et al.)."""

    name = "stability"
    version = 1

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(_layer_parts(ctx, "activations", "summaries"))))

    def map(self, ctx: Context, shard_index: int, shard: Any) -> pa.Table:
        summaries = _extraction.read_summaries(pq.read_table(_layer_parts(ctx, "activations", "summaries")[shard]))
        dataset = ctx.dataset()
        stat = _stability.LandmarkTopK(dataset.image_size, int(ctx.params["top_k"]))
        stat.update(summaries.max, summaries.argmax, summaries.shape[1:], dataset.load(summaries.image),
                    summaries.image)
        return stat.to_table()

    def combine(self, ctx: Context, a: pa.Table, b: pa.Table) -> pa.Table:
        return _stability.LandmarkTopK.from_table(a).merge(_stability.LandmarkTopK.from_table(b)).to_table()

    def finalize(self, ctx: Context, merged: pa.Table) -> StageOutput:
        return StageOutput(tables=_stability.stability_tables(_stability.LandmarkTopK.from_table(merged), ctx.dataset().landmark_names))


@register_stage
class StabilityCenterStage(Stage):
    """The image-centre predictor's location instability (the baseline every unit should beat)."""

    name = "stability_center"
    version = 1

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
