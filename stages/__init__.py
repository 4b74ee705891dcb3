"""The science: models, training, extraction, dissection and comparison, plus their pipeline stages.

Pure functions and streaming statistics live in private modules and are re-exported here lazily (PEP 562):
importing the package registers the pipeline stages (the ``_stage_*`` modules) without loading torch or scipy,
so a fully cached pipeline run stays fast; the first use of a name imports its module.

Layering: this package imports :mod:`repdissect.core` (stage contract, statistic protocol, store) and the
public API of :mod:`repdissect.datasets`, nothing above them; the pipeline, reports and CLI use the names
exported here, never the private modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from .. import datasets as _datasets  # noqa: F401  (fills the core's dataset factory that ctx.dataset() uses)
from ..core import StreamingStatistic, pack_arrays, unpack_arrays
from ._errors import StageInputError
# The stage declarations (one module per family, next to the science they wrap) register on import.
from . import _stage_compare, _stage_dissect, _stage_extract, _stage_stability, _stage_train  # noqa: F401
from . import _stage_attribution, _stage_visualise  # noqa: F401
from . import _stage_similarity  # noqa: F401
from . import _stage_sensitivity  # noqa: F401

_EXPORTS = {
    "_stage_train": ["model_spec_from_params"],
    "_stage_compare": ["heldout_mask"],
    "_activations": ["UnitSummaries", "activation_shape", "activations_table", "iter_activation_parts",
                     "read_activation_part", "read_activations", "read_summaries", "summaries_table", "table_to_arrays"],
    "_extraction": ["Extractor", "PARQUET_OPTIONS", "extract_shard", "forward_batches"],
    "_cpu_kernels": ["cpu_kernel_class"],
    "_torch_build": ["torch_build"],
    "_device": ["resolve_device", "device_class", "determinism_mode", "reproducible_kernels", "check_device_params"],
    "_allocator": ["tune_allocator", "release_freed_memory"],
    "_unit_means": ["UnitMeans"],
    "_model_cache": ["cached_model", "clear_model_cache"],
    "_models": ["ModelSpec", "build_model", "layer_shapes", "list_models", "load_weights", "register_model",
                "resolve_layers"],
    "_train_config": ["TrainConfig"],
    "_training": ["TrainResult", "load_checkpoint", "state_dict_digest", "train_model", "train_model_full"],
    "_interpretable": ["FilterCategories", "InterpretableLayer", "filter_mi_terms", "iter_layers_after",
                       "locate_parts", "mask_feature_map", "positive_templates", "template_masks"],
    "_thresholds": ["TopQuantile", "RadixQuantile", "threshold_method", "unit_thresholds"],
    "_iou": ["IoUTally"],
    "_iou_tables": ["DEFAULT_IOU_THRESHOLD", "iou_tables"],
    "_iou_geometry": ["upsample_bilinear"],
    "_topk": ["TopK", "keep_largest", "select_top"],
    "_concepts": ["DominantConcepts", "MAX_PURITY", "class_purity", "dominant_concepts"],
    "_stage_visualise": ["OPENTSNE_FROM", "image_table", "read_image_maps", "table_images"],
    "_stability": ["LandmarkTopK", "argmax_locations", "center_baseline", "spatial_max_argmax", "stability_tables"],
    "_warmup": ["warm_kernels"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(["StageInputError", "StreamingStatistic", "pack_arrays", "unpack_arrays", "layers_command", *_WHERE])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


def layers_command(architecture: str, *, input_size: int = 64, num_classes: int | None = None,
                   weights: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(layer name, output shape)`` of every module of a model, for ``repdissect layers``."""
    from ._models import ModelSpec, build_model, layer_shapes

    spec = ModelSpec(architecture=architecture, num_classes=num_classes, weights=weights)
    model = build_model(spec, seed=0)
    return [(s.name, s.shape) for s in layer_shapes(model, (input_size, input_size)) if s.shape is not None]
