"""How stage declarations read their upstream ``extract`` entries: a layer's parts, one part, aligned parts.

Activation parts are Parquet files of ``(image, activations)`` rows, one per extraction shard; the stages
downstream of ``extract`` shard over those parts, so these readers are shared by all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from ..core import Context
from ._errors import StageInputError
from ._lazy import LazyModule

__all__ = ["layer_parts", "read_part", "aligned_part", "read_pooled_part", "aligned_pooled", "layer_blocks",
           "layer_x_layer_shards"]

_activations = LazyModule("._activations")


def layer_parts(ctx: Context, role: str, kind: str = "activations") -> list[Path]:
    """The parts of table ``<kind>@<ctx.params['layer']>`` of upstream entry ``role``, in shard order."""
    return ctx.inputs[role].parts(f"{kind}@{ctx.params['layer']}")


def read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids (N,), activations (N, C, H, W) or (N, C))`` of one activation part."""
    return _activations.read_activation_part(path)


def read_pooled_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids (N,), spatial means (N, C) float32)`` of one *summary* part (``summaries@<layer>``).

    The pooled sample of an image (one value per channel: its map's spatial mean) without reading the map:
    extraction stores each unit's spatial mean beside the activations, computed in float32 from the layer's
    output before the activations are cast to their storage dtype (so it is the float32 mean even where the
    maps are stored as float16).
    """
    summary = _activations.read_summaries(pq.read_table(path))
    return summary.image, summary.mean


def aligned_part(ctx: Context, role: str, layer: str, ids: np.ndarray) -> np.ndarray:
    """Activations of ``layer`` in extract entry ``role`` for exactly the images ``ids`` (any part layout)."""
    return _aligned(ctx, role, layer, ids, "activations", read_part)


def aligned_pooled(ctx: Context, role: str, layer: str, ids: np.ndarray) -> np.ndarray:
    """Spatial means ``(N, C)`` float32 of ``layer``'s units in extract entry ``role`` for exactly the images
    ``ids``, from the summary parts (see :func:`read_pooled_part`)."""
    return _aligned(ctx, role, layer, ids, "summaries", read_pooled_part)


def _aligned(ctx: Context, role: str, layer: str, ids: np.ndarray, kind: str,
             reader: Callable[[Path], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
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
    parts = entry.parts(f"{kind}@{layer}")
    got_ids, got = zip(*(reader(parts[i]) for i in chosen)) if chosen else ((), ())
    if len(got) == 1 and np.array_equal(got_ids[0], ids):  # the same shard layout: the part as read, no copies
        return got[0]
    all_ids = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
    rows = np.searchsorted(all_ids, ids)
    if rows.size and (rows.max() >= len(all_ids) or not np.array_equal(all_ids[rows], ids)):
        raise StageInputError(
            f"the two models' activations do not cover the same images (layer {layer!r}); compare models "
            "extracted from the same dataset"
        )
    return np.concatenate(got)[rows]


def layer_blocks(ctx: Context) -> tuple[list[str], list[int]]:
    """The ``"a:<layer>"``/``"b:<layer>"`` block names and channel counts of a layer × layer statistic over
    ``params["layers_a"]`` of input ``a`` and ``params["layers_b"]`` of input ``b``."""
    names, sizes = [], []
    for role, key in (("a", "layers_a"), ("b", "layers_b")):
        shapes = ctx.inputs[role].extras["layer_shapes"]
        for layer in ctx.params[key]:
            names.append(f"{role}:{layer}")
            sizes.append(int(shapes[layer][0]))
    return names, sizes


def layer_x_layer_shards(ctx: Context) -> list[int]:
    """One shard per activation part of input ``a``'s first listed layer (every layer has the same parts)."""
    return list(range(len(ctx.inputs["a"].parts(f"activations@{ctx.params['layers_a'][0]}"))))
