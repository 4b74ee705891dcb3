"""Compiled CPU kernels of the IoU tally: label preparation and the sparse on-pixel count, strip by strip.

The IoU tally's work is a loop over (image, unit, pixel) whose useful part is tiny and data dependent: most
maps never exceed their threshold, most pixels of a hot map are off, most label regions span many pixels.
Vectorised array code (the torch path in ``_iou``, used on the GPU) must materialise index lists and bool
masks for every evaluated pixel and pays several memory passes per pixel. These compiled loops read each map
once from memory and touch only what can be on:

* **Scan.** A vectorised pass per map (``_scan_map``, written in LLVM IR: 16-lane maximum and ``Σ v·0``):
  is any cell above the pruning bound, is any value NaN/inf? Most maps end here. The maps come from memory
  once, so each vector load is paired with a prefetch 4 KB ahead (``_SCAN_AHEAD``): the hardware prefetchers
  stop at page borders and after each hot map's work. (A separate loop issuing a map's prefetches before its
  loads, as before, left them queued behind each other: 56² took 4–5 ms longer per 64 images.)
* **Hot bits.** For a hot map (still in the L1 cache), a cell row's bits, 64 cells per masked vector compare
  (``_bits_above``: compares and ``movmskps``).
* **Unit rows.** A hot map's labels are credited to its unit's row of the intersection table, last touched
  an image earlier (far caches): the entries of the labels its image holds are prefetched first.
* **Strips.** The pixel rows sharing a lower corner row ``r`` form a strip; it needs work only where cell
  rows ``r`` or ``r + 1`` hold a hot cell: ``hot(r) | hot(r + 1)``, widened by one column (``bits | bits >> 1``),
  is the set of lower corner columns whose 2×2 cells include a hot one, found run by run with trailing-zero
  counts. Where a corner column spans at most 4 pixels (56² maps → 112²), the set bits are walked quad by
  quad: a quad's four corners are read once, its ≤ 4 pixel rows evaluated into words of ≤ 4 bits (a 2×2
  quad, the common case, in straight-line code), and its on-count credited to each layer's label at once
  where the quad carries one label — without a branch: an off or unlabelled quad adds 0 to column 0, since
  whether a quad is on is a coin flip the branch predictor loses — else row by row (a row of one label, a
  row split once, or its on-pixels' own labels). Wider ones (7², 14², 28²) go run by run: each corner
  column of a run is interpolated at every pixel row of the strip in one vectorised loop, then a quad's
  (pixel row, corner column) groups are classified without branches — off when both ends are ≤ the bound,
  all on when both are safely above the threshold, else to evaluate — into a bit per row, and only the
  rows to evaluate are visited (per-pixel flags are stored only there, and only in quads that mix labels
  in some layer: a loop that stores nothing vectorises without aliasing checks, about 3× faster). Where a
  quad is at most 64 pixels wide (7², 14² → 112²) the flags of an evaluated row are one 64-bit word, a bit
  per pixel, built in the same vectorised loop (shift and or).
* **Labels** (wide quads). Per strip and label layer, precomputed tables of *quads* (the pixels of one strip with one
  lower corner column) say which quads carry a single label and how far that label continues to the right:
  a stretch of such quads adds its on-count (a difference of the strip's per-quad prefix sums) to that
  label in one step. A quad that mixes labels adds the on-count of each of its one-label rows in one step,
  a row split once between two labels (a boundary crossing the quad) in two sums (the second is the row's
  count less the first; its two labels from ``row_split``); only rows of three or more labels look at
  per-pixel labels, in runs of one label.
  Where quads are wide, only the rows holding on-pixels are visited (a bit per row from the evaluation); with
  a row's flags as a word, a split row's left count is a ``popcnt`` of the word masked below the split and
  a row of three or more labels visits only its on-pixels (trailing-zero counts), not all its pixels.
* **Label preparation** (once per batch): whole pixel rows first — a row equal to the row above repeats
  its codes, histogram additions and mixed quad rows' columns, a row of one number gets one code (one
  vectorised compare each; label maps are regions, so most rows repeat the row above; where quad rows are
  wide, a run of repeated rows adds its histogram once, at its end, the run's length times the row's) —
  then, for the other rows, per quad row a vectorised test whether all its pixels carry one number (where quad rows are long;
  along label runs where they are short) gives the per-image label histograms, the one-label and split
  codes per quad row, a split row's two label columns, and per-pixel label columns only for the quad rows of
  three labels or more (at 7² → 112² 13.5 % of quad rows are split once, 2.4 % hold more labels: a column per
  pixel of every mixed row, copied again into each repeated row, was most of the preparation's writes). The
  label rows are prefetched 8 rows ahead (``_AHEAD``): they are read once, from memory.

It is one compiled function per batch with its helpers inlined and no array slices in the loops: every call
of a compiled function and every slice updates reference counts atomically, per array, which cost more than
the work of a small hot map.

What bounds it (64 images × 512 units → 112² labels, 3 label layers, one core, caches flushed before each
call as after other work in a run, measured by cutting the kernel after each step). At 56² (16,500 hot maps,
1.17 million quads with a hot corner, 616,000 of them with on-pixels): label preparation and Python 5 ms, the
scan ~24 ms (all 411 MB of maps read once: a numpy sum of the same array, cold, takes 24 ms), hot bits ~4 ms,
the quads' evaluation ~8 ms and their labels ~12 ms — ~55 ms in all, from ~80 ms with the strips of the
previous design (runs, a row of interpolated corners, per-column counts and prefix sums: ~50 ns per strip
step whatever its loop shape). The labels of a quad cost more than its evaluation: three table reads and
three additions per quad, whose addresses come from the far caches. At 7² (3,589 hot maps) ~6.5 ms: label
preparation and Python 2.5 (9.6 MB of int32 labels read once), scan 0.5, hot bits 0.1, strips and labels
3.7 ms (interpolation and evaluation, one-label stretches, and the quads that mix labels: 137,000 quad rows
with on-pixels, ~14 ns each). The loops are vectorised where it matters only because indexes cannot be
negative: an index ``base + k`` into a flat array made Numba's negative-index wrap-around a per-element
select, which LLVM turned into gathers and scatters (in the old scan, the interpolation of a run's corner
columns, the per-quad sums; unsigned indexes took 56² from 99–101 to 93–94 ms at the time). Strided accesses
do the same: the per-(row, column) counts of wide quads are laid out column-major (stored row-major, the
branch-free classification became a scatter) and the test for a quad that mixes labels in some layer exits
early (a plain loop over layers became a gather). The compiled function holds no gather or scatter
instruction (a slow test checks).

Measured and not kept (same process, the kernel before alternated): whole-map label shortcuts (a layer
whose quads in the box around a map's hot cells all carry one label, credited once per map: at 56² that
box spans ~35 × 35 quads and is rarely one label, slower at every size); a strip credited whole when all
its quads carry one label (no gain); evaluating wide groups without the off / all-on shortcuts (7² slower,
14² equal); constant-width loops for 8- and 16-pixel groups (LLVM left them scalar: slower); pending sums
that credit a mixed quad's labels once per quad instead of once per row (no gain: the per-row work is the
loads and branches, not the additions); per-row histogram entries for wide label rows (slower: the extra
stores to the column table cost more than they save); an or-of-xor instead of a count
of differences in the label rows' compares (no change); queuing the intersection credits and adding them in
a tight loop, so that their cache misses overlap (7² with cold caches 6.6 → 7.9 ms). A sampling profile at 7² (perf, the benchmark's
loop) puts about a fifth of the process time outside the compiled code (Python, numpy, libc: the tally's
set-up, the histograms' bookkeeping, zeroing the 4.9 MB intersection table), and the kernels' hottest
instructions on loads that miss: the label rows in the preparation's row compare (memory bound) and the
additions to the intersection table (each hot map's first credit of a label, ~6 % of the samples; now
prefetched). At 56², measured with the quad-by-quad path: a branch per quad skipping the labels of off
quads (2 ms slower than adding 0), crediting only a compacted list of on-quads (no gain), flat unsigned
indexes into the label and intersection tables (no gain), prefetching the next strip's label tables
(slower), prefetching the next map whole before counting a hot one (slower), scanning maps in chunks of
64 KB–512 KB before counting the hot ones among them (slower), a prefetch distance of 8 or 16 KB (slower).

The kernels are Numba ``njit`` functions, compiled on first use (10–30 s on a loaded machine) and cached on
disk in the package directory or Numba's user cache; where neither is writable they are compiled once per
process. Loading them from the cache still costs about a second, so a run loads them in a background thread
from its start (``_warmup.warm_kernels``). No function carries a fast-math flag: the bilinear arithmetic is
plain IEEE float32, so every value is bit-identical to the torch path's ``_bilinear`` (same operations in the same order, no fused multiply-add) and
both paths count the same pixels; the tests hold them to exact equality.

Geometry arguments describe ``_iou_geometry._Axis``: ``cells[a] : cells[a + 1]`` are the pixels whose lower
corner cell is ``a`` (``cell_start``), ``upper[a] = min(a + 1, n − 1)``, and per-pixel float32 weights.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

__all__ = ["prepare_labels", "count_maps", "add_image_counts"]

# Label rows ahead of the one read that prepare_labels prefetches.
_AHEAD = 8
_SCAN_AHEAD = 1024


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
    pixel, lookup, y_cells, x_cells, columns, per_image, uniform, extent, row_uniform, row_split, first_layer
):  # pragma: no cover - compiled
    """Label numbers → column indexes, per-image label histograms and the one-label quad runs, in one pass.

    Args:
        pixel: ``(N, layers, sh, sw)`` C-contiguous integer label numbers of one category (0 = unlabelled).
        lookup: ``(max_label + 1,)`` int32 column of each label number, −1 for numbers that are not concepts;
            label 0 maps to the last column of ``per_image``.
        y_cells, x_cells: ``(H + 1,)``, ``(W + 1,)`` pixels of each lower corner cell (``cell_start``).
        columns: ``(N, all layers, sh, sw)`` int32 output; this category fills layers ``first_layer…``, only
            in quad rows of three labels or more (``row_uniform`` −1): the count reads no other pixel's column.
        per_image: ``(N, width)`` int64 label histograms, added to.
        uniform: ``(N, all layers, H, W)`` int32 output: quad (strip, corner column)'s label column when all
            its pixels (in that layer) carry one label, else −1 (also for quads without pixels).
        extent: ``(N, all layers, H, W)`` int32 output: for a one-label quad, the end (exclusive) of the
            stretch of quads to its right in the same strip carrying the same single label.
        row_uniform: ``(N, all layers, sh, W)`` int32 output: per pixel row and lower corner column, the label
            column when that row of the quad carries one label; ``−2 − x`` when it carries two, the second from
            pixel ``x`` on (a label boundary crossing the quad: the count adds two sums, no per-pixel labels);
            else −1 (also for quad rows without pixels).
        row_split: ``(N, all layers, sh, W, 2)`` int32 output: for a quad row of two labels (``row_uniform``
            ≤ −2), its left and right label columns; not written elsewhere. Two numbers per split row instead
            of a column per pixel: most quad rows that mix labels are split once, and their pixels' columns
            were the bulk of the preparation's writes (a cold table, and copied again in every repeated row).

    Returns:
        a positive number when some label numbers are not concepts' (counted as unlabelled; the caller raises).
    """
    n, layers, sh, sw = pixel.shape
    unlabelled = per_image.shape[1] - 1
    num_y, num_x = len(y_cells) - 1, len(x_cells) - 1
    labels_flat = columns.reshape(columns.size)
    pixel_flat = pixel.reshape(pixel.size)  # C-contiguous (the caller makes sure)
    unknown = 0
    widest = 0
    for cx in range(num_x):
        widest = max(widest, x_cells[cx + 1] - x_cells[cx])
    wide = widest > 4  # per quad row (vectorised) where quad rows are long, per run of labels where short
    ahead = np.uint64(_AHEAD * sw)
    row_column = np.zeros(sw + 1, np.int64)
    quad_label = np.zeros(num_x, np.int64)  # per corner column: the label of the strip's rows so far
    row_count = np.zeros(sw + 1, np.int64)
    for i in range(n):
        for layer in range(layers):
            out = first_layer + layer
            # Per quad row (pixel row × lower corner column): a vectorised test whether all its pixels carry
            # the first one's number; then the row adds its length to that label in one step (a number is
            # looked up only where it changes). Only quad rows that mix numbers go pixel by pixel, and only
            # they write their pixels' columns. Flat unsigned indexes: no slices (reference counts), no
            # negative-index wrap-around.
            source = np.uint64((i * layers + layer) * sh * sw)
            target = np.uint64((i * columns.shape[1] + out) * sh * sw)
            run_value = pixel_flat[source]
            run_column, missing = _column_or(run_value, lookup, unlabelled)
            unknown += missing
            # ``row_column``/``row_count`` (``row_entries`` of them): the last row's additions to the label
            # histogram, in order, equal neighbours merged; a row equal to it adds the same.
            row_entries = 0
            repeats = 0  # wide: rows since the last tested one that repeat it (histogram added at the next)
            for y in range(sh):
                row_source = source + np.uint64(y * sw)
                row_target = target + np.uint64(y * sw)
                # The label maps are read once, from memory: ask for the row _AHEAD rows on now.
                for x in range(np.uint64(0), np.uint64(sw), np.uint64(16)):
                    _prefetch(pixel_flat, row_source + ahead + x)
                # Whole rows first (one vectorised compare each): a row equal to the previous one repeats its
                # codes, histogram entries and mixed quad rows' columns (label maps are regions: most rows
                # repeat the row above), a row of one number gets one code; only the other rows are tested
                # quad row by quad row.
                differ = 0
                if y > 0:
                    for x in range(np.uint64(sw)):
                        differ += pixel_flat[row_source + x] != pixel_flat[row_source - np.uint64(sw) + x]
                if y > 0 and differ == 0 and wide:  # per quad row: its code, or its pixels' columns when mixed
                    # The histogram of a run of repeated rows is added once, at its end (``_add_rows``).
                    repeats += 1
                    for cx in range(num_x):
                        code = row_uniform[i, out, y - 1, cx]
                        row_uniform[i, out, y, cx] = code
                        if code <= -2:  # two labels: their columns
                            row_split[i, out, y, cx, 0] = row_split[i, out, y - 1, cx, 0]
                            row_split[i, out, y, cx, 1] = row_split[i, out, y - 1, cx, 1]
                        elif code == -1:  # three or more: the pixels' columns (none when x1 == x0)
                            for x in range(np.uint64(x_cells[cx]), np.uint64(x_cells[cx + 1])):
                                labels_flat[row_target + x] = labels_flat[row_target - np.uint64(sw) + x]
                    continue
                if repeats:
                    _add_rows(per_image, i, row_uniform, row_split, labels_flat, out, y - 1,
                              row_target - np.uint64(sw), x_cells, num_x, repeats)
                    repeats = 0
                if y > 0 and differ == 0:  # narrow quad rows: the row's histogram entries, codes and columns
                    for e in range(row_entries):
                        per_image[i, row_column[e]] += row_count[e]
                    for cx in range(num_x):
                        row_uniform[i, out, y, cx] = row_uniform[i, out, y - 1, cx]
                        row_split[i, out, y, cx, 0] = row_split[i, out, y - 1, cx, 0]  # read only where split
                        row_split[i, out, y, cx, 1] = row_split[i, out, y - 1, cx, 1]
                    for cx in range(num_x):
                        if row_uniform[i, out, y, cx] == -1:  # three labels or more: the pixels' columns
                            for x in range(np.uint64(x_cells[cx]), np.uint64(x_cells[cx + 1])):
                                labels_flat[row_target + x] = labels_flat[row_target - np.uint64(sw) + x]
                    continue
                row_entries = 0
                first_value = pixel_flat[row_source]
                for x in range(np.uint64(sw)):
                    differ += pixel_flat[row_source + x] != first_value
                if differ == 0:
                    if first_value != run_value:
                        run_value = first_value
                        run_column, missing = _column_or(run_value, lookup, unlabelled)
                        unknown += missing
                    per_image[i, run_column] += sw
                    row_entries = _entry(row_column, row_count, row_entries, run_column, sw)
                    for cx in range(num_x):
                        row_uniform[i, out, y, cx] = run_column if x_cells[cx + 1] > x_cells[cx] else -1
                    continue
                if wide:
                    for cx in range(num_x):
                        x0, x1 = np.uint64(x_cells[cx]), np.uint64(x_cells[cx + 1])
                        if x1 == x0:
                            row_uniform[i, out, y, cx] = -1
                            continue
                        first_value = pixel_flat[row_source + x0]
                        differ = 0
                        for x in range(x0, x1):  # from x0: a whole number of vector lanes (16, 8, 4 pixels)
                            differ += pixel_flat[row_source + x] != first_value
                        if differ == 0:
                            if first_value != run_value:
                                run_value = first_value
                                run_column, missing = _column_or(run_value, lookup, unlabelled)
                                unknown += missing
                            per_image[i, run_column] += np.int64(x1 - x0)
                            row_uniform[i, out, y, cx] = run_column
                            continue
                        # Several numbers (they may still share a column: numbers that are no concept's).
                        changes = 0
                        split = x0
                        previous = -2
                        left = -1
                        for x in range(x0, x1):
                            value = pixel_flat[row_source + x]
                            if value != run_value:
                                run_value = value
                                run_column, missing = _column_or(value, lookup, unlabelled)
                                unknown += missing
                            per_image[i, run_column] += 1
                            if previous == -2:
                                left = run_column
                            elif run_column != previous:
                                changes += 1
                                if changes == 1:
                                    split = x
                            previous = run_column
                        row_uniform[i, out, y, cx] = _quad_row_code(changes, split, run_column)
                        _split_columns(row_split, labels_flat, i, out, y, cx, changes, left, run_column,
                                       pixel_flat, row_source, row_target, x0, x1, lookup, unlabelled)
                else:
                    # Narrow quad rows (upsampling ≤ 4×): labels come in runs along a row; a number is looked
                    # up once per run and the run's length added at its end (or the row's). ``last_change`` is
                    # the last pixel of the row whose column differs from its left neighbour's: a quad row is
                    # one-label when that is not inside it.
                    last_change = np.uint64(0)
                    run_length = 0
                    for cx in range(num_x):
                        x0, x1 = np.uint64(x_cells[cx]), np.uint64(x_cells[cx + 1])
                        for x in range(x0, x1):
                            value = pixel_flat[row_source + x]
                            if value != run_value:
                                if run_length:
                                    per_image[i, run_column] += run_length
                                    row_entries = _entry(row_column, row_count, row_entries, run_column, run_length)
                                run_length = 0
                                run_value = value
                                column, missing = _column_or(value, lookup, unlabelled)
                                unknown += missing
                                if column != run_column:
                                    last_change = x
                                run_column = column
                            run_length += 1
                        if last_change <= x0:
                            row_uniform[i, out, y, cx] = run_column if x1 > x0 else -1
                            continue
                        changes = 0
                        split = x0
                        previous = -2
                        left = -1
                        for x in range(x0, x1):
                            column = _column_or(pixel_flat[row_source + x], lookup, unlabelled)[0]
                            if previous == -2:
                                left = column
                            elif column != previous:
                                changes += 1
                                if changes == 1:
                                    split = x
                            previous = column
                        row_uniform[i, out, y, cx] = _quad_row_code(changes, split, previous)
                        _split_columns(row_split, labels_flat, i, out, y, cx, changes, left, previous,
                                       pixel_flat, row_source, row_target, x0, x1, lookup, unlabelled)
                    if run_length:
                        per_image[i, run_column] += run_length
                        row_entries = _entry(row_column, row_count, row_entries, run_column, run_length)
            if repeats:
                _add_rows(per_image, i, row_uniform, row_split, labels_flat, out, sh - 1,
                          target + np.uint64((sh - 1) * sw), x_cells, num_x, repeats)
            # A quad is one-label when all its rows carry the same one: row by row, all quads of the strip at
            # once (a vectorised loop over corner columns, not a dependent chain per quad).
            for cy in range(num_y):
                for cx in range(num_x):
                    quad_label[cx] = -2  # no row seen yet
                for y in range(y_cells[cy], y_cells[cy + 1]):
                    for cx in range(num_x):
                        label = max(np.int64(row_uniform[i, out, y, cx]), -1)  # codes of mixed rows → −1
                        seen = quad_label[cx]
                        quad_label[cx] = label if seen == -2 or seen == label else -1
                for cx in range(num_x):
                    uniform[i, out, cy, cx] = max(quad_label[cx], -1)
                # Right to left: how far each one-label quad's label continues.
                end = num_x
                for cx in range(num_x - 1, -1, -1):
                    label = uniform[i, out, cy, cx]
                    if label < 0 or (cx + 1 < num_x and uniform[i, out, cy, cx + 1] != label):
                        end = cx + 1
                    extent[i, out, cy, cx] = end
    return unknown


# LLVM IR pieces shared by the intrinsics below. llvmlite has two pointer models: opaque pointers (``ptr``,
# recent llvmlite; checked with 0.50) and typed ones (older llvmlite; checked with 0.42, Numba 0.59), under
# which an intrinsic is declared on the pointee type and pointers are bitcast to it.
_I32 = ir.IntType(32)


def _opaque(pointer) -> bool:
    return str(pointer.type) == "ptr"


def _emit_prefetch(builder, pointer) -> None:
    """A read prefetch of the cache line at ``pointer``, kept in all cache levels (a hint, never a fault)."""
    byte_pointer = ir.IntType(8).as_pointer()
    if _opaque(pointer):
        name = "llvm.prefetch.p0"
    else:
        pointer, name = builder.bitcast(pointer, byte_pointer), "llvm.prefetch.p0i8"
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, _I32, _I32, _I32]), name)
    builder.call(prefetch, [pointer, _I32(0), _I32(3), _I32(1)])  # read, keep in all cache levels, data


def _vector_at(builder, pointer, vector):
    """``pointer`` (to the first float32 of a vector) as the pointer type a load of ``vector`` takes."""
    return pointer if _opaque(pointer) else builder.bitcast(pointer, vector.as_pointer())


def _masked_load(builder, pointer, vector, mask, passthrough):
    """LLVM's ``masked.load`` of float32 lanes at ``pointer`` (a ``_vector_at`` pointer): lanes off in ``mask``
    are not read and take ``passthrough``'s value."""
    lanes = vector.count
    name = f"llvm.masked.load.v{lanes}f32.p0" if _opaque(pointer) else f"llvm.masked.load.v{lanes}f32.p0v{lanes}f32"
    mask_type = ir.VectorType(ir.IntType(1), lanes)
    load = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [pointer.type, _I32, mask_type, vector]), name)
    return builder.call(load, [pointer, _I32(4), mask, passthrough])


def _splat(builder, value, vector_type):
    """A vector of ``vector_type`` with ``value`` in every lane."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count))


def _first_lanes(builder, count, lanes):
    """The mask of lanes ``k < count`` (``count`` a uint64) of a ``lanes``-wide vector."""
    index = ir.VectorType(ir.IntType(64), lanes)
    return builder.icmp_unsigned("<", ir.Constant(index, list(range(lanes))), _splat(builder, count, index))


@intrinsic
def _prefetch(typingctx, array, index):
    """Prefetch the cache line of ``array.flat[index]`` (LLVM's ``prefetch``: a hint, never a fault)."""
    if not isinstance(array, types.Array) or index != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        _emit_prefetch(builder, builder.gep(data, [args[1]]))
        return context.get_dummy_value()

    return types.void(array, types.uint64), codegen


@intrinsic
def _popcount(typingctx, word):
    """The number of set bits of a uint64 (LLVM's ``ctpop``: one ``popcnt`` instruction)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _bits_above(typingctx, array, index, count, bound):
    """Bit k of the result: ``array.flat[index + k] > bound`` for k < ``count`` (≤ 64), else 0.

    One masked vector load of 64 float32 lanes (only the first ``count`` are read, so a row at the end of the
    array never reads past it), one ordered compare (NaN is never above) and the 64 lane flags as one word:
    LLVM lowers it to compares and ``movmskps``, a few instructions per 8 cells.
    """
    if not isinstance(array, types.Array) or array.dtype != types.float32 or index != types.uint64 or \
            count != types.uint64 or bound != types.float32:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        lanes = 64
        vector = ir.VectorType(ir.FloatType(), lanes)
        mask = _first_lanes(builder, args[2], lanes)
        values = _masked_load(builder, _vector_at(builder, builder.gep(data, [args[1]]), vector), vector, mask,
                              ir.Constant(vector, [0.0] * lanes))
        above = builder.and_(builder.fcmp_ordered(">", values, _splat(builder, args[3], vector)), mask)
        return builder.bitcast(above, ir.IntType(64))

    return types.uint64(array, types.uint64, types.uint64, types.float32), codegen


@intrinsic
def _scan_map(typingctx, array, start, size, bound):
    """Scan one map ``array.flat[start : start + size]``: NaN if any value is NaN or ±inf, else 1 if its
    largest value is ``> bound``, else 0.

    One pass of 16-lane vectors with two accumulators: a maximum in the compare-and-select form x86's
    ``maxps`` implements (a NaN lane keeps the running maximum) and ``Σ v · 0``, which is NaN exactly when
    some value is NaN or infinite. Each vector load is paired with a prefetch ``_SCAN_AHEAD`` values ahead.
    The tail is a masked load, so nothing past the map is read.
    """
    if not isinstance(array, types.Array) or array.dtype != types.float32 or start != types.uint64 or \
            size != types.uint64 or bound != types.float32:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        first, size, bound = args[1], args[2], args[3]
        lanes = 16
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vector = ir.VectorType(f32, lanes)
        lowest = ir.Constant(vector, [float("-inf")] * lanes)
        zero = ir.Constant(vector, [0.0] * lanes)
        most = cgutils.alloca_once_value(builder, lowest)
        bad = cgutils.alloca_once_value(builder, zero)

        def fold(values):
            seen = builder.load(most)
            builder.store(builder.select(builder.fcmp_ordered(">", values, seen), values, seen), most)
            builder.store(builder.fadd(builder.load(bad), builder.fmul(values, zero)), bad)

        whole = builder.udiv(size, i64(lanes))
        with cgutils.for_range(builder, whole) as loop:
            offset = builder.add(first, builder.mul(loop.index, i64(lanes)))
            _emit_prefetch(builder, builder.gep(data, [builder.add(offset, i64(_SCAN_AHEAD))]))
            fold(builder.load(_vector_at(builder, builder.gep(data, [offset]), vector), align=4))
        rest = builder.urem(size, i64(lanes))
        mask = _first_lanes(builder, rest, lanes)
        tail_at = _vector_at(builder, builder.gep(data, [builder.add(first, builder.mul(whole, i64(lanes)))]), vector)
        tail = _masked_load(builder, tail_at, vector, mask, zero)
        seen = builder.load(most)
        tail_max = builder.select(mask, tail, lowest)
        builder.store(builder.select(builder.fcmp_ordered(">", tail_max, seen), tail_max, seen), most)
        builder.store(builder.fadd(builder.load(bad), builder.fmul(tail, zero)), bad)
        top, check = builder.load(most), builder.load(bad)
        word = ir.IntType(lanes)
        above = builder.bitcast(builder.fcmp_ordered(">", top, _splat(builder, bound, vector)), word)
        broken = builder.bitcast(builder.fcmp_unordered("uno", check, check), word)
        hot = builder.select(builder.icmp_unsigned("!=", above, word(0)), f32(1.0), f32(0.0))
        return builder.select(builder.icmp_unsigned("!=", broken, word(0)), f32(float("nan")), hot)

    return types.float32(array, types.uint64, types.uint64, types.float32), codegen


@njit(nogil=True, inline="always")
def _add_rows(per_image, i, row_uniform, row_split, labels_flat, out, y, row_target, x_cells, num_x,
              repeats):  # pragma: no cover - compiled
    """Add ``repeats`` times pixel row ``y``'s labels (its quad rows' codes, a split row's two columns, or the
    pixels' columns where a quad row holds three labels or more) to image ``i``'s histogram."""
    for cx in range(num_x):
        x0, x1 = np.uint64(x_cells[cx]), np.uint64(x_cells[cx + 1])
        code = row_uniform[i, out, y, cx]
        if code >= 0:
            per_image[i, code] += np.int64(x1 - x0) * repeats
            continue
        if code <= -2:
            split = -2 - code
            per_image[i, row_split[i, out, y, cx, 0]] += (split - np.int64(x0)) * repeats
            per_image[i, row_split[i, out, y, cx, 1]] += (np.int64(x1) - split) * repeats
            continue
        for x in range(x0, x1):  # none when x1 == x0
            per_image[i, labels_flat[row_target + x]] += repeats


@njit(nogil=True, inline="always")
def _split_columns(row_split, labels_flat, i, out, y, cx, changes, left, right, pixel_flat, row_source, row_target,
                   x0, x1, lookup, unlabelled):  # pragma: no cover - compiled
    """Store what the count reads of a quad row that mixes labels: the two columns of a row split once, the
    pixels' columns of a row of three labels or more."""
    if changes == 1:
        row_split[i, out, y, cx, 0] = left
        row_split[i, out, y, cx, 1] = right
    elif changes > 1:
        for x in range(x0, x1):
            labels_flat[row_target + x] = _column_or(pixel_flat[row_source + x], lookup, unlabelled)[0]


@njit(nogil=True, inline="always")
def _entry(columns, counts, entries, column, count):  # pragma: no cover - compiled
    """Append ``count`` pixels of ``column`` to a row's histogram entries (merged with an equal last one)."""
    if entries > 0 and columns[entries - 1] == column:
        counts[entries - 1] += count
        return entries
    columns[entries] = column
    counts[entries] = count
    return entries + 1


@njit(nogil=True, inline="always")
def _quad_row_code(changes, split, column):  # pragma: no cover - compiled
    """``row_uniform``'s code of a quad row whose columns change ``changes`` times (first at pixel ``split``;
    ``column`` is its last pixel's): the column when none, ``−2 − split`` when once, else −1."""
    if changes == 0:
        return column
    if changes == 1:
        return -2 - np.int64(split)
    return -1


@njit(nogil=True, inline="always")
def _column(value, lookup):  # pragma: no cover - compiled
    """The column of a label number, −1 when it is not a concept's."""
    if value >= 0 and value < len(lookup):
        return lookup[value]
    return -1


@njit(nogil=True, inline="always")
def _column_or(value, lookup, unlabelled):  # pragma: no cover - compiled
    """``(column, 0)`` of a label number, ``(unlabelled, 1)`` when it is no concept's (counted, then reported)."""
    column = _column(value, lookup)
    if column < 0:
        return unlabelled, 1
    return column, 0


@_compiled
def _next_hot(flat, bounds, start, stop, size):  # pragma: no cover - compiled
    """The first map ``j`` in ``start:stop`` (maps of ``size`` cells, unit ``j % len(bounds)``) that is hot or
    holds a NaN/inf, and ``_scan_map``'s verdict on it (1: hot, NaN: not finite); ``(stop, 0)`` when there is
    none. Indexes are unsigned and there are no slices, so no negative-index wrap-around (which LLVM turned
    into gathers) and no reference counting per map.
    """
    c = len(bounds)
    zero = np.float32(0)
    for j in range(start, stop):
        first = np.uint64(j * size)
        total = _scan_map(flat, first, np.uint64(size), bounds[j % c])
        if total != zero:
            return j, total
    return stop, zero


@njit(nogil=True)
def _nonfinite(flat, base, size):  # pragma: no cover - compiled
    count = 0
    for k in range(np.uint64(base), np.uint64(base + size)):
        count += not np.isfinite(flat[k])
    return count


@_compiled
def count_maps(
    acts, thresholds, bounds, full_bounds,
    y_cells, y_upper, wy_lo, wy_hi, x_cells, x_upper, wx_lo, wx_hi,
    columns, uniform, extent, row_uniform, row_split, scalar, label_category, on_count, intersection, hits,
    per_image,
):  # pragma: no cover - compiled
    """Add each unit's on-pixels per image to ``on_count`` and per (unit, label column) to ``intersection``.

    Returns the number of NaN/inf values in the first map holding one, where counting stops; when it is not 0
    both outputs are as they were on entry.

    A pixel is on when its bilinear value (float32: rows first, then columns, as ``_iou._bilinear``) is
    ``> thresholds[u]``. ``bounds[u]`` is the pruning bound of ``_iou_geometry._prune_thresholds``: a convex
    combination of values ≤ it cannot exceed the threshold, so maps, strips and pixel groups whose corners
    are all ≤ the bound are skipped without changing any count. Symmetrically, ``full_bounds[u]``
    (``_full_thresholds``, +inf unless the threshold is ≥ 0) is a value from which every float32 convex
    combination of two values ≥ it exceeds the threshold: such groups are all on without evaluation. Where
    a corner column has at most 4 pixels (upsampling ≤ 4×), each quad is evaluated whole instead, its rows
    as words of ≤ 4 bits (the shortcuts cost more in mispredicted branches than they save), and its labels
    credited at once. The label loop reads the flags the evaluation stored (or a group's count: 0 or all of
    it), never evaluates a pixel again: a second evaluation of the same expression in another loop gave
    different flags for values within an ulp of T in one test (not investigated further), so nothing relies
    on one.

    A map with a NaN/inf ends the call: the maps counted before it are counted again with the opposite sign
    (counts are deterministic), so a refused batch leaves no trace.

    One function (helpers inlined, no array slices): every call of a compiled function and every slice
    costs atomic reference-count updates per array, which cost more than the work of a small hot map.

    Args:
        acts: ``(N, C, H, W)`` float32, C-contiguous.
        thresholds, bounds, full_bounds: ``(C,)`` float32.
        y_cells: ``(H + 1,)`` int64 pixel rows of each lower corner row (``y_cells[r] : y_cells[r + 1]``);
            y_upper: ``(H,)`` int64 upper corner row of each lower corner row; wy_lo, wy_hi: ``(sh,)``
            float32 weights of the lower / upper corner row per pixel row.
        x_cells, x_upper, wx_lo, wx_hi: the same along columns.
        columns: ``(N, layers, sh, sw)`` int32 label columns (``width − 1`` = unlabelled, not counted).
        uniform, extent: ``(N, layers, H, W)`` int32 one-label quads and their stretches (``prepare_labels``).
        row_uniform: ``(N, layers, sh, W)`` int32 one-label quad rows (``prepare_labels``).
        row_split: ``(N, layers, sh, W, 2)`` int32 the two label columns of quad rows split once
            (``prepare_labels``).
        scalar: ``(N, k)`` int64 whole-image label columns of each image (``≥ width − 1``: none); each adds
            its image's on-count of a unit to ``intersection`` (the unit's row is in the cache then).
        label_category: ``(width − 1,)`` int64 category of each label column.
        on_count: ``(N, C)`` int64, added to.
        intersection: ``(C, width − 1)`` int64, added to.
        hits: ``(N, C, categories)`` uint8, set to 1 where a unit's on-pixels in an image meet a pixel label
            of a category; pass a ``(0, 0, 0)`` array to skip (only the ``lite`` union needs it).
        per_image: ``(N, width)`` int64 label histograms of the batch (``prepare_labels``): which label
            columns each image holds, whose entries in a hot map's unit row are prefetched.
    """
    n, c, h, w = acts.shape
    layers, sh, sw = columns.shape[1], columns.shape[2], columns.shape[3]
    size = h * w
    flat = acts.reshape(n * c * size)
    labels_flat = columns.reshape(columns.size)
    unlabelled = intersection.shape[1]
    track = hits.shape[0] > 0
    num_words = -(-w // 64)
    bits = np.zeros((h, num_words + 1), np.uint64)  # one zero word past each row: the widening reads it
    need = np.zeros(num_words + 1, np.uint64)
    runs = np.zeros((w + 1, 2), np.int64)
    strip_rows = 1
    for r in range(h):
        strip_rows = max(strip_rows, y_cells[r + 1] - y_cells[r])
    widest = 1
    for a in range(w):
        widest = max(widest, x_cells[a + 1] - x_cells[a])
    narrow = widest <= 4
    on = np.zeros(strip_rows * sw, np.uint8)  # wide: on-flags of the strip's pixel rows
    group_on = np.ones((w, strip_rows), np.int64)  # wide: on-count per (lower corner column, strip row)
    quad_on = np.zeros(w, np.int64)  # wide: on-count per quad (corner column) of the strip
    cum = np.zeros(w + 1, np.int64)  # wide: on-count of the strip's quads left of each corner column
    column_rows = np.zeros(w * strip_rows, np.float32)  # wide: each corner column at each strip row
    on_rows = np.zeros(w, np.uint64)  # wide: per corner column, a bit per strip row holding on-pixels
    # Wide quads of ≤ 64 pixel columns keep an evaluated row's on-pixels as bits (a quad row's word) instead of
    # a byte per pixel: a split row's left count is one popcount, a mixed row visits only its on-pixels.
    masks = widest <= 64
    row_bits = np.zeros((w, strip_rows), np.uint64)
    quad_rows = np.zeros(strip_rows, np.uint64)  # narrow: a quad's on-pixels, a word per pixel row
    intersection_flat = intersection.reshape(intersection.size)
    # Per image, the intersection columns its maps may credit (its pixel labels, its whole-image labels and
    # column 0, where the narrow path adds a zero for unlabelled quads), prefetched into the unit's row when
    # one of its maps is hot: the row was last touched an image earlier, so it comes from far caches.
    present_at = np.zeros(n + 1, np.int64)
    for image in range(n):
        found = 1
        for label in range(1, unlabelled):
            found += per_image[image, label] > 0
        present_at[image + 1] = present_at[image] + found + scalar.shape[1]
    present_labels = np.zeros(present_at[n], np.int64)
    for image in range(n):
        at = np.uint64(present_at[image] + 1)  # unsigned: no wrap-around select (a scatter when vectorised)
        for label in range(1, unlabelled):
            if per_image[image, label] > 0:
                present_labels[at] = label
                at += np.uint64(1)
        for s in range(np.uint64(scalar.shape[1])):  # "none" (≥ unlabelled) is clamped to a harmless column
            present_labels[at + s] = min(scalar[image, s], unlabelled - 1)
    one = np.uint64(1)
    sign = 1
    stop = n * c
    bad = 0
    j = 0
    while True:
        j, total = _next_hot(flat, bounds, j, stop, size)
        if j >= stop:
            return bad
        if sign == 1 and not np.isfinite(total):
            bad = _nonfinite(flat, j * size, size)
            if bad:  # take back what was counted: count the maps before this one again, negatively
                sign, stop, j = -1, j, 0
                continue
        i = j // c
        u = j - i * c
        base = j * size
        threshold, bound, full = thresholds[u], bounds[u], full_bounds[u]
        # Hot cells → bits per row, 64 cells per masked vector compare.
        for r in range(h):
            for k in range(num_words):
                at = np.uint64(base + r * w + 64 * k)
                bits[r, k] = _bits_above(flat, at, np.uint64(min(64, w - 64 * k)), bound)
        image_labels = i * layers * sh * sw
        for k in range(present_at[i], present_at[i + 1]):
            _prefetch(intersection_flat, np.uint64(u * unlabelled + present_labels[k]))
        total_on = 0
        for r in range(h):
            p0 = y_cells[r]
            p1 = y_cells[r + 1]
            if p0 == p1:
                continue
            r2 = y_upper[r]
            any_hot = np.uint64(0)
            for k in range(num_words):
                need[k] = bits[r, k] | bits[r2, k]
                any_hot |= need[k]
            if any_hot == 0:
                continue
            # Lower corner columns a whose quad has a hot corner: a or a + 1 hot (the last is its own upper).
            for k in range(num_words):
                need[k] = need[k] | (need[k] >> one) | (need[k + 1] << np.uint64(63))
            lo_row = np.uint64(base + r * w)
            hi_row = np.uint64(base + r2 * w)
            if narrow:
                # Quad by quad, straight from the need bits: a row's ≤ 4 pixels evaluated into a word (bit
                # x − x0), the quad's on-count credited to a layer's label at once where the quad carries one
                # label, else row by row (a row of one label, a row split once, or its on-pixels' own labels).
                two_rows = p1 - p0 == 2
                wyl0 = wy_lo[p0]
                wyh0 = wy_hi[p0]
                wyl1 = wy_lo[p0 + 1] if two_rows else wyl0
                wyh1 = wy_hi[p0 + 1] if two_rows else wyh0
                for k in range(num_words):
                    word = need[k]
                    while word != 0:
                        a = np.uint64(64 * k) + np.uint64(trailing_zeros(word))
                        word &= word - one
                        x0 = np.uint64(x_cells[a])
                        x1 = np.uint64(x_cells[a + one])
                        if x0 == x1:
                            continue
                        a2 = np.uint64(x_upper[a])
                        square = two_rows and x1 - x0 == np.uint64(2)
                        lo_lo = flat[lo_row + a]
                        hi_lo = flat[hi_row + a]
                        lo_hi = flat[lo_row + a2]
                        hi_hi = flat[hi_row + a2]
                        count = 0
                        if square:
                            wxl0 = wx_lo[x0]
                            wxh0 = wx_hi[x0]
                            wxl1 = wx_lo[x0 + one]
                            wxh1 = wx_hi[x0 + one]
                            left = lo_lo * wyl0 + hi_lo * wyh0
                            right = lo_hi * wyl0 + hi_hi * wyh0
                            row_word = (np.uint64(left * wxl0 + right * wxh0 > threshold)
                                        | (np.uint64(left * wxl1 + right * wxh1 > threshold) << one))
                            quad_rows[0] = row_word
                            left = lo_lo * wyl1 + hi_lo * wyh1
                            right = lo_hi * wyl1 + hi_hi * wyh1
                            row_word2 = (np.uint64(left * wxl0 + right * wxh0 > threshold)
                                         | (np.uint64(left * wxl1 + right * wxh1 > threshold) << one))
                            quad_rows[1] = row_word2
                            count = np.int64(_popcount(row_word | (row_word2 << np.uint64(2))))
                        else:
                            for t in range(np.uint64(p1 - p0)):
                                py = np.uint64(p0) + t
                                left = lo_lo * wy_lo[py] + hi_lo * wy_hi[py]
                                right = lo_hi * wy_lo[py] + hi_hi * wy_hi[py]
                                row_word = np.uint64(0)
                                for x in range(x0, x1):
                                    row_word |= (np.uint64(left * wx_lo[x] + right * wx_hi[x] > threshold)
                                                 << (x - x0))
                                quad_rows[t] = row_word
                                count += np.int64(_popcount(row_word))
                        total_on += count
                        for layer in range(layers):
                            label = uniform[i, layer, r, a]
                            if label >= 0:
                                # branch-free: an off quad or an unlabelled one adds 0 (to column 0)
                                counted = label < unlabelled
                                column = label if counted else 0
                                intersection[u, column] += sign * count if counted else 0
                                if track:
                                    hits[i, u, label_category[column]] |= counted and count > 0
                                continue
                            if count == 0:
                                continue
                            for t in range(np.uint64(p1 - p0)):
                                row_word = quad_rows[t]
                                if row_word == 0:
                                    continue
                                py = np.uint64(p0) + t
                                label = row_uniform[i, layer, py, a]
                                if label >= 0:  # this row of the quad carries one label
                                    if label < unlabelled:
                                        intersection[u, label] += sign * np.int64(_popcount(row_word))
                                        if track:
                                            hits[i, u, label_category[label]] = 1
                                elif label <= -2:  # two labels, split at pixel −2 − label: two counts
                                    split = np.uint64(-2 - label) - x0
                                    left_count = np.int64(_popcount(row_word & ((one << split) - one)))
                                    right_count = np.int64(_popcount(row_word)) - left_count
                                    label = row_split[i, layer, py, a, 0]
                                    if label < unlabelled and left_count > 0:
                                        intersection[u, label] += sign * left_count
                                        if track:
                                            hits[i, u, label_category[label]] = 1
                                    label = row_split[i, layer, py, a, 1]
                                    if label < unlabelled and right_count > 0:
                                        intersection[u, label] += sign * right_count
                                        if track:
                                            hits[i, u, label_category[label]] = 1
                                else:  # three labels or more: each on-pixel's own
                                    pixels = np.uint64(image_labels + (layer * sh + py) * sw) + x0
                                    while row_word != 0:
                                        label = labels_flat[pixels + np.uint64(trailing_zeros(row_word))]
                                        row_word &= row_word - one
                                        if label < unlabelled:
                                            intersection[u, label] += sign
                                            if track:
                                                hits[i, u, label_category[label]] = 1
                continue
            num_runs = 0
            for k in range(num_words):
                word = need[k]
                while word != 0:
                    first = np.int64(trailing_zeros(word))
                    rest = ~(word >> np.uint64(first))
                    length = np.int64(64) - first if rest == 0 else np.int64(trailing_zeros(rest))
                    start = 64 * k + first
                    if num_runs > 0 and runs[num_runs - 1, 1] == start:  # continues the previous word's run
                        runs[num_runs - 1, 1] = start + length
                    else:
                        runs[num_runs, 0] = start
                        runs[num_runs, 1] = start + length
                        num_runs += 1
                    done = first + length
                    word = np.uint64(0) if done >= 64 else word & ~((one << np.uint64(done)) - one)
            # Wide quads, quad by quad: each corner column of a run interpolated at every pixel row of the
            # strip (the same float32 operations as the narrow path's), then per quad its rows
            # classified without branches (off: both ends ≤ the bound; all on: both ≥ ``full``; else
            # evaluated), and only the rows to evaluate visited, pixel by pixel. A count per (pixel row,
            # corner column); per-pixel flags are stored only where a row is evaluated (the labels of a
            # mixed quad row read them; see the docstring: never evaluated twice).
            rows = np.uint64(p1 - p0)
            first_py = np.uint64(p0)
            for q in range(num_runs):
                first = runs[q, 0]
                end = runs[q, 1]
                for a in range(np.uint64(first), np.uint64(min(end, w - 1) + 1)):
                    value_lo = flat[lo_row + a]
                    value_hi = flat[hi_row + a]
                    at = a * np.uint64(strip_rows)
                    for t in range(rows):
                        column_rows[at + t] = value_lo * wy_lo[first_py + t] + value_hi * wy_hi[first_py + t]
                for a in range(first, end):
                    left_at = np.uint64(a * strip_rows)
                    right_at = np.uint64(x_upper[a] * strip_rows)
                    x0 = np.uint64(x_cells[a])
                    x1 = np.uint64(x_cells[a + 1])
                    width = np.int64(x1 - x0)
                    # Flags are read only in quads that mix labels in some layer; elsewhere a row's count
                    # is all (a loop that stores nothing vectorises without aliasing checks: 3× faster).
                    keep_flags = False
                    for layer in range(layers):  # an early exit: no vectorised gather over layers
                        if uniform[i, layer, r, a] < 0:
                            keep_flags = True
                            break
                    quad_count = 0
                    nonzero = np.uint64(0)  # rows with on-pixels (strips of ≤ 64 rows: the labels use it)
                    for chunk in range(np.uint64(0), rows, np.uint64(64)):
                        evaluate = np.uint64(0)
                        for t in range(chunk, min(chunk + np.uint64(64), rows)):
                            left = column_rows[left_at + t]
                            right = column_rows[right_at + t]
                            all_on = (left >= full) & (right >= full)
                            group_on[a, t] = width if all_on else 0
                            quad_count += width if all_on else 0
                            some = (left > bound) | (right > bound)
                            evaluate |= np.uint64(some & ~all_on) << (t - chunk)
                            nonzero |= np.uint64(all_on) << (t - chunk)
                        while evaluate != 0:
                            t = chunk + np.uint64(trailing_zeros(evaluate))
                            evaluate &= evaluate - one
                            left = column_rows[left_at + t]
                            right = column_rows[right_at + t]
                            count = 0
                            if keep_flags and masks:
                                word = np.uint64(0)
                                for x in range(x0, x1):
                                    flag = left * wx_lo[x] + right * wx_hi[x] > threshold
                                    word |= np.uint64(flag) << (x - x0)
                                row_bits[a, t] = word
                                count = np.int64(_popcount(word))
                            elif keep_flags:
                                flags = t * np.uint64(sw)
                                for x in range(x0, x1):
                                    flag = left * wx_lo[x] + right * wx_hi[x] > threshold
                                    on[flags + x] = flag
                                    count += flag
                            else:
                                some_on = np.int32(0)
                                for x in range(x0, x1):
                                    some_on += np.int32(left * wx_lo[x] + right * wx_hi[x] > threshold)
                                count = np.int64(some_on)
                            group_on[a, t] = count
                            quad_count += count
                            nonzero |= np.uint64(count > 0) << (t - chunk)
                    quad_on[a] = quad_count
                    on_rows[a] = nonzero
            # On-count of the strip's quads left of each corner column (over the runs; other quads are off):
            # any stretch of quads in a run has its on-count in one subtraction, whatever the layer.
            so_far = 0
            for q in range(num_runs):
                for a in range(runs[q, 0], runs[q, 1]):
                    cum[a] = so_far
                    so_far += quad_on[a]
                cum[runs[q, 1]] = so_far  # a following run starting here writes the same value
            # Labels, per layer: stretches of one-label quads in one step, mixed quads in runs of one label.
            for q in range(num_runs):
                first = runs[q, 0]
                end = runs[q, 1]
                in_run = cum[end] - cum[first]
                if in_run == 0:
                    continue
                total_on += in_run
                for layer in range(layers):
                    a = first
                    while a < end:
                        label = uniform[i, layer, r, a]
                        if label >= 0:
                            stretch = min(extent[i, layer, r, a], end)
                            if label < unlabelled:
                                count = cum[stretch] - cum[a]
                                if count > 0:
                                    # credited in place at each of the seven sites: an inline="always" helper for
                                    # these three lines measured 13 % slower at 7² (11.5 vs 10.2 ms per batch)
                                    intersection[u, label] += sign * count
                                    if track:
                                        hits[i, u, label_category[label]] = 1
                            a = stretch
                            continue
                        if cum[a + 1] > cum[a]:  # a quad of several labels: its on-pixels in runs of one label
                            x0 = x_cells[a]
                            x1 = x_cells[a + 1]
                            run_label = unlabelled
                            run_length = 0
                            # only the rows with on-pixels (a bit each) where a strip has ≤ 64, else every row
                            by_mask = p1 - p0 <= 64
                            remaining = on_rows[a]
                            row = -1
                            while True:
                                if by_mask:
                                    if remaining == 0:
                                        break
                                    row = np.int64(trailing_zeros(remaining))
                                    remaining &= remaining - one
                                else:
                                    row += 1
                                    if row >= p1 - p0:
                                        break
                                if group_on[a, row] == 0:
                                    continue
                                # flags were stored only where the row was evaluated pixel by pixel
                                all_on = group_on[a, row] == x1 - x0
                                flags = row * sw
                                label = row_uniform[i, layer, p0 + row, a]
                                if label <= -2:  # two labels, split at one pixel: two counts
                                    split = -2 - label
                                    if all_on:
                                        left = split - x0
                                    elif masks:  # the row's on-pixels left of the split
                                        left = np.int64(_popcount(
                                            row_bits[a, row] & ((one << np.uint64(split - x0)) - one)))
                                    else:
                                        left = 0
                                        for x in range(x0, split):
                                            left += on[flags + x]
                                    right = group_on[a, row] - left  # the row's count is known: the rest
                                    label = row_split[i, layer, p0 + row, a, 0]
                                    if label < unlabelled and left > 0:
                                        intersection[u, label] += sign * left
                                        if track:
                                            hits[i, u, label_category[label]] = 1
                                    label = row_split[i, layer, p0 + row, a, 1]
                                    if label < unlabelled and right > 0:
                                        intersection[u, label] += sign * right
                                        if track:
                                            hits[i, u, label_category[label]] = 1
                                    continue
                                if label >= 0:  # this row of the quad carries one label
                                    if label < unlabelled:
                                        count = group_on[a, row]
                                        if count > 0:
                                            intersection[u, label] += sign * count
                                            if track:
                                                hits[i, u, label_category[label]] = 1
                                    continue
                                pixels = image_labels + (layer * sh + p0 + row) * sw
                                if masks:  # only the on-pixels, in order: runs of one label among them
                                    word = row_bits[a, row] if not all_on else ~np.uint64(0) >> np.uint64(
                                        64 - (x1 - x0))
                                    while word != 0:
                                        x = x0 + np.int64(trailing_zeros(word))
                                        word &= word - one
                                        label = labels_flat[pixels + x]
                                        if label != run_label:
                                            if run_label < unlabelled and run_length > 0:
                                                intersection[u, run_label] += sign * run_length
                                                if track:
                                                    hits[i, u, label_category[run_label]] = 1
                                            run_label = label
                                            run_length = 0
                                        run_length += 1
                                    continue
                                for x in range(x0, x1):
                                    label = labels_flat[pixels + x]
                                    if label != run_label:
                                        if run_label < unlabelled and run_length > 0:
                                            intersection[u, run_label] += sign * run_length
                                            if track:
                                                hits[i, u, label_category[run_label]] = 1
                                        run_label = label
                                        run_length = 0
                                    run_length += all_on or on[flags + x]
                            if run_label < unlabelled and run_length > 0:
                                intersection[u, run_label] += sign * run_length
                                if track:
                                    hits[i, u, label_category[run_label]] = 1
                        a += 1
        on_count[i, u] += sign * total_on
        for s in range(scalar.shape[1]):
            if scalar[i, s] < unlabelled:
                intersection[u, scalar[i, s]] += sign * total_on
        j += 1


@_compiled
def add_image_counts(per_image, scalar, label_category, num_pixels, on_count, hits, truth, activation, relevant):
    """Add the label areas ``G`` and the units' sides of the unions ``A`` of one batch, in one pass per image.

    The numpy form (``IoUTally._count_labels`` and ``_add_units``, which the torch path uses) costs a dozen
    small array operations per batch; here it is one loop over the histograms and the on-counts.

    Args:
        per_image: ``(N, width)`` int64 label histograms (``prepare_labels``; the last column, unlabelled, is
            not counted).
        scalar: ``(N, k)`` int64 whole-image label columns (``≥ width − 1``: none); each adds ``num_pixels``.
        label_category: ``(width − 1,)`` int64 category of each label column.
        num_pixels: pixels of one label map (``sh · sw``).
        on_count: ``(N, C)`` int64 on-pixels per image and unit (``count_maps``).
        hits: ``(N, C, categories)`` uint8 from ``count_maps`` for the ``lite`` union (a whole-image label of a
            category meets every on-pixel of its image); ``(0, 0, 0)`` for ``category-images``, where an
            image counts for every category with a label present in it.
        truth: ``(width − 1,)`` int64 ``G``, added to.
        activation: ``(C, categories)`` int64 ``A``, added to.
        relevant: ``(categories,)`` uint8 scratch.
    """
    n, c = on_count.shape
    num_labels = truth.shape[0]
    num_categories = activation.shape[1]
    lite = hits.shape[0] > 0
    for i in range(n):
        for k in range(num_categories):
            relevant[k] = 0
        for label in range(num_labels):  # vectorised
            truth[label] += per_image[i, label]
        if not lite:
            for label in range(num_labels):
                if per_image[i, label]:
                    relevant[label_category[label]] = 1
        for s in range(scalar.shape[1]):
            label = scalar[i, s]
            if label < num_labels:
                truth[label] += num_pixels
                relevant[label_category[label]] = 1
        if lite:
            for u in range(c):
                count = on_count[i, u]
                if count:
                    for k in range(num_categories):
                        if relevant[k] or hits[i, u, k]:
                            activation[u, k] += count
        else:
            for k in range(num_categories):
                if relevant[k]:
                    for u in range(c):
                        activation[u, k] += on_count[i, u]
