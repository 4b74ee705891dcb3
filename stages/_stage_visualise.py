"""The visualisation stages: ``dataset_search``, ``activation_max``, ``filters`` and ``tsne``.

* ``dataset_search`` (per instance × layer; sharded over the extraction's summary parts): the top-k images
  per unit by spatial-max activation (:class:`~repdissect.stages.TopK`, ties → smaller image index), tables
  ``top`` (unit, rank, image, value, argmax) and ``maps`` (unit, rank, image, height, width, map: the unit's
  layer-resolution activation map on that image, float32).
* ``activation_max`` (per instance × layer, and ``layer = "logits"`` for class models): one optimised image
  per unit (per class), every unit of the layer in one batched optimisation; tables ``units`` (unit,
  objective, activation_max, activation_mean; dataset_max for layers) and ``images`` (unit, height, width, pixels: H·W·3 uint8 bytes, row-major RGB).
* ``filters`` (per instance): the first RGB convolution as a grid image; table ``grid`` (layer, height, width,
  pixels).
* ``tsne`` (per instance × layer): a seeded t-SNE of the images' spatially pooled unit activations (the
  extraction's per-image maxima or means, ``features``) for a seeded sample of images; table ``points`` (image, x, y, class_label,
  concept, concept_name, concept_category: the image's dominant concept outside the class-defining categories,
  :func:`~repdissect.stages.dominant_concepts`); extras ``concept_purity`` and ``class_defining``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import Context, Stage, StageOutput, StatisticStage, register_stage
from ._errors import StageInputError
from ._lazy import LazyModule
from ._stage_inputs import layer_parts
from ._stage_train import model_spec_from_params

__all__ = ["OPENTSNE_FROM", "DatasetSearchStage", "ActivationMaxStage", "FiltersStage", "TsneStage", "read_image_maps",
           "image_table", "table_images"]

#: from this many points t-SNE's "auto" uses openTSNE when it is installed (1.8× faster than scikit-learn at
#: 10⁴ points, one thread; below a few thousand both take seconds)
OPENTSNE_FROM = 5000

_activations = LazyModule("._activations")
_topk = LazyModule("._topk")
_models = LazyModule("._models")
_training = LazyModule("._training")
_visualise = LazyModule(".visualise")
_concepts = LazyModule("._concepts")
pd = LazyModule("pandas")  # loaded when a stage runs: a warm rerun (report copy) never imports pandas


def read_image_maps(activation_parts: Sequence[Any], wanted: Iterable[int], batch_rows: int = 32) -> dict[int, np.ndarray]:
    """The ``(C, H, W)`` float32 activation maps of the ``wanted`` images, streamed from activation parts.

    A part's small ``image`` column is read first; parts holding none of the wanted images are skipped, and
    only the wanted rows of the others are kept.
    """
    want = np.array(sorted({int(i) for i in wanted}), dtype=np.int64)
    found: dict[int, np.ndarray] = {}
    for path in activation_parts:
        if len(found) == len(want):
            break
        pf = pq.ParquetFile(path)
        if not np.isin(pf.read(columns=["image"]).column(0).to_numpy(), want).any():
            continue
        schema = pf.schema_arrow
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["image", "activations"]):
            hit = np.isin(batch.column(0).to_numpy(), want)
            if hit.any():
                table = pa.Table.from_batches([batch], schema=schema).filter(pa.array(hit))
                ids, acts = _activations.table_to_arrays(table)
                for i, a in zip(ids, acts):
                    found[int(i)] = np.asarray(a, dtype=np.float32)
    return found


def image_table(units: np.ndarray, images: np.ndarray) -> pa.Table:
    """``unit, height, width, pixels`` rows of ``(U, H, W, 3)`` uint8 images."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return pa.table({"unit": pa.array(np.asarray(units, np.int64)),
                     "height": pa.array(np.full(len(images), images.shape[1], np.int64)),
                     "width": pa.array(np.full(len(images), images.shape[2], np.int64)),
                     "pixels": pa.array([im.tobytes() for im in images], pa.binary())})


def table_images(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """Inverse of :func:`image_table`: ``{unit: (H, W, 3) uint8}``."""
    return {int(r.unit): np.frombuffer(r.pixels, np.uint8).reshape(int(r.height), int(r.width), 3)
            for r in frame.itertuples()}


def _network(ctx: Context) -> Any:
    """The network of the upstream extraction (with the trained weights when there are some)."""
    mp = ctx.params["model"]
    spec = model_spec_from_params(mp, weights=mp.get("weights_path"))
    state = _training.load_checkpoint(ctx.inputs["weights"].file("model.pt")) if "weights" in ctx.inputs else None
    return _models.build_model(spec, seed=int(mp["seed"]), state_dict=state)


# What the network stages' results depend on (closed under imports; checked by the source-guard tests).
_MODEL_AND_METHODS = (
    "._activations",
    "._checkpoints",
    "._cnn",
    "._cpu_kernels",
    "._torch_build",
    "._device",
    "._interpretable",
    "._model_registry",
    "._models",
    "._optim",
    "._stage_inputs",
    "._stage_train",
    "._topk",
    "._train_config",
    "._training",
    ".visualise",
    ".visualise._activation_max",
    ".visualise._dream",
    ".visualise._filters",
    ".visualise._param",
    ".visualise._tsne",
)


@register_stage

class DatasetSearchStage(StatisticStage):
    """Top-k images per unit of one layer (Zeiler & Fergus's dataset search), with their activation maps."""

    name = "dataset_search"
    depends_on = ("._topk", "._stage_inputs", "._activations")
    version = 1

    def shards(self, ctx: Context) -> list[Any]:
        return list(range(len(layer_parts(ctx, "activations", "summaries"))))

    def new_statistic(self, ctx: Context) -> Any:
        return _topk.TopK(int(ctx.params["top_k"]), ("argmax",))

    def statistic_types(self, ctx: Context) -> type:
        return _topk.TopK

    def update(self, ctx: Context, stat: Any, shard_index: int, shard: Any) -> None:
        s = _activations.read_summaries(pq.read_table(layer_parts(ctx, "activations", "summaries")[shard]))
        stat.update(s.max, s.image, {"argmax": s.argmax})

    def publish(self, ctx: Context, stat: Any) -> StageOutput:
        res = stat.result()
        c, k = res["ids"].shape
        unit = np.repeat(np.arange(c, dtype=np.int64), k)
        rank = np.tile(np.arange(k, dtype=np.int64), c)
        image = res["ids"].ravel()
        top = pd.DataFrame({"unit": unit, "rank": rank, "image": image, "value": res["scores"].ravel(),
                            "argmax": res["argmax"].ravel()})
        maps = read_image_maps(layer_parts(ctx, "activations"), np.unique(image))
        first = next(iter(maps.values()))
        if first.ndim == 1:  # a (C,) layer: one value per unit
            flat = [maps[int(i)][u : u + 1] for u, i in zip(unit, image)]
            h = w = 1
        else:
            h, w = first.shape[1:]
            flat = [maps[int(i)][u].ravel() for u, i in zip(unit, image)]
        maps_table = pa.table({"unit": unit, "rank": rank, "image": image,
                               "height": np.full(unit.size, h, np.int64), "width": np.full(unit.size, w, np.int64),
                               "map": pa.array(flat, pa.list_(pa.float32()))})
        return StageOutput(tables={"top": top, "maps": maps_table})


@register_stage
class ActivationMaxStage(Stage):
    """Activation maximisation of every unit of one layer (one batched, seeded optimisation)."""

    name = "activation_max"
    depends_on = _MODEL_AND_METHODS
    version = 1
    uses_device = True

    def run(self, ctx: Context) -> StageOutput:
        vis = _visualise
        settings = vis.AMSettings(**ctx.params["settings"])
        layer = ctx.params["layer"]
        net = _network(ctx)
        dataset_max = None
        if layer is None:  # class-model visualisation (Simonyan et al.): one image per class logit
            count = int(ctx.params["model"].get("num_classes") or 0) or len(ctx.dataset().class_names)
        else:
            dataset_max = ctx.inputs["activations"].frame(f"units@{layer}")["max"].to_numpy(np.float64)
            count = dataset_max.size
        size = tuple(ctx.dataset().image_size)
        result = vis.activation_maximisation(net, layer, range(count), size, settings,
                                             batch_units=int(ctx.params["batch_units"]), device=ctx.device())
        units = pd.DataFrame({"unit": result.units, "objective": result.objective,
                              "activation_max": result.activation_max, "activation_mean": result.activation_mean})
        if dataset_max is not None:  # how far the image drove the unit: activation_max / dataset_max
            units["dataset_max"] = dataset_max
        return StageOutput(tables={"units": units, "images": image_table(result.units, result.images)})


@register_stage
class FiltersStage(Stage):
    """The first RGB convolution's filters as one grid image."""

    name = "filters"
    depends_on = _MODEL_AND_METHODS
    version = 1

    def run(self, ctx: Context) -> StageOutput:
        name, weights = _visualise.first_conv(_network(ctx))
        grid = _visualise.filter_grid(weights)
        table = image_table(np.zeros(1, np.int64), grid[None]).append_column("layer", pa.array([name]))
        return StageOutput(tables={"grid": table})


@register_stage
class TsneStage(Stage):
    """A seeded t-SNE of one layer's per-image pooled activations (a seeded sample of images)."""

    name = "tsne"
    depends_on = _MODEL_AND_METHODS + ("._concepts",)
    version = 2  # v2: the dominant concept leaves out class-defining categories (it equalled the class before)

    def run(self, ctx: Context) -> StageOutput:
        parts = layer_parts(ctx, "activations", "summaries")
        summaries = [_activations.read_summaries(pq.read_table(p))
                     for p in parts]
        image = np.concatenate([s.image for s in summaries])
        feats = np.concatenate([getattr(s, ctx.params["features"]) for s in summaries]).astype(np.float64)
        points = int(ctx.params["points"])
        seed = int(ctx.params["seed"])
        if image.size > points:
            keep = np.sort(np.random.default_rng(seed).choice(image.size, points, replace=False))
            image, feats = image[keep], feats[keep]
        if image.size < 4:
            raise StageInputError(f"t-SNE needs at least 4 images; the dataset has {image.size}")
        xy = _visualise.tsne_embedding(feats, perplexity=float(ctx.params["perplexity"]), seed=seed,
                                       method=str(ctx.params["method"]))
        dataset = ctx.dataset()
        batch = dataset.load(image)
        classes = batch.class_label if batch.class_label is not None else np.full(image.size, -1)
        dominant = _concepts.dominant_concepts(batch.pixel_labels, batch.class_label)
        names = {c.label: c.name for c in dataset.concepts}
        points_table = pd.DataFrame({"image": image, "x": xy[:, 0], "y": xy[:, 1],
                                     "class_label": np.asarray(classes, np.int64), "concept": dominant.concept,
                                     "concept_name": [names.get(int(c), "") for c in dominant.concept],
                                     "concept_category": [str(c) for c in dominant.category]})
        return StageOutput(tables={"points": points_table},
                           extras={"concept_purity": dominant.purity, "class_defining": dominant.excluded})
