"""The attribution stages: ``attribute`` (maps for exemplars and class panels) and ``attribution_mass``.

* ``attribute`` [instance, layer] — ``exemplars`` (unit, rank, image, score): each unit's top-``k`` images by
  its spatial max (or mean) from the extraction summaries; ``unit_maps`` (unit, rank, image, method, shape,
  map): each configured unit method for the unit on its own exemplars (one row per unit and exemplar,
  batched across units — every row explains its own unit, :class:`~repdissect.stages.attribution.RowUnitTarget`);
  ``class_maps`` (image, label, predicted, target, method, shape, map): per-class panels for the user's image
  list, or the first image of each class. Maps are raw (signed, unnormalised, at the method's resolution:
  ``(3, H, W)`` input maps, ``(h, w)`` CAM-family maps); display transforms belong to the report.
* ``attribution_mass`` [instance, layer] — ``units`` (unit, label, name, category, iou, interpretable,
  images, mass, area, concentration) and ``summary``: the mergeable
  :class:`~repdissect.stages.attribution.ConceptMass` of the unit's map inside its IoU-label concept mask,
  over the first ``mass_images`` images, sharded at whole forward batches (image ``i`` always in batch
  ``i // batch_size``), so sharded == whole bit for bit on one device.

Both load the network the extraction node describes (trained weights from the ``train`` entry), copy it
per task (the rules swap modules in place), and attribute in the network's normalised input space.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..core import Context, Stage, StageOutput, StatisticStage, digest, register_stage
from ._allocator import release_freed_memory
from ._errors import StageInputError
from ._lazy import LazyModule, torch
from ._stage_train import model_spec_from_params

__all__ = ["AttributeStage", "AttributionMassStage"]

_attr = LazyModule(".attribution")
_activations = LazyModule("._activations")
_models = LazyModule("._models")
_model_cache = LazyModule("._model_cache")
_training = LazyModule("._training")
pd = LazyModule("pandas")  # loaded when a stage runs: a warm rerun (report copy) never imports pandas

#: parameters of the map methods, passed through to :func:`repdissect.stages.attribution.attribute`
METHOD_PARAMS = ("smoothgrad_samples", "smoothgrad_stdev", "occlusion_window", "occlusion_stride", "lrp_rule",
                 "lrp_epsilon", "lime_cell", "lime_samples", "unit_chunk", "lrp_alpha", "lime_segmentation",
                 "lime_segments", "lime_compactness")


def _network(ctx: Context) -> tuple[Any, Any]:
    """``(wrapper, net)``: this task's own copy of the described network (eval, on the task's device)."""
    params = dict(ctx.params["model"])
    key = digest(params | {"upstream": ctx.inputs["weights"].key if "weights" in ctx.inputs else None})

    def build() -> Any:
        spec = model_spec_from_params(params, weights=params.get("weights_path"))
        state = _training.load_checkpoint(ctx.inputs["weights"].file("model.pt")) if "weights" in ctx.inputs else None
        return _models.build_model(spec, seed=int(params["seed"]), state_dict=state)

    wrapper = copy.deepcopy(_model_cache.cached_model(key, build)).to(ctx.device()).eval()
    return wrapper, _models.unwrap(wrapper)


def _inputs(wrapper: Any, images: np.ndarray) -> Any:
    """Normalised float input (contiguous NCHW) for ``(N, 3, H, W)`` uint8 images."""
    t = torch().as_tensor(images, device=wrapper.mean.device)
    return wrapper.normalize(t).contiguous()


def _method_kwargs(ctx: Context, wrapper: Any, cam_layer: str) -> dict[str, Any]:
    params = ctx.params
    grey = float(params.get("occlusion_baseline", 0.5))
    baseline = ((grey - wrapper.mean) / wrapper.std).reshape(-1)
    return {**{k: params[k] for k in METHOD_PARAMS if k in params}, "cam_layer": cam_layer,
            "occlusion_baseline": baseline, "head": params.get("head", "fc")}


def _run_rows(ctx: Context, wrapper: Any, net: Any, method: str, images: np.ndarray, pixels: dict[int, np.ndarray],
              target_of: Any, cam_layer: str) -> list[np.ndarray]:
    """One map per row of ``images`` (dataset ids), in forward batches of ``batch_size`` rows."""
    th = torch()
    batch = int(ctx.params["batch_size"])
    kwargs = _method_kwargs(ctx, wrapper, cam_layer)
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch):
        ids = images[start:start + batch]
        x = _inputs(wrapper, np.stack([pixels[int(i)] for i in ids]))
        maps = _attr.attribute(method, net, x, target_of(start, start + len(ids)),
                               image_ids=th.as_tensor(np.array(ids, np.int64)), **kwargs)
        out.extend(m for m in maps.detach().float().cpu().numpy())
    return out


# What the network stages' results depend on (closed under imports; checked by the source-guard tests).
_MODEL_AND_METHODS = (
    "._activations",
    "._checkpoints",
    "._cnn",
    "._cpu_kernels",
    "._torch_build",
    "._device",
    "._interpretable",
    "._model_cache",
    "._model_registry",
    "._models",
    "._optim",
    "._stage_train",
    "._train_config",
    "._training",
    ".attribution",
    ".attribution._cam",
    ".attribution._chain",
    ".attribution._dataset",
    ".attribution._dispatch",
    ".attribution._engine",
    ".attribution._gradients",
    ".attribution._lime",
    ".attribution._lrp",
    ".attribution._occlusion",
    ".attribution._relu",
    ".attribution._slic",
)


@register_stage

class AttributeStage(Stage):
    """Attribution maps of one layer's units on their top exemplars, and per-class panels."""

    name = "attribute"
    depends_on = _MODEL_AND_METHODS
    version = 4  # 2: channels-last receptive-field crops (float32 rounding), αβ LRP and SLIC LIME keys;
    # 3: unit maps of conv/BN/ReLU/max-pool chains by the explicit region backward (whole-image masks);
    # 4: occlusion forwards 64 images at a time, not 256 (convolutions are not batch-size invariant on the CPU)
    uses_device = True

    def run(self, ctx: Context) -> StageOutput:
        params = ctx.params
        layer = params["layer"]
        dataset = ctx.dataset()
        wrapper, net = _network(ctx)
        # exemplars from the extraction summaries (spatial max or mean per unit and image)
        ids, values = [], []
        for path in ctx.inputs["activations"].parts(f"summaries@{layer}"):
            summary = _activations.read_summaries(pq.read_table(path))
            ids.append(summary.image)
            values.append(summary.max if params["reduce"] == "max" else summary.mean)
        image_ids, scores = np.concatenate(ids), np.concatenate(values)
        scores = scores.reshape(scores.shape[0], -1)
        units = list(params["units"]) or list(range(scores.shape[1]))
        bad = [u for u in units if u >= scores.shape[1]]
        if bad:
            raise StageInputError(f"[attribution].units {bad} out of range: layer {layer!r} has {scores.shape[1]} units")
        top, top_scores = _attr.top_exemplars(image_ids, scores, int(params["top_k"]))
        rows = pd.DataFrame([(u, r, int(top[u, r]), float(top_scores[u, r])) for u in units for r in range(top.shape[1])],
                            columns=["unit", "rank", "image", "score"])
        class_ids = self._class_images(ctx, dataset)
        wanted = np.unique(np.concatenate([rows["image"].to_numpy(np.int64), np.asarray(class_ids, np.int64)]))
        batch = dataset.load(wanted)
        pixels = {int(i): img for i, img in zip(batch.index, batch.images)}
        labels = {int(i): int(c) for i, c in zip(batch.index, batch.class_label)} if batch.class_label is not None else {}

        unit_frames, unit_maps = [], []
        row_units = rows["unit"].to_numpy()
        target = lambda a, b: _attr.RowUnitTarget(layer, [int(u) for u in row_units[a:b]], params["reduce"])  # noqa: E731
        for method in params["unit_methods"]:
            maps = _run_rows(ctx, wrapper, net, method, rows["image"].to_numpy(), pixels, target, params["cam_layer"])
            unit_frames.append(rows.assign(method=method))
            unit_maps.extend(maps)
        unit_df = pd.concat(unit_frames, ignore_index=True) if unit_frames else rows.assign(method="")[:0]

        class_df, class_maps = self._class_panels(ctx, wrapper, net, class_ids, pixels, labels)
        # The forwards' freed batches go back to the OS before the maps are laid out for Arrow (glibc keeps
        # freed memory for reuse: the tables would otherwise be built on top of it)
        release_freed_memory()
        return StageOutput(
            tables={"exemplars": rows,
                    "unit_maps": _attr.maps_table({c: unit_df[c].tolist() for c in unit_df.columns}, unit_maps),
                    "class_maps": _attr.maps_table({c: class_df[c].tolist() for c in class_df.columns}, class_maps)},
            extras={"layer": layer, "cam_layer": params["cam_layer"], "units": len(units),
                    "class_images": [int(i) for i in class_ids]},
        )

    def _class_images(self, ctx: Context, dataset: Any) -> list[int]:
        chosen = [int(i) for i in ctx.params["images"]]
        if chosen or not dataset.class_names:
            return chosen
        want = min(int(ctx.params["classes_shown"]), len(dataset.class_names))
        first: dict[int, int] = {}
        for rng in dataset.shards(256):
            if len(first) >= want:
                break
            labels = dataset.load(np.arange(rng.start, rng.stop)).class_label
            for i, c in zip(range(rng.start, rng.stop), labels):
                if c >= 0 and int(c) not in first and len(first) < want:
                    first[int(c)] = i
        return [first[c] for c in sorted(first)]

    def _class_panels(self, ctx: Context, wrapper: Any, net: Any, ids: list[int], pixels: dict[int, np.ndarray],
                      labels: dict[int, int]) -> tuple[pd.DataFrame, list[np.ndarray]]:
        th = torch()
        columns = ["image", "label", "predicted", "target", "method"]
        if not ids or not ctx.params["class_methods"]:
            return pd.DataFrame(columns=columns), []
        arr = np.asarray(ids, np.int64)
        with th.no_grad():
            predicted = net(_inputs(wrapper, np.stack([pixels[i] for i in ids]))).argmax(1).cpu().numpy()
        label = np.asarray([labels.get(i, -1) for i in ids], np.int64)
        use_label = ctx.params["class_target"] == "label"
        target = np.where(use_label & (label >= 0), label, predicted)
        frames, maps = [], []
        base = pd.DataFrame({"image": arr, "label": label, "predicted": predicted.astype(np.int64), "target": target})
        for method in ctx.params["class_methods"]:
            got = _run_rows(ctx, wrapper, net, method, arr, pixels,
                            lambda a, b: th.as_tensor(target[a:b]), ctx.params["layer"])
            frames.append(base.assign(method=method))
            maps.extend(got)
        return pd.concat(frames, ignore_index=True), maps


@register_stage
class AttributionMassStage(StatisticStage):
    """Per unit, the share of its attribution inside its IoU-label concept mask, over the dataset."""

    name = "attribution_mass"
    depends_on = _MODEL_AND_METHODS
    version = 3  # 2: unit guided backprop on channels-last crops (float32 rounding); 3: by the explicit
    # region backward of conv/BN/ReLU/max-pool chains (whole-image masks and pool switches)
    uses_device = True

    def _labelled(self, ctx: Context) -> pd.DataFrame:
        units = ctx.inputs["iou"].table("units").to_pandas()
        pixel_level = {c.label for c in ctx.dataset().concepts if c.pixel_level}
        keep = units[units["label"].isin(pixel_level)]
        chosen = list(ctx.params["units"])
        return keep[keep["unit"].isin(chosen)] if chosen else keep

    def shards(self, ctx: Context) -> list[Any]:
        batch = int(ctx.params["batch_size"])
        size = -(-int(ctx.execution.get("shard_size", 512)) // batch) * batch
        total = int(ctx.params["images"])
        return [[start, min(start + size, total)] for start in range(0, total, size)]

    def new_statistic(self, ctx: Context) -> Any:
        return _attr.ConceptMass(self._labelled(ctx)["unit"].to_numpy(np.int64))

    def statistic_types(self, ctx: Context) -> type:
        return _attr.ConceptMass

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        labelled = self._labelled(ctx)
        if labelled.empty:
            return
        units = labelled["unit"].tolist()
        labels, categories = labelled["label"].tolist(), labelled["category"].tolist()
        wrapper, net = _network(ctx)
        dataset, batch = ctx.dataset(), int(ctx.params["batch_size"])
        target = _attr.UnitTarget(ctx.params["layer"], units, ctx.params["reduce"])
        for start in range(int(shard[0]), int(shard[1]), batch):
            data = dataset.load(np.arange(start, min(start + batch, int(shard[1]))))
            # (N, U, H, W): max over colour of |map|, reduced pass by pass in the engine (every unit's full map
            # at once was N × U × 3 × H × W floats, the largest temporary of the demo's run)
            strength = _attr.attribute(ctx.params["method"], net, _inputs(wrapper, data.images), target,
                                       unit_chunk=int(ctx.params["unit_chunk"]), map_fn=_attr.saliency_map).float().cpu()
            masks = _attr.concept_masks(data.pixel_labels, labels, categories)
            fraction, valid = _attr.mass_fractions(strength, masks)
            stat.update(fraction, valid, masks)

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        labelled = self._labelled(ctx)
        cols = [c for c in ("unit", "label", "name", "category", "iou", "interpretable") if c in labelled.columns]
        table = labelled[cols].merge(stat.result(), on="unit", how="left")
        interp = table[table["interpretable"]] if "interpretable" in table.columns else table
        summary = pd.DataFrame([{
            "method": ctx.params["method"], "images": int(ctx.params["images"]), "units": int(len(table)),
            "interpretable_units": int(len(interp)),
            "mean_mass": float(table["mass"].mean()), "mean_area": float(table["area"].mean()),
            "mean_concentration": float(table["concentration"].mean()),
            "interpretable_mean_mass": float(interp["mass"].mean()) if len(interp) else float("nan"),
            "interpretable_mean_concentration": float(interp["concentration"].mean()) if len(interp) else float("nan"),
        }])
        return StageOutput(tables={"units": table, "summary": summary})
