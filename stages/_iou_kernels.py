"""Compiled CPU kernels of the IoU tally: label preparation and the sparse-quad on-pixel count.

The IoU tally's work is a loop over (image, unit, quad, pixel) whose useful part is tiny and data dependent:
most maps never exceed their threshold, most pixels of a hot map are off, most label quads carry a single
label. Vectorised array code (the torch path in ``_iou``, used on the GPU) must materialise index lists and
bool masks for every evaluated pixel and pays several memory passes per pixel. The compiled loops read each
map once from memory: a vectorised scan (is any cell above the pruning bound? is any value NaN/inf?) and, for
a hot map only, a byte mask of its hot cells, found eight at a time through 64-bit words; then they visit only
the quads around those cells while the map is in the L1 cache, skip or take whole the quad rows whose two
ends decide them, and increment the (unit, label) counters in place. On one CPU core that is 5–14× the torch
path.

What bounds them (measured): the scan runs near memory speed only when its loop vectorises, which needs two
things Numba does not give by default — float32 sums with LLVM's ``reassoc`` flag (integer or boolean
accumulators kept it scalar) and indexes that cannot be negative (an index ``base + k`` into a flat array
made Numba's negative-index wrap-around a per-element select, which LLVM turned into gathers: slices indexed
from 0 avoid it). At 56² maps → 112² labels a quad is 2 × 2 pixels, so the per-quad bookkeeping (listing,
dedup, corners, per-layer label lookups) dominates; at 7² → 112² a quad is 16 × 16 pixels and the per-pixel
evaluation and mixed-quad label runs do.

The kernels are Numba ``njit`` functions, compiled on first use (10–30 s on a loaded machine) and cached on
disk in the package directory or Numba's user cache; where neither is writable they are compiled once per
process. Loading them from the cache still costs about a second, so a run loads them in a background thread
from its start (``_warmup.warm_kernels``). Only the scan carries a fast-math flag (``reassoc``, for its sums);
the bilinear arithmetic is plain IEEE float32, so every value is bit-identical to the torch path's
``_bilinear`` (same operations in the same order, no fused multiply-add) and both paths count the same
pixels; the tests hold them to exact equality.

Geometry arguments describe the *segments* of ``_iou._Axis``: consecutive pixel runs sharing a lower corner
cell (``start``, ``count``), the corner cells (``lower``, ``upper``) and per-pixel weights.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

__all__ = ["prepare_labels", "count_quads"]


def _compiled(function=None, **options):
    """``njit`` with an on-disk cache when Numba finds a writable place for one, else without."""
    if function is None:
        return lambda f: _compiled(f, **options)
    try:
        return njit(cache=True, nogil=True, **options)(function)
    except RuntimeError:  # "no locator available": a read-only install and no writable user cache directory
        return njit(nogil=True, **options)(function)


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
            # Unsigned indexes: Numba adds no negative-index wrap-around, so the row compares vectorise.
            plane = columns[i, out]
            for sy in range(len(y_start)):
                y0 = np.uint64(y_start[sy])
                for sx in range(len(x_start)):
                    x0 = np.uint64(x_start[sx])
                    label = plane[y0, x0]
                    differ = 0
                    for y in range(y0, y0 + np.uint64(y_count[sy])):
                        for x in range(x0, x0 + np.uint64(x_count[sx])):
                            differ += plane[y, x] != label
                        if differ:
                            break
                    uniform[i, out, sy, sx] = -1 if differ else label
    return unknown


@njit(nogil=True, inline="always")
def _column(value, lookup):  # pragma: no cover - compiled
    """The column of a label number, −1 when it is not a concept's."""
    if value >= 0 and value < len(lookup):
        return lookup[value]
    return -1


@njit(nogil=True, inline="always")
def _scan(flat, base, size, bound):  # pragma: no cover - compiled
    """``(cells > bound, Σ value·0)`` of ``flat[base : base + size]``: the sum is NaN iff a value is NaN/inf.

    Inlined into ``count_quads``, whose only fast-math flag, ``reassoc``, lets LLVM split these float32 sums
    into vector lanes (and nothing else: without ``nnan``/``ninf`` a product ``value·0`` is not folded to 0;
    the count of ones is exact below 2²⁴ cells and never 0 once a cell counts). The bilinear arithmetic lives
    in ``_count_map``, compiled without fast-math, so every pixel value keeps its exact IEEE bits.
    """
    above = np.float32(0)
    bad = np.float32(0)
    cells = flat[base : base + size]  # indexes from 0 up: no negative-index wrap-around, so no gathers
    for k in range(size):
        value = cells[k]
        above += np.float32(1) if value > bound else np.float32(0)
        bad += value * np.float32(0)
    return above, bad


@njit(nogil=True, inline="always")
def _mark(flat, base, size, bound, hot):  # pragma: no cover - compiled
    """``hot[k] = flat[base + k] > bound`` (a vectorised loop over a map in the L1 cache)."""
    cells = flat[base : base + size]
    for k in range(size):
        hot[k] = cells[k] > bound


@_compiled(fastmath={"reassoc"})
def count_quads(
    acts, thresholds, bounds, full_bounds,
    y_lower, y_upper, y_start, y_count, wy_lo, wy_hi,
    x_lower, x_upper, x_start, x_count, wx_lo, wx_hi,
    columns, uniform, on_count, intersection,
):  # pragma: no cover - compiled
    """Add each unit's on-pixels per image to ``on_count`` and per (unit, label column) to ``intersection``.

    Returns the number of NaN/inf values in the first map holding one, where counting stops; when it is not 0
    both outputs are as they were on entry.

    A pixel is on when its bilinear value (float32: rows first, then columns, as ``_iou._bilinear``) is
    ``> thresholds[u]``. ``bounds[u]`` is the pruning bound of ``_iou._prune_thresholds``: a convex
    combination of values ≤ it cannot exceed the threshold, so maps, quads and quad rows whose corners are all
    ≤ the bound are skipped without changing any count. Symmetrically, ``full_bounds[u]``
    (``_iou._full_thresholds``, +inf unless the threshold is ≥ 0) is a value from which every float32 convex
    combination of two values ≥ it exceeds the threshold: such quad rows are all on without evaluation.

    Each map is read once from memory, by a vectorised scan that marks its cells above the bound in a byte
    mask (and finds NaN/inf); a hot map's marked cells are then found eight at a time (64-bit words of the
    mask) and its quads evaluated while the map is in the L1 cache. A map with a NaN/inf ends the call: the
    maps counted before it are counted again with the opposite sign (counts are deterministic), so a refused
    batch leaves no trace.

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
    flat = acts.reshape(n * c * h * w)
    num_sy, num_sx = len(y_start), len(x_start)
    max_rows = 0
    for sy in range(num_sy):
        max_rows = max(max_rows, y_count[sy])
    max_cols = 0
    for sx in range(num_sx):
        max_cols = max(max_cols, x_count[sx])
    on = np.zeros((max_rows, max_cols), np.bool_)  # on-pixels of the current quad; valid where row_on > 0
    row_on = np.zeros(max_rows, np.int64)
    # Byte mask of one map's hot cells, padded with zeros to whole groups of 8 words (64 cells).
    hot = np.zeros(-(-h * w // 64) * 64, np.uint8)
    # A hot cell makes every quad it is a corner of hot: visit those quads only, each once.
    y_touch, y_touch_start = _touching(y_lower, y_upper, h)
    x_touch, x_touch_start = _touching(x_lower, x_upper, w)
    marked = np.zeros((num_sy, num_sx), np.bool_)
    quads = np.empty((num_sy * num_sx, 2), np.uint64)
    cell_row = np.arange(h * w) // w
    geometry = (y_lower, y_upper, y_start, y_count, wy_lo, wy_hi, x_lower, x_upper, x_start, x_count, wx_lo, wx_hi,
                y_touch, y_touch_start, x_touch, x_touch_start)
    scratch = (on, row_on, hot, marked, quads, cell_row)
    for i in range(n):
        for u in range(c):
            above, bad = _scan(flat, (i * c + u) * h * w, h * w, bounds[u])
            if bad != 0:  # NaN or inf: take back what was counted, report how many such values this map has
                for j in range(i * c + u):
                    if _scan(flat, j * h * w, h * w, bounds[j % c])[0] > 0:
                        _mark(flat, j * h * w, h * w, bounds[j % c], hot)
                        _count_map(flat, j // c, j % c, c, h, w, thresholds, bounds, full_bounds, geometry, scratch,
                                   columns, uniform, on_count, intersection, -1)
                return _nonfinite(flat, (i * c + u) * h * w, h * w)
            if above > 0:
                _mark(flat, (i * c + u) * h * w, h * w, bounds[u], hot)
                _count_map(flat, i, u, c, h, w, thresholds, bounds, full_bounds, geometry, scratch,
                           columns, uniform, on_count, intersection, 1)
    return 0


@njit(nogil=True)
def _nonfinite(flat, base, size):  # pragma: no cover - compiled
    count = 0
    for k in range(size):
        count += not np.isfinite(flat[base + k])
    return count


@njit(nogil=True)
def _count_map(
    flat, i, u, c, h, w, thresholds, bounds, full_bounds, geometry, scratch,
    columns, uniform, on_count, intersection, sign,
):  # pragma: no cover - compiled
    """Count map (i, u), whose cells above the bound are marked in ``hot``, times ``sign`` (±1)."""
    (y_lower, y_upper, y_start, y_count, wy_lo, wy_hi, x_lower, x_upper, x_start, x_count, wx_lo, wx_hi,
     y_touch, y_touch_start, x_touch, x_touch_start) = geometry
    on, row_on, hot, marked, quads, cell_row = scratch
    words = hot.view(np.uint64)  # one byte (0 or 1) per cell: bit 8·j of a word is cell 8·(word) + j
    num_quads = 0
    for group in range(len(words) // 8):
        any_hot = np.uint64(0)
        for k in range(8 * group, 8 * group + 8):
            any_hot |= words[k]
        if any_hot == 0:
            continue
        for k in range(8 * group, 8 * group + 8):
            bits = words[k]
            while bits != 0:
                cell = 8 * k + (trailing_zeros(bits) >> 3)
                bits &= bits - np.uint64(1)
                y = cell_row[cell]
                x = cell - y * w
                for a in range(y_touch_start[y], y_touch_start[y + 1]):
                    sy = y_touch[a]
                    for b in range(x_touch_start[x], x_touch_start[x + 1]):
                        sx = x_touch[b]
                        if not marked[sy, sx]:
                            marked[sy, sx] = True
                            quads[num_quads, 0] = sy
                            quads[num_quads, 1] = sx
                            num_quads += 1
    base = (i * c + u) * h * w
    total = 0
    for q in range(num_quads):
        sy = quads[q, 0]
        sx = quads[q, 1]
        marked[sy, sx] = False
        total += _count_quad(flat, base, i, u, w, sy, sx, thresholds[u], bounds[u], full_bounds[u], geometry,
                             on, row_on, columns, uniform, intersection, sign)
    on_count[i, u] += sign * total


@njit(nogil=True, inline="always")
def _count_quad(
    flat, base, i, u, w, sy, sx, threshold, bound, full, geometry, on, row_on, columns, uniform, intersection, sign,
):  # pragma: no cover - compiled
    """On-pixels of quad (sy, sx) of map ``base``; adds them per label to ``intersection[u]`` (times ``sign``)."""
    (y_lower, y_upper, y_start, y_count, wy_lo, wy_hi, x_lower, x_upper, x_start, x_count, wx_lo, wx_hi,
     y_touch, y_touch_start, x_touch, x_touch_start) = geometry
    layers = columns.shape[1]
    unlabelled = intersection.shape[1]
    r0 = base + y_lower[sy] * w
    r1 = base + y_upper[sy] * w
    rows = y_count[sy]
    c0 = x_lower[sx]
    c1 = x_upper[sx]
    lo_lo = flat[r0 + c0]
    hi_lo = flat[r1 + c0]
    lo_hi = flat[r0 + c1]
    hi_hi = flat[r1 + c1]
    cols = x_count[sx]
    x0 = x_start[sx]
    # Slices, indexed from 0: no negative-index wrap-around in the loops, so they vectorise without gathers.
    weight_lo = wx_lo[x0 : x0 + cols]
    weight_hi = wx_hi[x0 : x0 + cols]
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
                value = left * weight_lo[col] + right * weight_hi[col]
                flag = value > threshold
                on[row, col] = flag
                count += flag
            row_on[row] = count
        quad += row_on[row]
    if quad == 0:
        return 0
    for layer in range(layers):
        label = uniform[i, layer, sy, sx]
        if label >= 0:
            if label < unlabelled:
                intersection[u, label] += sign * quad
            continue
        # Mixed quad: on-pixels by label, counted in runs of one label.
        run_label = unlabelled
        run_length = 0
        for row in range(rows):
            if row_on[row] == 0:
                continue
            labels = columns[i, layer, y_start[sy] + row, x0 : x0 + cols]
            for col in range(cols):
                if on[row, col]:
                    label = labels[col]
                    if label != run_label:
                        if run_label < unlabelled:
                            intersection[u, run_label] += sign * run_length
                        run_label = label
                        run_length = 0
                    run_length += 1
        if run_label < unlabelled:
            intersection[u, run_label] += sign * run_length
    return quad


@_compiled
def _touching(lower, upper, cells):  # pragma: no cover - compiled
    """CSR lists of the segments each cell is a corner of: ``segments[start[a]:start[a + 1]]`` for cell ``a``."""
    counts = np.zeros(cells + 1, np.int64)
    for s in range(len(lower)):
        counts[lower[s] + 1] += 1
        if upper[s] != lower[s]:
            counts[upper[s] + 1] += 1
    start = np.cumsum(counts)
    segments = np.empty(start[-1], np.uint64)
    fill = start[:-1].copy()
    for s in range(len(lower)):
        segments[fill[lower[s]]] = s
        fill[lower[s]] += 1
        if upper[s] != lower[s]:
            segments[fill[upper[s]]] = s
            fill[upper[s]] += 1
    # Unsigned: indexes read from these lists get no negative-index wrap-around in the kernels' loops.
    return segments, start.astype(np.uint64)
