"""Compiled CPU kernels of the IoU tally: label preparation and the sparse-quad on-pixel count.

The IoU tally's work is a loop over (image, unit, quad, pixel) whose useful part is tiny and data dependent:
most maps never exceed their threshold, most pixels of a hot map are off, most label quads carry a single
label. Vectorised array code (the torch path in ``_iou``, used on the GPU) must materialise index lists and
bool masks for every evaluated pixel and pays several memory passes per pixel. The compiled loops read each
activation once from memory (a branch-free scan that also catches NaN/inf), then visit only the quads around
cells above the pruning bound, skip or take whole the quad rows whose two ends decide them, and increment
the (unit, label) counters in place. On one CPU core that is 5–10× the torch path.

Both kernels are Numba ``njit`` functions, compiled on first use (a few seconds) and cached on disk in the
package directory or Numba's user cache; where neither is writable they are compiled once per process.
Arithmetic is plain IEEE float32 without fast-math, so every bilinear value is bit-identical to the torch
path's ``_bilinear`` (same operations in the same order, no fused multiply-add) and both paths count the
same pixels; the tests hold them to exact equality.

Geometry arguments describe the *segments* of ``_iou._Axis``: consecutive pixel runs sharing a lower corner
cell (``start``, ``count``), the corner cells (``lower``, ``upper``) and per-pixel weights.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["prepare_labels", "count_quads"]


def _compiled(function):
    """``njit`` with an on-disk cache when Numba finds a writable place for one, else without."""
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "no locator available": a read-only install and no writable user cache directory
        return njit(nogil=True)(function)


@_compiled
def prepare_labels(
    pixel, lookup, y_start, y_count, x_start, x_count, columns, per_image, uniform, first_layer
):  # pragma: no cover - compiled
    """Label numbers → column indexes, per-image label histograms and one-label quads, in one pass.

    Args:
        pixel: ``(N, layers, sh, sw)`` integer label numbers of one category (0 = unlabelled).
        lookup: ``(max_label + 1,)`` int32 column of each label number, −1 for numbers that are not concepts;
            label 0 maps to the last column of ``per_image``.
        y_start, y_count, x_start, x_count: row / column segments (first pixel, length).
        columns: ``(N, all layers, sh, sw)`` int32 output; this category fills layers ``first_layer…``.
        per_image: ``(N, width)`` int64 label histograms, added to.
        uniform: ``(N, all layers, Sy, Sx)`` int32 output: a quad's column when all its pixels (in that layer)
            carry one label, else −1.

    Returns:
        the number of runs of label numbers that are not concepts' (counted as unlabelled; the caller raises).
    """
    n, layers, sh, sw = pixel.shape
    unlabelled = per_image.shape[1] - 1
    unknown = 0
    for i in range(n):
        for layer in range(layers):
            out = first_layer + layer
            # Labels come in runs along a row: look a number up once per run and add the run's length at
            # its end (no lookup and no store-to-load chain on one counter per pixel).
            run_value = pixel[i, layer, 0, 0]
            run_column = _column(run_value, lookup)
            if run_column < 0:
                unknown += 1
                run_column = unlabelled
            run_length = 0
            for y in range(sh):
                for x in range(sw):
                    value = pixel[i, layer, y, x]
                    if value != run_value:
                        per_image[i, run_column] += run_length
                        run_length = 0
                        run_value = value
                        run_column = _column(value, lookup)
                        if run_column < 0:
                            unknown += 1
                            run_column = unlabelled
                    columns[i, out, y, x] = run_column
                    run_length += 1
            per_image[i, run_column] += run_length
            for sy in range(len(y_start)):
                for sx in range(len(x_start)):
                    label = columns[i, out, y_start[sy], x_start[sx]]
                    for y in range(y_start[sy], y_start[sy] + y_count[sy]):
                        for x in range(x_start[sx], x_start[sx] + x_count[sx]):
                            if columns[i, out, y, x] != label:
                                label = -1
                                break
                        if label < 0:
                            break
                    uniform[i, out, sy, sx] = label
    return unknown


@njit(nogil=True, inline="always")
def _column(value, lookup):  # pragma: no cover - compiled
    """The column of a label number, −1 when it is not a concept's."""
    if value >= 0 and value < len(lookup):
        return lookup[value]
    return -1


@_compiled
def count_quads(
    acts, thresholds, bounds, full_bounds,
    y_lower, y_upper, y_start, y_count, wy_lo, wy_hi,
    x_lower, x_upper, x_start, x_count, wx_lo, wx_hi,
    columns, uniform, on_count, intersection,
):  # pragma: no cover - compiled
    """Add each unit's on-pixels per image to ``on_count`` and per (unit, label column) to ``intersection``.

    Returns the number of NaN/inf activation values; when it is not 0 nothing was added.

    A pixel is on when its bilinear value (float32: rows first, then columns, as ``_iou._bilinear``) is
    ``> thresholds[u]``. ``bounds[u]`` is the pruning bound of ``_iou._prune_thresholds``: a convex
    combination of values ≤ it cannot exceed the threshold, so maps, quads and quad rows whose corners are all
    ≤ the bound are skipped without changing any count. Symmetrically, ``full_bounds[u]``
    (``_iou._full_thresholds``, +inf unless the threshold is ≥ 0) is a value from which every float32 convex
    combination of two values ≥ it exceeds the threshold: such quad rows are all on without evaluation.

    Args:
        acts: ``(N, C, H, W)`` float32, C-contiguous.
        thresholds, bounds, full_bounds: ``(C,)`` float32.
        y_lower, y_upper: ``(Sy,)`` corner rows of each row segment; y_start, y_count: its pixels.
        wy_lo, wy_hi: ``(sh,)`` float32 weights of the lower / upper corner row per pixel row.
        x_*: the same along columns.
        columns: ``(N, layers, sh, sw)`` int32 label columns (``width − 1`` = unlabelled, not counted).
        uniform: ``(N, layers, Sy, Sx)`` int32 one-label quads (−1 = mixed).
        on_count: ``(N, C)`` int64, added to.
        intersection: ``(C, width − 1)`` int64, added to.
    """
    n, c, h, w = acts.shape
    layers = columns.shape[1]
    unlabelled = intersection.shape[1]
    num_sy, num_sx = len(y_start), len(x_start)
    max_rows = 0
    for sy in range(num_sy):
        max_rows = max(max_rows, y_count[sy])
    max_cols = 0
    for sx in range(num_sx):
        max_cols = max(max_cols, x_count[sx])
    on = np.zeros((max_rows, max_cols), np.bool_)  # on-pixels of the current quad; valid where row_on > 0
    row_on = np.zeros(max_rows, np.int64)
    # A hot cell (> bound) makes every quad it is a corner of hot: visit those quads only, each once.
    y_touch, y_touch_start = _touching(y_lower, y_upper, h)
    x_touch, x_touch_start = _touching(x_lower, x_upper, w)
    marked = np.zeros((num_sy, num_sx), np.bool_)
    quads = np.empty((num_sy * num_sx, 2), np.int64)
    # Pass 1 reads every value once: which maps have a cell above the bound, and whether any value is NaN/inf
    # (then nothing is counted, so the caller can refuse the batch with the tally untouched).
    hot = np.zeros((n, c), np.bool_)
    hot_rows = np.zeros((n, c, h), np.bool_)
    nonfinite = 0
    for i in range(n):
        for u in range(c):
            plane = acts[i, u]
            bound = bounds[u]
            for y in range(h):
                above = 0
                for x in range(w):
                    value = plane[y, x]
                    above += value > bound  # branch-free: vectorises
                    nonfinite += (value - value) != 0  # inf − inf and NaN − NaN are NaN
                if above:
                    hot_rows[i, u, y] = True
                    hot[i, u] = True
    if nonfinite:
        return nonfinite
    # Pass 2: the hot maps only, quad by quad.
    for i in range(n):
        for u in range(c):
            if not hot[i, u]:
                continue
            plane = acts[i, u]
            bound = bounds[u]
            threshold = thresholds[u]
            full = full_bounds[u]
            num_quads = 0
            for y in range(h):
                if not hot_rows[i, u, y]:
                    continue
                for x in range(w):
                    if plane[y, x] > bound:
                        for a in range(y_touch_start[y], y_touch_start[y + 1]):
                            sy = y_touch[a]
                            for b in range(x_touch_start[x], x_touch_start[x + 1]):
                                sx = x_touch[b]
                                if not marked[sy, sx]:
                                    marked[sy, sx] = True
                                    quads[num_quads, 0] = sy
                                    quads[num_quads, 1] = sx
                                    num_quads += 1
            total = 0
            for q in range(num_quads):
                sy = quads[q, 0]
                sx = quads[q, 1]
                marked[sy, sx] = False
                r0 = y_lower[sy]
                r1 = y_upper[sy]
                rows = y_count[sy]
                c0 = x_lower[sx]
                c1 = x_upper[sx]
                lo_lo = plane[r0, c0]
                hi_lo = plane[r1, c0]
                lo_hi = plane[r0, c1]
                hi_hi = plane[r1, c1]
                cols = x_count[sx]
                x0 = x_start[sx]
                quad = 0
                for row in range(rows):
                    py = y_start[sy] + row
                    left = lo_lo * wy_lo[py] + hi_lo * wy_hi[py]
                    right = lo_hi * wy_lo[py] + hi_hi * wy_hi[py]
                    if left <= bound and right <= bound:
                        row_on[row] = 0
                    elif left >= full and right >= full:
                        row_on[row] = cols
                        for col in range(cols):
                            on[row, col] = True
                    else:
                        count = 0
                        for col in range(cols):
                            value = left * wx_lo[x0 + col] + right * wx_hi[x0 + col]
                            flag = value > threshold
                            on[row, col] = flag
                            count += flag
                        row_on[row] = count
                    quad += row_on[row]
                if quad == 0:
                    continue
                total += quad
                for layer in range(layers):
                    label = uniform[i, layer, sy, sx]
                    if label >= 0:
                        if label < unlabelled:
                            intersection[u, label] += quad
                        continue
                    # Mixed quad: on-pixels by label, counted in runs of one label.
                    run_label = unlabelled
                    run_length = 0
                    for row in range(rows):
                        if row_on[row] == 0:
                            continue
                        py = y_start[sy] + row
                        for col in range(cols):
                            if on[row, col]:
                                label = columns[i, layer, py, x0 + col]
                                if label != run_label:
                                    if run_label < unlabelled:
                                        intersection[u, run_label] += run_length
                                    run_label = label
                                    run_length = 0
                                run_length += 1
                    if run_label < unlabelled:
                        intersection[u, run_label] += run_length
            on_count[i, u] += total
    return 0


@_compiled
def _touching(lower, upper, cells):  # pragma: no cover - compiled
    """CSR lists of the segments each cell is a corner of: ``segments[start[a]:start[a + 1]]`` for cell ``a``."""
    counts = np.zeros(cells + 1, np.int64)
    for s in range(len(lower)):
        counts[lower[s] + 1] += 1
        if upper[s] != lower[s]:
            counts[upper[s] + 1] += 1
    start = np.cumsum(counts)
    segments = np.empty(start[-1], np.int64)
    fill = start[:-1].copy()
    for s in range(len(lower)):
        segments[fill[lower[s]]] = s
        fill[lower[s]] += 1
        if upper[s] != lower[s]:
            segments[fill[upper[s]]] = s
            fill[upper[s]] += 1
    return segments, start
