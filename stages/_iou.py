"""IoU tally of Network Dissection: per (unit, concept) intersection, unit on-area and concept area.

Per image, each unit's H×W map is upsampled bilinearly to the label resolution (sh, sw), binarised with the
unit's threshold (``> T``, strict as in the reference), and counted against the pixel labels
(Bau et al., CVPR 2017):

* ``I[u, l]`` (intersection): on-pixels of ``u`` carrying label ``l``, summed over every label layer of every
  pixel-level category; a whole-image label counts every on-pixel of the image (a full mask).
* ``A[u, c]`` (activation, the unit's side of the union): on-pixels of ``u`` summed over the images
  *relevant* to category ``c``, by one of two conventions (``union``):

  - ``"category-images"`` (the default): an image is relevant to ``c`` when any label whose category
    (``Concept.category``, its primary category) is ``c`` is present in it. This is the rule of the original
    NetDissect code (``makeresult.py``, ``count_act_with_labelcat``), which produced the published numbers of
    Bau et al., CVPR 2017 (Caffe models), and of its successors quick-netdissect and GAN Dissection
    (Bau et al., ICLR 2019).
  - ``"lite"``: an image is relevant to ``c`` *for unit u* only when ``u``'s on-pixels in that image
    intersect some label of ``c`` (a whole-image label intersects every on-pixel) — NetDissect-Lite's
    ``tally_job`` (``tally_units_cat += len(indexes) * (tally_cat > 0)``). Lite is the PyTorch
    re-implementation released after the paper; numbers from work that dissects models with it follow
    this rule. Lite's loop reuses the
    previous image's categories for an image with no pixel-level labels; this implements the rule, not that
    slip.

  ``A`` under ``"lite"`` is never larger, so Lite's IoUs are higher or equal (measured against Lite on a
  Broden export: up to 1.3× for object, part and material concepts); intersections and label areas are identical.
* ``G[l]`` (truth): pixels carrying ``l``; a whole-image label adds sh·sw per image. Label 0 is "unlabelled".
* ``IoU[u, l] = I / (A[u, cat(l)] + G[l] − I)``, 0 where the union is empty (never NaN).

Upsampling (:func:`upsample_bilinear`) is bilinear with half-pixel centres and edge clamping — the geometry
and weights of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` — evaluated by one
fixed float32 formula, so results are the same on CPU and GPU; it agrees with ``interpolate`` to float
rounding (a pixel within an ulp of ``T`` can differ).

The constraint that shaped it: the reference loops over images and units in Python and upsamples every map;
here upsampling is *sparse* and the counting runs in one of two kernels that count the same pixels. A
bilinear pixel is a convex combination of the 2×2 cells around it, so it can only exceed ``T`` when one of
those cells does: only such "quads" are evaluated (a 2⁻¹⁸ relative safety margin makes the pruning exact),
which at the usual top-0.5 % threshold skips ~98 % of the pixels. A quad whose pixels all carry one label (in
a layer) adds its on-count to that label; only mixed quads look up labels per on-pixel. All counts are int64
and merge by addition, exactly.

* ``compiled`` (the CPU default, ``_iou_kernels``): Numba loops that read each map once (a vectorised scan,
  then a hot map's cells above the bound as bits per cell row while it is in cache), evaluate, strip by
  strip of pixel rows, only the corner columns next to such cells, skip (or take whole) groups whose two
  ends are below (or safely above) ``T``, add stretches of one-label quads in one step, and increment the
  counters in place; one core, no temporaries per pixel.
* ``torch`` (GPUs): the same quads as index tensors — hot-quad ``nonzero``, gathered corners, a bincount
  over (unit, label) for mixed quads, scatter-adds — in blocks of ``block_pixels``. On a CPU it is several
  times slower than the compiled loops (it materialises every evaluated pixel); the tests hold the two to
  exact equality. Its many medium-sized tensor operations gain little from intra-op threads and suffer on
  an oversubscribed CPU; CPU workers run with ``torch.set_num_threads(1)``.

This module holds :class:`IoUTally`, the mergeable statistic; the upsampling and quad geometry live in
``_iou_geometry``, the compiled kernel in ``_iou_kernels``, the result tables (:func:`iou_tables`) in
``_iou_tables``.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from typing import Sequence, Self

import numpy as np
import pyarrow as pa
import torch

from ..core import StreamingStatistic, pack_arrays, unpack_arrays
from ..datasets import Batch, Concept
from ._errors import StageInputError
from ._iou_geometry import _axis, _full_thresholds, _prune_thresholds, _QuadGeometry, _uniform_quads

__all__ = ["IoUTally", "UNIONS"]

#: the conventions for a unit's side of a category's union (see the module docstring)
UNIONS = ("category-images", "lite")


# The last concept list checked and its result: a dataset hands every tally of a run the same (frozen) Concept
# objects, so the next tally's check is one tuple comparison (identity first, element by element, in C).
_last_concepts: tuple[tuple[Concept, ...], tuple[np.ndarray, np.ndarray, list[str]]] | None = None


def _check_concepts(concepts: Sequence[Concept]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label numbers sorted, their category indexes and the categories in first-appearance order (copies)."""
    global _last_concepts
    key = tuple(concepts)
    last = _last_concepts
    if last is None or last[0] != key:
        last = _last_concepts = (key, _derive_concepts(key))
    labels, label_category, categories = last[1]
    return labels.copy(), label_category.copy(), list(categories)


def _derive_concepts(concepts: tuple[Concept, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not concepts:
        raise StageInputError("IoUTally: the concept list is empty; the dataset must describe its labels")
    labels = np.fromiter((c.label for c in concepts), dtype=np.int64, count=len(concepts))
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    if ordered[0] < 1 or (ordered[1:] == ordered[:-1]).any():
        raise StageInputError(f"IoUTally: concept labels must be unique numbers ≥ 1; got {labels.tolist()[:20]}")
    categories = [c.category for c in concepts]
    index = {category: k for k, category in enumerate(dict.fromkeys(categories))}
    category_of = np.fromiter((index[category] for category in categories), dtype=np.int64, count=len(categories))
    return ordered, category_of[order], list(index)


_scratch_arrays = threading.local()
_SCRATCH_BYTES = 16 * 2**20  # larger tables are allocated per batch: kept, they would raise the memory floor


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread array of this shape and dtype, reused across calls (contents undefined) when it is small."""
    if math.prod(shape) * np.dtype(dtype).itemsize > _SCRATCH_BYTES:
        return np.empty(shape, dtype)
    arrays = getattr(_scratch_arrays, "arrays", None)
    if arrays is None:
        arrays = _scratch_arrays.arrays = {}
    array = arrays.get(name)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = arrays[name] = np.empty(shape, dtype)
    return array


def _batch_plan(n: int, layers: int, h: int, w: int, sh: int, sw: int, width: int) -> tuple:
    """The compiled kernel's geometry and label tables for one batch shape: ``(ay, ax, columns, uniform,
    extent, row_uniform, row_split, per_image)``, kept per thread while the shape repeats (one tuple
    comparison per batch instead of a dozen look-ups: each costs more after a batch's kernels have evicted the
    interpreter's data from the caches). Contents undefined; tables over ``_SCRATCH_BYTES`` are not kept."""
    key = (n, layers, h, w, sh, sw, width)
    plan = getattr(_scratch_arrays, "plan", None)
    if plan is not None and plan[0] == key:
        return plan[1]
    tables = (
        _scratch("columns", (n, layers, sh, sw), np.int32),
        _scratch("uniform", (n, layers, h, w), np.int32),
        _scratch("extent", (n, layers, h, w), np.int32),
        _scratch("row_uniform", (n, layers, sh, w), np.int32),
        _scratch("row_split", (n, layers, sh, w, 2), np.int32),
        _scratch("per_image", (n, width), np.int64),
    )
    plan = (_axis(h, sh), _axis(w, sw), *tables)
    if all(table.nbytes <= _SCRATCH_BYTES for table in tables):
        _scratch_arrays.plan = (key, plan)
    return plan


_NO_HITS = np.zeros((0, 0, 0), np.uint8)  # ``count_maps``' hits where the union needs none (never written)


def _nonfinite_error() -> StageInputError:
    return StageInputError("IoUTally.update: activations contain NaN/inf values; fix the extraction")


class IoUTally(StreamingStatistic):
    """Integer counts ``I (C, L)``, ``A (C, categories)``, ``G (L,)`` of Network Dissection, mergeable.

    Columns follow the concepts sorted by label number; categories are in first-appearance order of the
    concept list. The number of units is fixed by the first batch.

    Args:
        concepts: the dataset's concepts (label numbers ≥ 1, one category each).
        seg_size: ``(sh, sw)`` of the pixel label maps (the dataset's ``seg_size``); maps are upsampled to it.
        device: torch device for the counting (``"cpu"``, ``"cuda"``); execution only, not part of the state.
        chunk_images: torch kernel: images per step (memory ∝ chunk · (C·H·W + layers·sh·sw)). The compiled
            kernel takes a batch at once (extra memory: a float32 copy of non-float32 activations and an int32
            copy of the labels).
        block_pixels: torch kernel: upper bound on pixel evaluations held at once (float32 + bool each).
        kernel: ``"compiled"`` (the Numba loops of ``_iou_kernels``, CPU only), ``"torch"`` (vectorised torch,
            any device) or ``"auto"``: compiled on the CPU (torch where Numba is not installed), torch on a
            GPU. Both count the same pixels.
        union: ``"category-images"`` (original NetDissect) or ``"lite"`` (NetDissect-Lite): which images a
            unit's on-pixels count in for a category's union, see the module docstring. ``"lite"`` needs the
            per-image intersections, so both kernels then count one image at a time (slower on a GPU).
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        seg_size: tuple[int, int],
        device: str | torch.device = "cpu",
        chunk_images: int = 32,
        block_pixels: int = 2**22,
        kernel: str = "auto",
        union: str = "category-images",
    ):
        self.labels, self.label_category, self.categories = _check_concepts(concepts)
        if union not in UNIONS:
            raise StageInputError(f"IoUTally: union must be one of {', '.join(map(repr, UNIONS))}; got {union!r}")
        self.union = union
        sh, sw = (int(s) for s in seg_size)
        if sh < 1 or sw < 1:
            raise StageInputError(f"IoUTally: seg_size must be two positive sizes; got {seg_size}")
        self.seg_size = (sh, sw)
        self.device = torch.device(device)
        if kernel not in ("auto", "compiled", "torch"):
            raise StageInputError(f"IoUTally: kernel must be 'auto', 'compiled' or 'torch'; got {kernel!r}")
        if kernel == "compiled" and self.device.type != "cpu":
            raise StageInputError(
                f"IoUTally: the compiled kernel runs on the CPU, not on {self.device}; use kernel='torch' or 'auto'"
            )
        have_numba = importlib.util.find_spec("numba") is not None
        if kernel == "compiled" and not have_numba:
            raise StageInputError(
                "IoUTally: kernel='compiled' needs Numba, which is not installed; "
                "install the [fast] extra (pip install \"repdissect[fast]\") or use kernel='auto' or 'torch'"
            )
        if kernel == "auto":
            # Numba is optional ([fast]); without it the torch path counts the same pixels, more slowly.
            kernel = "compiled" if self.device.type == "cpu" and have_numba else "torch"
        self.kernel = kernel
        self.chunk_images = max(1, int(chunk_images))
        self.block_pixels = max(1, int(block_pixels))
        self.num_units: int | None = None
        self.images = 0
        num_labels = len(self.labels)
        self.truth = np.zeros(num_labels, dtype=np.int64)
        self.intersection: np.ndarray | None = None  # (C, L)
        self.activation: np.ndarray | None = None  # (C, categories)
        lookup = np.full(int(self.labels.max()) + 1, -1, dtype=np.int32)
        lookup[self.labels] = np.arange(num_labels)
        lookup[0] = num_labels  # the "no label" column, dropped at the end
        self._lookup = lookup
        self._kept_bounds = None  # the compiled kernel's bounds of the last thresholds (``_bounds``)
        # (L, categories) 0/1: label → its category. float32 so products with it are BLAS-fast, and exact: sums of
        # 0/1 values ≤ the number of labels.
        self._category_of = np.zeros((num_labels, len(self.categories)), dtype=np.float32)
        self._category_of[np.arange(num_labels), self.label_category] = 1

    # -- input handling
    def _columns(self, values: np.ndarray, where: str) -> np.ndarray:
        """Label numbers → int32 column indexes (``L`` for 0); unknown numbers raise."""
        values = np.asarray(values)
        if values.dtype.kind not in "iu":
            raise StageInputError(f"IoUTally: {where} labels must be integers; got dtype {values.dtype}")
        columns = None
        if values.size == 0 or (values.min() >= 0 and values.max() < len(self._lookup)):
            columns = self._lookup[values]
        if columns is None or (columns.size and columns.min() < 0):
            values = values.astype(np.int64)
            known = (values >= 0) & (values < len(self._lookup))
            known[known] = self._lookup[values[known]] >= 0
            unknown = np.unique(values[~known])[:8].tolist()
            raise StageInputError(
                f"IoUTally: {where} holds label numbers {unknown} that are not among the dataset's concepts; "
                "pass the dataset's full concept list"
            )
        return columns

    def _prepare(self, acts, thresholds, batch: Batch, image_ids):
        acts = np.asarray(acts)
        if acts.ndim == 2:
            acts = acts[:, :, None, None]
        if acts.ndim != 4 or acts.dtype.kind != "f":
            raise StageInputError(
                f"IoUTally.update: activations must be float (N, C, H, W) or (N, C); got {acts.dtype} {acts.shape}"
            )
        n, c = acts.shape[:2]
        # The compiled kernel checks while it reads the values (one memory pass instead of two).
        if self.kernel != "compiled" and not np.isfinite(acts).all():
            raise _nonfinite_error()
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (c,) or not np.isfinite(thresholds).all():
            raise StageInputError(
                f"IoUTally.update: thresholds must be {c} finite values (one per unit); got shape {thresholds.shape}"
            )
        if len(batch) != n:
            raise StageInputError(f"IoUTally.update: the batch has {len(batch)} images but activations have {n}")
        if image_ids is not None and not np.array_equal(np.asarray(image_ids), batch.index):
            raise StageInputError("IoUTally.update: image_ids differ from batch.index; load the batch for the same ids")
        if self.num_units is None:
            self.num_units = c
            self.intersection = np.zeros((c, len(self.labels)), dtype=np.int64)
            self.activation = np.zeros((c, len(self.categories)), dtype=np.int64)
        elif c != self.num_units:
            raise StageInputError(f"IoUTally.update: this batch has {c} units, earlier batches {self.num_units}")
        pixel_maps = []
        for category, maps in batch.pixel_labels.items():
            maps = np.asarray(maps)
            if maps.ndim != 4 or maps.shape[0] != n or tuple(maps.shape[2:]) != self.seg_size:
                raise StageInputError(
                    f"IoUTally.update: pixel labels of {category!r} must be (N={n}, L, {self.seg_size[0]}, "
                    f"{self.seg_size[1]}); got {maps.shape} (is seg_size the dataset's?)"
                )
            if maps.dtype.kind not in "iu":
                raise StageInputError(
                    f"IoUTally: pixel_labels[{category!r}] labels must be integers; got dtype {maps.dtype}"
                )
            pixel_maps.append((category, maps))
        scalar = [
            self._columns(np.asarray(v).reshape(n, -1), f"image_labels[{k!r}]") for k, v in batch.image_labels.items()
        ]
        scalar = np.concatenate(scalar, axis=1).astype(np.int64) if scalar else np.zeros((n, 0), np.int64)
        return acts, thresholds, pixel_maps, scalar

    # -- protocol
    def update(
        self, acts: np.ndarray, thresholds: np.ndarray, batch: Batch, image_ids: np.ndarray | None = None
    ) -> None:
        """Count one shard.

        Args:
            acts: ``(N, C, H, W)`` (or ``(N, C)``) activations, any float dtype.
            thresholds: ``(C,)`` per-unit thresholds (the ``threshold`` column of the thresholds stage).
            batch: the dataset batch of the same N images (pixel and whole-image labels are read).
            image_ids: optional ``(N,)`` ids of the activation rows, checked against ``batch.index``.
        """
        acts, thresholds, pixel_maps, scalar = self._prepare(acts, thresholds, batch, image_ids)
        if self.kernel == "compiled":
            self._update_compiled(acts, thresholds, pixel_maps, scalar)
        else:
            # Every label is mapped (and checked) before the first count: a bad batch leaves the tally unchanged.
            pixel = self._torch_labels(pixel_maps, acts.shape)
            step = 1 if self.union == "lite" else self.chunk_images
            for start in range(0, acts.shape[0], step):
                stop = min(acts.shape[0], start + step)
                self._count_torch(acts[start:stop], thresholds, pixel[start:stop], scalar[start:stop])
        self.images += acts.shape[0]

    def _count_labels(self, per_image: np.ndarray, scalar: np.ndarray):
        """Add G; return the whole-image label (rows, columns) and the (N, categories) relevance of each image."""
        n = len(per_image)
        num_pixels, num_labels = self.seg_size[0] * self.seg_size[1], len(self.labels)
        scalar_rows = np.repeat(np.arange(n), scalar.shape[1])
        scalar_cols = scalar.reshape(-1)
        keep = scalar_cols < num_labels
        scalar_rows, scalar_cols = scalar_rows[keep], scalar_cols[keep]
        self.truth += per_image[:, :num_labels].sum(axis=0)
        self.truth += num_pixels * np.bincount(scalar_cols, minlength=num_labels)
        present = per_image[:, :num_labels] > 0
        present[scalar_rows, scalar_cols] = True
        relevant = ((present.astype(np.float32) @ self._category_of) > 0).astype(np.int64)
        return scalar_rows, scalar_cols, relevant

    def _category_hits(self, pixel_intersection: np.ndarray) -> np.ndarray:
        """``(C, categories)`` bool: which categories one image's ``(C, L)`` pixel intersections touch."""
        return ((pixel_intersection > 0).astype(np.float32) @ self._category_of) > 0

    def _add_units(self, on_count: np.ndarray, scalar_rows, scalar_cols, relevant,
                   unit_hits: np.ndarray | None = None) -> None:
        """Whole-image labels intersect every on-pixel of their image; A sums on-pixels over relevant images
        (the torch path; the compiled one adds both in its kernels, ``count_maps`` and ``add_image_counts``).

        ``unit_hits`` (``union="lite"``): ``(N, C, categories)`` whether each unit's on-pixels in each image
        intersect a pixel label of each category; whole-image labels are added here.
        """
        np.add.at(self.intersection.T, scalar_cols, on_count[scalar_rows])
        if self.union == "category-images":
            self.activation += on_count.T @ relevant
            return
        hits = unit_hits.copy()
        hits[scalar_rows, :, self.label_category[scalar_cols]] = True  # a whole-image label meets every on-pixel
        self.activation += np.einsum("nu,nuc->uc", on_count, hits.astype(np.int64))

    def _bounds(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 thresholds, pruning and full bounds for the compiled kernel; kept while the same thresholds
        come back (a stage passes one set for every shard)."""
        kept = self._kept_bounds
        if kept is None or kept[0].tobytes() != thresholds.tobytes():  # float64 both: equal bytes, equal values
            kept = self._kept_bounds = (
                thresholds.copy(), thresholds.astype(np.float32), _prune_thresholds(thresholds),
                _full_thresholds(thresholds),
            )
        return kept[1:]

    def _update_compiled(self, acts: np.ndarray, thresholds: np.ndarray, pixel_maps, scalar: np.ndarray) -> None:
        """The whole batch in one pass of each compiled kernel; checks come first, the state changes last."""
        from ._iou_kernels import add_image_counts, count_maps, prepare_labels

        n, c, h, w = acts.shape
        sh, sw = self.seg_size
        layers = sum(maps.shape[1] for _, maps in pixel_maps)
        # Label tables, overwritten by the kernel where it reads them: reused between batches of one shape (no
        # fresh pages to fault in per batch).
        ay, ax, columns, uniform, extent, row_uniform, row_split, per_image = _batch_plan(
            n, layers, h, w, sh, sw, len(self.labels) + 1)
        per_image.fill(0)
        first = 0
        for category, maps in pixel_maps:
            unknown = prepare_labels(np.ascontiguousarray(maps), self._lookup, ay.cell_start, ax.cell_start, columns,
                                     per_image, uniform, extent, row_uniform, row_split, first)
            if unknown:
                self._columns(maps, f"pixel_labels[{category!r}]")  # raises, naming the unknown numbers
            first += maps.shape[1]

        on_count = np.zeros((n, c), np.int64)
        # The lite union needs, per image and unit, which categories the on-pixels meet.
        hits = np.zeros((n, c, len(self.categories)), np.uint8) if self.union == "lite" else _NO_HITS
        # Counted in place: on NaN/inf the kernel takes its partial counts back, so a refused batch leaves no trace.
        if count_maps(
            np.ascontiguousarray(acts, dtype=np.float32), *self._bounds(thresholds),
            ay.cell_start, ay.upper, ay.w_lo, ay.w_hi, ax.cell_start, ax.upper, ax.w_lo, ax.w_hi,
            columns, uniform, extent, row_uniform, row_split, scalar, self.label_category, on_count,
            self.intersection, hits, per_image,
        ):
            raise _nonfinite_error()
        add_image_counts(per_image, scalar, self.label_category, sh * sw, on_count, hits, self.truth,
                         self.activation, np.zeros(len(self.categories), np.uint8))

    def _torch_labels(self, pixel_maps, shape) -> np.ndarray:
        """Label columns ``(N, layers, sh, sw)`` of every pixel category, concatenated."""
        layers = [self._columns(maps, f"pixel_labels[{category!r}]") for category, maps in pixel_maps]
        return np.concatenate(layers, axis=1) if layers else np.zeros((shape[0], 0, *self.seg_size), np.int32)

    def _count_torch(self, acts: np.ndarray, thresholds: np.ndarray, pixel: np.ndarray, scalar: np.ndarray) -> None:
        dev = self.device
        n, c, h, w = acts.shape
        sh, sw = self.seg_size
        num_pixels, num_labels = sh * sw, len(self.labels)
        width = num_labels + 1  # the extra column collects label 0
        ay, ax = _axis(h, sh), _axis(w, sw)
        layers = pixel.shape[1]

        # Labels (numpy): per-image histograms give G and which labels, hence categories, each image has.
        per_image = np.zeros((n, width), dtype=np.int64)
        if layers:
            keys = np.arange(n, dtype=np.int64)[:, None, None, None] * width + pixel
            per_image += np.bincount(keys.reshape(-1), minlength=n * width).reshape(n, width)
        scalar_rows, scalar_cols, relevant = self._count_labels(per_image, scalar)

        # Units (torch): evaluate only the quads with a corner near or above the threshold.
        x = torch.tensor(np.asarray(acts, dtype=np.float32), device=dev)  # a copy: Arrow-backed arrays are read-only
        geometry = _QuadGeometry.build(ay, ax, dev)
        hot = x > torch.as_tensor(_prune_thresholds(thresholds), device=dev)[None, :, None, None]
        # A quad's corners are its lower cell and the next one (the last cell is its own upper corner).
        hot_rows = hot.clone()
        hot_rows[:, :, :-1] |= hot[:, :, 1:]
        hot_quads = hot_rows.clone()
        hot_quads[:, :, :, :-1] |= hot_rows[:, :, :, 1:]
        hot_quads = hot_quads.index_select(2, geometry.y_lo).index_select(3, geometry.x_lo)
        quads = torch.nonzero(hot_quads)  # (K, 4): image, unit, row segment, column segment

        on_count = torch.zeros(n * c, dtype=torch.int64, device=dev)
        pair_counts = torch.zeros(c * width, dtype=torch.int64, device=dev)
        if len(quads):
            uniform = cols_by_layer = None
            if layers:
                uniform = torch.as_tensor(_uniform_quads(pixel, ay, ax), device=dev)
                # (layers, image · pixel): one contiguous label row per layer
                cols_by_layer = torch.as_tensor(np.ascontiguousarray(pixel.transpose(1, 0, 2, 3)), device=dev)
                cols_by_layer = cols_by_layer.reshape(layers, n * num_pixels)
            t = torch.as_tensor(thresholds.astype(np.float32), device=dev)
            step = max(1, self.block_pixels // geometry.quad_size)
            for begin in range(0, len(quads), step):
                geometry.count(quads[begin : begin + step], x, t, cols_by_layer, uniform, width, on_count, pair_counts)
        pixel_intersection = pair_counts.reshape(c, width)[:, :num_labels].cpu().numpy()
        self.intersection += pixel_intersection
        unit_hits = None
        if self.union == "lite":  # update() hands this path one image at a time then
            assert n == 1, "union='lite' counts one image per call"
            unit_hits = self._category_hits(pixel_intersection)[None]
        self._add_units(on_count.reshape(n, c).cpu().numpy(), scalar_rows, scalar_cols, relevant, unit_hits)

    def merge(self, other: Self) -> Self:
        if (
            not np.array_equal(self.labels, other.labels)
            or not np.array_equal(self.label_category, other.label_category)
            or self.categories != other.categories
            or self.seg_size != other.seg_size
            or self.union != other.union
        ):
            raise StageInputError(
                "IoUTally.merge: tallies over different concepts, seg sizes or union conventions cannot be merged"
            )
        if other.num_units is None:
            return self
        if self.num_units is None:
            self.num_units = other.num_units
            self.intersection = other.intersection.copy()
            self.activation = other.activation.copy()
        elif other.num_units != self.num_units:
            raise StageInputError(f"IoUTally.merge: {self.num_units} units vs {other.num_units} units")
        else:
            self.intersection += other.intersection
            self.activation += other.activation
        self.truth += other.truth
        self.images += other.images
        return self

    def to_table(self) -> pa.Table:
        arrays = {"labels": self.labels, "label_category": self.label_category, "truth": self.truth}
        if self.num_units is not None:
            arrays |= {"intersection": self.intersection, "activation": self.activation}
        attrs = {
            "kind": "IoUTally",
            "categories": self.categories,
            "seg_size": list(self.seg_size),
            "num_units": self.num_units,
            "images": self.images,
            "union": self.union,
        }
        return pack_arrays(arrays, attrs)

    @classmethod
    def from_table(cls, table: pa.Table, device: str | torch.device = "cpu") -> Self:
        arrays, attrs = unpack_arrays(table)
        arrays = {name: array.copy() for name, array in arrays.items()}  # unpacked arrays are read-only views
        if attrs.get("kind") != "IoUTally":
            raise StageInputError(f"IoUTally.from_table: table holds a {attrs.get('kind')!r} state")
        categories = attrs["categories"]
        concepts = [
            Concept(int(label), str(label), categories[int(cat)], True)
            for label, cat in zip(arrays["labels"], arrays["label_category"])
        ]
        stat = cls(concepts, tuple(attrs["seg_size"]), device=device, union=attrs.get("union", "category-images"))
        stat.categories = list(categories)  # keep the saved order even if a category has no label
        stat.label_category = arrays["label_category"]
        stat.truth = arrays["truth"]
        stat.images = int(attrs["images"])
        stat.num_units = attrs["num_units"]
        if stat.num_units is not None:
            stat.intersection, stat.activation = arrays["intersection"], arrays["activation"]
        return stat

    # -- results
    def result(self) -> np.ndarray:
        """The read-out: ``(C, L)`` float64 IoU (:meth:`iou`); the tables are :func:`iou_tables`."""
        return self.iou()

    def iou(self) -> np.ndarray:
        """``(C, L)`` float64 IoU, 0 where the union is empty."""
        if self.num_units is None:
            raise StageInputError("IoUTally.iou: no activations were counted")
        inter = self.intersection.astype(np.float64)
        union = self.activation[:, self.label_category] + self.truth[None, :] - self.intersection
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


