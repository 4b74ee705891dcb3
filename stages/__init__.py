"""The science: models, training, extraction, dissection and comparison, plus their pipeline stages.

Pure functions and streaming statistics live in private modules and are re-exported here lazily (PEP 562):
importing the package registers the pipeline stages (``stages._nodes``) without loading torch or scipy,
so a fully cached pipeline run stays fast; the first use of a name imports its module.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import StageInputError
from ._streaming import StreamingStatistic, pack_arrays, unpack_arrays
from . import _nodes  # noqa: F401  (registers the pipeline stages)

_EXPORTS = {
    "_activations": ["activation_shape", "activations_table", "iter_activation_parts", "read_activations",
                     "table_to_arrays"],
    "_extraction": ["Extractor", "UnitMeans", "extract_shard", "forward_batches", "read_summaries", "resolve_device"],
    "_models": ["ModelSpec", "build_model", "layer_shapes", "list_models", "load_weights", "register_model",
                "resolve_layers"],
    "_training": ["TrainConfig", "state_dict_digest", "train_model"],
    "_thresholds": ["TopQuantile", "RadixQuantile", "threshold_method", "unit_thresholds"],
    "_iou": ["IoUTally", "iou_tables", "upsample_bilinear"],
    "_stability": ["LandmarkTopK", "argmax_locations", "center_baseline", "spatial_max_argmax", "stability_tables"],
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
