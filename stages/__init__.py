"""The science: models, training, extraction, dissection and comparison, plus their pipeline stages.

Pure functions and streaming statistics live in private modules and are re-exported here; the cached
pipeline stages (``stages._nodes``) are registered on import.
"""

from __future__ import annotations

from typing import Sequence

from ._activations import activation_shape, activations_table, iter_activation_parts, read_activations, table_to_arrays
from ._errors import StageInputError
from ._extraction import Extractor, UnitMeans, extract_shard, read_summaries, resolve_device
from ._models import ModelSpec, build_model, layer_shapes, list_models, load_weights, register_model, resolve_layers
from ._streaming import StreamingStatistic, pack_arrays, unpack_arrays
from ._training import TrainConfig, state_dict_digest, train_model
from . import _nodes  # noqa: F401  (registers the pipeline stages)

__all__ = [
    "Extractor", "ModelSpec", "StageInputError", "StreamingStatistic", "TrainConfig", "UnitMeans",
    "activation_shape", "activations_table", "build_model", "extract_shard", "iter_activation_parts",
    "layer_shapes", "layers_command", "list_models", "load_weights", "pack_arrays", "read_activations",
    "read_summaries", "register_model", "resolve_device", "resolve_layers", "state_dict_digest",
    "table_to_arrays", "train_model", "unpack_arrays",
]


def layers_command(architecture: str, *, input_size: int = 64, num_classes: int | None = None,
                   weights: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(layer name, output shape)`` of every module of a model, for ``repdissect layers``."""
    spec = ModelSpec(architecture=architecture, num_classes=num_classes, weights=weights)
    model = build_model(spec, seed=0)
    return [(s.name, s.shape) for s in layer_shapes(model, (input_size, input_size)) if s.shape is not None]
