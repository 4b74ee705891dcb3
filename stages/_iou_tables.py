"""The result tables of one dissected layer, from a merged :class:`~repdissect.stages.IoUTally`.

``unit_label`` (every unit × label count and IoU), ``units`` (best label overall and per category) and
``summary`` (interpretable units and unique detectors per category at the IoU threshold).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..datasets import Concept
from ._errors import StageInputError
from ._iou import IoUTally

__all__ = ["DEFAULT_IOU_THRESHOLD", "iou_tables"]

DEFAULT_IOU_THRESHOLD = 0.04


def _best(iou: np.ndarray, columns: np.ndarray):
    """Per unit, the column (of ``columns``) with the highest IoU (first on ties) and that IoU."""
    sub = iou[:, columns]
    pick = np.argmax(sub, axis=1)
    return columns[pick], sub[np.arange(len(sub)), pick]


def iou_tables(
    tally: IoUTally, concepts: Sequence[Concept], iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> dict[str, pd.DataFrame]:
    """Result tables of one layer.

    Definitions: a unit's best label overall is its highest-IoU label (ties: smaller label number); per
    category, the best among that category's labels. A unit with IoU 0 for every label of a scope has label 0
    and empty name/category there. A unit is *interpretable* when its best IoU is ``> iou_threshold``
    (strict, as the paper's figures). Detectors of category ``c``: interpretable units whose best category
    is ``c``; unique detectors: their distinct best labels (the total is over all categories).

    Args:
        tally: the merged tally of the layer.
        concepts: the dataset's concepts (for names; must cover the tally's labels).
        iou_threshold: the interpretability cut (0.04 in the paper).

    Returns:
        ``unit_label``: one row per (unit, label) — ``unit, label, name, category, intersection, activation,
        truth, iou``. ``units``: one row per unit — ``unit, label, name, category, iou, interpretable`` then
        ``<cat>_label, <cat>_name, <cat>_iou`` per category. ``summary``: one row — ``units,
        interpretable_units, unique_detectors_total, iou_threshold`` then ``detectors_<cat>,
        unique_detectors_<cat>`` per category.
    """
    by_label = {c.label: c for c in concepts}
    missing = [int(l) for l in tally.labels if int(l) not in by_label]
    if missing:
        raise StageInputError(f"iou_tables: concepts lack labels {missing[:8]} that the tally counted")
    iou = tally.iou()
    num_units, num_labels = iou.shape
    names = np.array([by_label[int(l)].name for l in tally.labels], dtype=object)
    cats = np.array(tally.categories, dtype=object)[tally.label_category]

    unit_label = pd.DataFrame(
        {
            "unit": np.repeat(np.arange(num_units, dtype=np.int64), num_labels),
            "label": np.tile(tally.labels, num_units),
            "name": np.tile(names, num_units),
            "category": np.tile(cats, num_units),
            "intersection": tally.intersection.reshape(-1),
            "activation": tally.activation[:, tally.label_category].reshape(-1),
            "truth": np.tile(tally.truth, num_units),
            "iou": iou.reshape(-1),
        }
    )

    def describe(columns: np.ndarray):
        col, score = _best(iou, columns)
        found = score > 0
        label = np.where(found, tally.labels[col], 0)
        name = np.where(found, names[col], "")
        category = np.where(found, cats[col], "")
        return label, name, category, score

    label, name, category, score = describe(np.arange(num_labels))
    interpretable = score > iou_threshold
    units = {
        "unit": np.arange(num_units, dtype=np.int64),
        "label": label.astype(np.int64),
        "name": name,
        "category": category,
        "iou": score,
        "interpretable": interpretable,
    }
    summary = {
        "units": num_units,
        "interpretable_units": int(interpretable.sum()),
        "unique_detectors_total": int(len(np.unique(label[interpretable]))),
        "iou_threshold": float(iou_threshold),
    }
    for index, cat in enumerate(tally.categories):
        columns = np.flatnonzero(tally.label_category == index)
        if len(columns):
            c_label, c_name, _, c_score = describe(columns)
        else:
            c_label, c_name = np.zeros(num_units, np.int64), np.full(num_units, "", object)
            c_score = np.zeros(num_units)
        units[f"{cat}_label"] = c_label.astype(np.int64)
        units[f"{cat}_name"] = c_name
        units[f"{cat}_iou"] = c_score
        detectors = interpretable & (category == cat)
        summary[f"detectors_{cat}"] = int(detectors.sum())
        summary[f"unique_detectors_{cat}"] = int(len(np.unique(label[detectors])))
    return {"unit_label": unit_label, "units": pd.DataFrame(units), "summary": pd.DataFrame([summary])}
