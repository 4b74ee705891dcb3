"""Which concept dominates an image, for colouring a t-SNE map by something other than the class.

The naive rule — the pixel-level concept covering the most pixels — reproduces the class on any dataset
whose class *is* a concept: in the procedural world the class is the main object's shape and the ``object``
category labels that same shape, so "dominant object" equals the class on every image (purity 1.0), and
the two colourings of the t-SNE map come out identical. This module leaves out such *class-defining*
categories, measured on the data rather than named:

* per category ``c`` and image ``n``, ``d_c[n]`` = the concept of ``c`` covering the most pixels (ties: the
  smaller label; 0 when the category covers nothing);
* the **purity** of ``c`` = the share of images whose ``d_c`` is their class's most common ``d_c``
  (``Σ_class max_label count(class, label) / N``, 1.0 when the class decides the concept, about the
  largest concept's share when it is independent of the class);
* categories with purity ≥ ``max_purity`` (default 0.9) are class-defining and left out; the image's
  dominant concept is then the concept covering the most pixels among the remaining categories.

On the procedural world this leaves ``color`` and ``material`` (purities ≈ 0.12 and 0.29; ``object`` 1.0 and
``part`` 0.96 are left out: a thin cross or star is mostly rim, a disc mostly core), and since colours label
every pixel the dominant concept is the image's dominant colour — an attribute independent of the class,
which is what a second colouring should show: whether a layer groups images by something besides the class
(a random-init network groups by colour; a trained one should not). Without class labels nothing is left
out and the rule is the naive one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

__all__ = ["DominantConcepts", "dominant_concepts", "class_purity", "MAX_PURITY"]

#: categories whose per-image dominant concept the class predicts on at least this share of images are left out
MAX_PURITY = 0.9


@dataclass
class DominantConcepts:
    """Per image, the dominant concept and its category; per category, its purity and whether it was used."""

    concept: np.ndarray  # (N,) int64 concept label, 0 = none
    category: np.ndarray  # (N,) object: the concept's category name, "" = none
    purity: dict[str, float] = field(default_factory=dict)  # category → purity (empty without class labels)
    excluded: list[str] = field(default_factory=list)  # class-defining categories, left out


def _per_image_counts(labels: np.ndarray, size: int) -> np.ndarray:
    """``(N, size)`` pixel counts per label of ``(N, ...)`` non-negative int labels (label 0 counted in column 0).

    Counted in groups of images (int64 temporaries of ~2²¹ values each rather than two of the whole array:
    the demo's t-SNE counts 1,000 label maps); integer counts, so the grouping changes nothing."""
    n = labels.shape[0]
    per_image = max(1, int(np.prod(labels.shape[1:], dtype=np.int64)))
    step = max(1, _COUNT_VALUES // per_image)
    out = np.empty((n, size), np.int64)
    for start in range(0, n, step):
        part = labels[start:start + step]
        m = part.shape[0]
        flat = part.reshape(m, -1).astype(np.int64)
        flat += (np.arange(m, dtype=np.int64) * size)[:, None]
        out[start:start + m] = np.bincount(flat.ravel(), minlength=m * size).reshape(m, size)
    return out


#: label values per int64 temporary of :func:`_per_image_counts` (16 MiB)
_COUNT_VALUES = 1 << 21


def _argmax_nonzero(counts: np.ndarray) -> np.ndarray:
    """Per row of ``(N, L)`` counts, the label ≥ 1 with the most pixels (smallest on ties); 0 when none."""
    c = counts.copy()
    c[:, 0] = 0
    best = c.argmax(axis=1)
    return np.where(c[np.arange(len(c)), best] > 0, best, 0).astype(np.int64)


def class_purity(dominant: np.ndarray, classes: np.ndarray) -> float:
    """Share of images whose ``dominant`` value is the most common one of their class (images with class ≥ 0).

    Args:
        dominant: ``(N,)`` int per-image values; classes: ``(N,)`` int class labels, −1 = none.

    Returns:
        ``Σ_k max_v #{n: class n = k, dominant n = v} / #{n: class n ≥ 0}``; NaN when no image has a class.
    """
    dominant, classes = np.asarray(dominant, np.int64), np.asarray(classes, np.int64)
    keep = classes >= 0
    if not keep.any():
        return float("nan")
    d, k = dominant[keep], classes[keep]
    _, d_codes = np.unique(d, return_inverse=True)
    _, k_codes = np.unique(k, return_inverse=True)
    table = np.zeros((k_codes.max() + 1, d_codes.max() + 1), np.int64)
    np.add.at(table, (k_codes, d_codes), 1)
    return float(table.max(axis=1).sum() / keep.sum())


def dominant_concepts(pixel_labels: Mapping[str, np.ndarray], classes: np.ndarray | None = None, *,
                      max_purity: float = MAX_PURITY) -> DominantConcepts:
    """Per image, the concept covering the most pixels among the categories the class does not decide.

    Args:
        pixel_labels: category → ``(N, L, h, w)`` (or ``(N, h, w)``) int concept labels, 0 = unlabelled;
            labels are global (distinct across categories), as in a dataset's ``Batch.pixel_labels``.
        classes: ``(N,)`` class labels (−1 = none) or ``None``: then no category is left out.
        max_purity: categories with :func:`class_purity` ≥ this are class-defining and left out (when every
            category is, none is left out: a dominant concept that equals the class is better than none).

    Returns:
        :class:`DominantConcepts` with ``(N,)`` concept labels and category names.
    """
    cats = [c for c in pixel_labels if np.asarray(pixel_labels[c]).size]
    n = next((int(np.asarray(pixel_labels[c]).shape[0]) for c in cats), 0)
    if not cats:
        return DominantConcepts(np.zeros(n, np.int64), np.full(n, "", object))
    size = 1 + max(int(np.asarray(pixel_labels[c]).max(initial=0)) for c in cats)
    counts = {c: _per_image_counts(np.asarray(pixel_labels[c]), size) for c in cats}
    purity: dict[str, float] = {}
    excluded: list[str] = []
    if classes is not None and (np.asarray(classes) >= 0).any():
        purity = {c: class_purity(_argmax_nonzero(counts[c]), classes) for c in cats}
        excluded = [c for c in cats if purity[c] >= max_purity]
        if len(excluded) == len(cats):
            excluded = []
    used = [c for c in cats if c not in excluded]
    total = sum(counts[c] for c in used)
    concept = _argmax_nonzero(total)
    owner = {}
    for c in used:  # label → category (labels are global across categories)
        for label in np.flatnonzero(counts[c].sum(axis=0)):
            owner.setdefault(int(label), c)
    category = np.array([owner.get(int(v), "") if v else "" for v in concept], dtype=object)
    return DominantConcepts(concept, category, purity, excluded)
