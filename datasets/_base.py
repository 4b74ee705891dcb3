"""Dataset protocol and registry: what every concept dataset hands to the pipeline.

The constraint: Network Dissection tallies pixel masks per concept, location stability needs landmarks,
training needs class labels — and the pipeline must stream all of it shard by shard, keyed in the cache
by a cheap content digest (never a hash of every image). So a dataset is random-access by index, returns
whole numpy batches (no per-item Python objects on the hot path), and describes its concepts up front.

Conventions:
* Images are ``uint8`` arrays ``(N, 3, H, W)`` (RGB); normalisation belongs to the model, not the data.
* Concepts have global label numbers ≥ 1 (0 = unlabelled), unique across categories, as in Broden.
* Pixel-level categories give label maps ``(N, L, sh, sw)`` int32 at the segmentation resolution, L ≥ 1
  layers (a pixel may carry several labels of one category, one per layer; 0 = none).
* Whole-image categories give ``(N, K)`` int32 label lists, 0-padded.
* Landmarks are ``(N, P, 2)`` float32 ``(x, y)`` in image pixel coordinates (pixel centres at ``i + 0.5``)
  with a ``(N, P)`` bool visibility mask.
* Class labels are int64 ``(N,)``, −1 where there is none.
"""

from __future__ import annotations

import abc
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..core import UserInputError

__all__ = [
    "Concept",
    "Batch",
    "ConceptDataset",
    "DatasetError",
    "register_dataset",
    "create_dataset",
    "list_datasets",
]


class DatasetError(UserInputError):
    """Bad dataset input (missing file, malformed row, corrupt image, path escaping the root).

    The message names the file and row, the value received and the fix; the CLI turns it into exit code 2.
    """


@dataclass(frozen=True)
class Concept:
    """One label: global number (≥ 1), display name, category, and whether it is a pixel mask."""

    label: int
    name: str
    category: str
    pixel_level: bool


@dataclass
class Batch:
    """A batch of items, all arrays aligned on the first axis (see the module docstring for layouts)."""

    index: np.ndarray  # (N,) int64 dataset indexes
    images: np.ndarray  # (N, 3, H, W) uint8
    pixel_labels: dict[str, np.ndarray] = field(default_factory=dict)  # category -> (N, L, sh, sw) int32
    image_labels: dict[str, np.ndarray] = field(default_factory=dict)  # category -> (N, K) int32
    landmarks: np.ndarray | None = None  # (N, P, 2) float32 (x, y)
    landmark_visible: np.ndarray | None = None  # (N, P) bool
    class_label: np.ndarray | None = None  # (N,) int64, -1 = none

    def __len__(self) -> int:
        return int(self.index.shape[0])


class ConceptDataset(abc.ABC):
    """Random-access dataset of images with concept masks, landmarks and class labels."""

    #: registry name of the dataset kind (``synthetic``, ``broden``, ``cub``, ``imagefolder``)
    kind: ClassVar[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image returned by :meth:`load`."""

    @property
    @abc.abstractmethod
    def seg_size(self) -> tuple[int, int]:
        """``(sh, sw)`` of the pixel label maps (equal to ``image_size`` when there are none)."""

    @property
    @abc.abstractmethod
    def concepts(self) -> list[Concept]:
        """All concepts, sorted by label number."""

    @property
    def categories(self) -> list[str]:
        """Category names in first-appearance order of :attr:`concepts`."""
        seen: dict[str, None] = {}
        for concept in self.concepts:
            seen.setdefault(concept.category, None)
        return list(seen)

    @property
    def landmark_names(self) -> list[str]:
        """Names of the P landmarks (empty when the dataset has none)."""
        return []

    @property
    def class_names(self) -> list[str]:
        """Names of the classes used by ``class_label`` (empty when there are none)."""
        return []

    @abc.abstractmethod
    def digest(self) -> str:
        """Content digest for cache keys: generator params, or a hash of the index/label files."""

    @abc.abstractmethod
    def load(self, indices: np.ndarray) -> Batch:
        """Load the items at ``indices`` (int array) as one :class:`Batch`, in that order."""

    def split_indices(self, split: str) -> np.ndarray:
        """Indexes of ``split`` (``"train"``/``"val"``); the default is a deterministic 80/20 interleave."""
        idx = np.arange(len(self), dtype=np.int64)
        is_val = (idx % 5) == 4
        if split == "train":
            return idx[~is_val]
        if split == "val":
            return idx[is_val]
        raise DatasetError(f"unknown split {split!r}; use 'train' or 'val'")

    def shards(self, shard_size: int) -> list[range]:
        """Deterministic contiguous index ranges of at most ``shard_size`` items covering the dataset."""
        if shard_size < 1:
            raise DatasetError(f"shard_size must be ≥ 1, got {shard_size}")
        n = len(self)
        return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]

    def describe(self) -> dict[str, Any]:
        """Small JSON-able description for run records and reports."""
        return {
            "kind": self.kind,
            "images": len(self),
            "image_size": list(self.image_size),
            "seg_size": list(self.seg_size),
            "categories": self.categories,
            "concepts": len(self.concepts),
            "landmarks": self.landmark_names,
            "classes": len(self.class_names),
            "digest": self.digest(),
        }


_REGISTRY: dict[str, Callable[..., ConceptDataset]] = {}


def register_dataset(kind: str) -> Callable[[Callable[..., ConceptDataset]], Callable[..., ConceptDataset]]:
    """Class/factory decorator registering a dataset kind; a duplicate name raises."""

    def decorate(factory: Callable[..., ConceptDataset]) -> Callable[..., ConceptDataset]:
        if kind in _REGISTRY:
            raise ValueError(f"dataset kind {kind!r} is already registered ({_REGISTRY[kind]!r})")
        _REGISTRY[kind] = factory
        return factory

    return decorate


def create_dataset(kind: str, **params: Any) -> ConceptDataset:
    """Build a registered dataset by kind with its keyword parameters."""
    if kind not in _REGISTRY:
        raise DatasetError(f"unknown dataset kind {kind!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[kind]
    _check_parameters(kind, factory, params)
    return factory(**params)


def _check_parameters(kind: str, factory: Callable[..., ConceptDataset], params: dict[str, Any]) -> None:
    """Unknown or missing keyword parameters as a DatasetError naming them (not a bare TypeError)."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the factory judge
        return
    accepted = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    names = [p.name for p in accepted]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise DatasetError(
            f"unknown dataset parameter(s) {', '.join(map(repr, unknown))} for kind {kind!r}; "
            f"accepted: {', '.join(names)} (check [dataset.params])"
        )
    missing = [p.name for p in accepted if p.default is p.empty and p.name not in params]
    if missing:
        raise DatasetError(
            f"dataset kind {kind!r} needs parameter(s) {', '.join(map(repr, missing))}; add them to [dataset.params]"
        )


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset kinds matching a glob."""
    return sorted(k for k in _REGISTRY if fnmatch.fnmatch(k, pattern))
