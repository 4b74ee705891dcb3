"""Mergeable first and second moments of several blocks of channels: the one statistic every comparison needs.

Every comparison metric here (correlation, matching, regression, CCA, SVCCA, PWCCA, CKA) is a function of the
sample count, the channel means and the centred co-moment matrix of the concatenated channels. So a shard of
samples is reduced to exactly that — ``n``, ``mean`` (D,) and ``M2 = Σ (x − mean)(x − mean)ᵀ`` (D×D) in float64
with D the total channel count — and shards are combined with Chan et al.'s pairwise rule
(Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for computing sample variances"):

    n = nₐ + n_b,   δ = mean_b − meanₐ,   mean = meanₐ + δ·n_b/n,   M2 = M2ₐ + M2_b + δδᵀ·nₐn_b/n.

Batches are summed about one reference shift ``s`` (the mean of the first batch's first rows, or 0 when every
channel's mean there is within 2 of its standard deviations of 0, as in most ReLU maps: :func:`_shift_of`):
``C = Σ [x − s, 1]ᵀ [x − s, 1]``, whose blocks are ``Σ (x − s)(x − s)ᵀ``, ``Σ (x − s)`` and ``n``, so large offsets
(pooled ReLU features with mean ≫ standard deviation) do not cancel catastrophically as they would in a raw
``Σxxᵀ − n·μμᵀ``. A batch costs one symmetric rank-k update over cache-sized chunks, fed without copying the
batch (:func:`_numpy_batch_sums`), and one (D+1)² addition; the pending sums become ``(n, mean, M2)`` once, at
a read-out or merge. A batch whose mean has drifted far from ``s`` in some channel (more than 4 of its own standard
deviations in float32 precision, 1024 in float64) settles the pending sums and becomes the new reference, so
the fixed shift never costs more than a few bits. Memory is O(D²) whatever the number of samples.

**Precision.** ``precision="float64"`` (the default) forms every product in float64 (BLAS ``dsyrk``).
``precision="float32"`` rounds the shifted samples to float32, forms each chunk's product with ``ssyrk``, sums
the chunk products in float32 over at most ~16,000 samples of 512 channels and those sums in float64: about 2×
faster on CPUs (a float64 product costs 2× a float32 one), with covariance errors of a few 1e-6 of σᵢσⱼ at most (about 1e-8 typically)
and metric errors of 1e-8 to 2e-5 relative, largest for CCA-family metrics of ill-conditioned layers (see the
README's "Scaling out"). A statistic records its precision (in its table too) and refuses to merge with the
other one.

* :class:`MultiMoments` — any number of named channel blocks (e.g. the pooled channels of every layer of two
  models, for the layer × layer CKA matrix).
* :class:`JointMoments` — the two-block case (net A's layer, net B's layer) with ``cov_aa``/``cov_ab``/``cov_bb``.
  A single-net statistic is ``JointMoments(c, 0)``.

Batches may be numpy arrays or torch tensors (any device); the co-moment is formed on the tensor's device in
the statistic's precision and only the (D,)/(D×D) results come back to the host.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any, Callable, Self, Sequence

import numpy as np
import pyarrow as pa

from .._errors import StageInputError
from ...core import StreamingStatistic, pack_arrays, unpack_arrays

__all__ = ["MultiMoments", "JointMoments", "PRECISIONS"]


def _is_tensor(x: Any) -> bool:
    # Checked by module name so numpy-only callers never pay for importing torch.
    return type(x).__module__.split(".")[0] == "torch"


def _tensor_batch_moments(x: Any, precision: str) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean (D,), centred co-moment (D, D))`` of one (n, D) tensor, on its device.

    ``precision="float64"`` forms the product in float64; ``"float32"`` centres and multiplies in float32 (the
    GPU's fast path) and returns the float64 read-out of that float32 product."""
    import torch

    if precision == "float64":
        mean = x.mean(dim=0)
        centred = x - mean
        return int(x.shape[0]), mean.cpu().numpy(), (centred.T @ centred).cpu().numpy()
    # float32: shifted by the float32-rounded float64 mean, so the float32 differences lose nothing to it;
    # the product in float32, the sums of the shifted values and the read-out in float64
    shift = x.mean(dim=0, dtype=torch.float64).to(torch.float32)
    shifted = x.to(torch.float32) - shift
    gram = (shifted.T @ shifted).to(torch.float64)
    sums = shifted.sum(dim=0, dtype=torch.float64)
    n = int(x.shape[0])
    comoment = gram - torch.outer(sums, sums) / n
    return n, (shift.to(torch.float64) + sums / n).cpu().numpy(), comoment.cpu().numpy()


def _symmetrize_upper(m: np.ndarray) -> np.ndarray:
    """Copy the upper triangle of square ``m`` onto its lower triangle, in place; returns ``m``.

    In column panels of 128: each panel's transposed strip below the diagonal block is one block copy (≈3×
    faster than scattering through triangle indices)."""
    size = m.shape[0]
    for i in range(0, size, 128):
        j = min(i + 128, size)
        block = m[i:j, i:j]
        block[...] = np.triu(block) + np.triu(block, 1).T
        m[j:, i:j] = m[i:j, j:].T
    return m


def _not_finite(name: str) -> StageInputError:
    return StageInputError(
        f"block {name!r} contains NaN or inf values; clean or drop those samples before accumulating"
    )


#: the two accumulation precisions: ``"float64"`` (exact to float64 rounding, the default) and ``"float32"``
#: (each chunk's product in float32, summed across chunks in float64; see :func:`_numpy_batch_sums`)
PRECISIONS = ("float64", "float32")

#: elements per chunk of shifted samples (~4 MiB in float64, ~2 MiB in float32; float32 chunks hold twice the
#: rows): the chunk stays in cache between its write and the rank-k update that reads it, so the conversion
#: and the shift cost almost nothing on top of BLAS
_CHUNK_ELEMENTS = 1 << 21

#: a float32 chunk holds this many times _CHUNK_ELEMENTS: ~4,000 rows of 512 channels, long enough for BLAS
#: to run at full speed, short enough to bound the float32 sums (their rounding grows with the rows summed)
_F32_CHUNKS = 2

#: elements of float32 rows summed in one float32 accumulator before it is added into the float64 sums: ~16,000
#: rows of 512 channels (two chunks of a batch of 8192 cost one float64 addition, not two)
_F32_SPAN_ELEMENTS = 1 << 23

#: elements per slice in which a chunk is filled (≤ 1 MiB: the slice is still in L2 when it is shifted)
_FILL_ELEMENTS = 1 << 17

#: a batch whose mean sits more than √_DRIFT within-batch standard deviations from the statistic's reference
#: shift (in some channel) is recomputed about its own mean, so a fixed reference never costs more than
#: log2(1 + _DRIFT) bits of the product's precision: ≤ 2 of float32's 24, ≤ 10 of float64's 53 (float64 thus
#: recomputes only for extreme drifts, e.g. class-sorted shards of class-selective units cost nothing)
_DRIFT = {"float64": 2.0**20, "float32": 16.0}

#: a first batch whose channel means all lie within this many of their standard deviations of 0 gets the
#: reference shift 0 (:func:`_shift_of`), which saves the kernels' subtraction pass (10–15 % of a float32 product)
_ZERO_SHIFT = 2.0

#: samples from which a reference shift is estimated (at most; a batch's first rows, whole images for maps)
_HEAD_SAMPLES = 512


def _assign(dest: np.ndarray, src: np.ndarray) -> None:
    dest[...] = src


def _assigner(arrays: Sequence[np.ndarray]) -> Any:
    """``assign(dest, src)``: ``dest[...] = src`` converted to ``dest``'s dtype. For float16 sources, when torch
    is already imported, through torch's vectorised half → float conversion (exact either way; numpy's took
    ~4.5 ns per value on ReLU maps here, torch's ~0.15 ns) — never importing torch for it."""
    torch = sys.modules.get("torch")
    if torch is None or not any(a.dtype == np.float16 for a in arrays):
        return _assign

    def assign(dest: np.ndarray, src: np.ndarray) -> None:
        if src.dtype != np.float16:
            dest[...] = src
            return
        with warnings.catch_warnings():  # read-only activations: torch only reads them here
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(dest).copy_(torch.from_numpy(src))

    return assign


def _shift_of(arrays: Sequence[np.ndarray], head: int, precision: str, mean_head: int | None = None) -> np.ndarray:
    """A reference shift from a batch's first rows (sample axis 0, position axis 2 for maps): **0** when every
    channel's mean over the first ``head`` rows lies within ``_ZERO_SHIFT`` of its standard deviations of 0
    (ReLU maps mostly do: then the kernels skip the subtraction pass), else the float64 mean of the first
    ``mean_head`` rows (default ``head``) — rounded to float32 in float32 precision, so that the shift the
    kernel subtracts is exactly the one recorded.

    A zero reference costs the products at most log2(1 + ``_ZERO_SHIFT``) ≈ 1.6 bits in a channel of that
    batch (the error of a product about a reference grows with (|offset| + σ)/σ), less than the drift guard
    already tolerates for later batches (:data:`_DRIFT`); a constant non-zero channel never gets it."""
    axes = (0, 2) if arrays[0].ndim == 3 else (0,)
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf in a bad column: refused by the caller
        rows = [np.asarray(b[:head], dtype=np.float64) for b in arrays]
        mean = np.concatenate([r.mean(axis=axes) for r in rows])
        spread = np.concatenate([r.std(axis=axes) for r in rows])
        if bool(np.all(np.abs(mean) <= _ZERO_SHIFT * spread)):
            return np.zeros_like(mean)
        if mean_head is not None and mean_head > head:
            per = mean_head * (arrays[0].shape[2] if arrays[0].ndim == 3 else 1)
            mean = np.concatenate([np.add.reduce(b[:mean_head], axis=axes, dtype=np.float64) for b in arrays]) / per
    return mean.astype(np.float32).astype(np.float64) if precision == "float32" else mean


class _Workspace:
    """Reusable scratch arrays of the kernels, one set per thread (:func:`_workspace`): chunk buffers (their
    column or row of ones written once) and the float32 product accumulator, so a batch allocates, zero-fills
    and page-faults nothing. A kernel's float32 result lives here until the next kernel call of the thread."""

    _KEEP = 2  #: buffer layouts kept (a batch's chunks and its shorter last one)

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], np.ndarray] = {}
        self._products: np.ndarray | None = None

    def buffer(self, shape: tuple[int, int], dtype: Any, ones: int, axis: int) -> np.ndarray:
        """A ``shape`` array of ``dtype`` whose column (``axis=1``) or row (``axis=0``) ``ones`` is all ones."""
        key = (shape, np.dtype(dtype).str, ones, axis)
        buffer = self._buffers.pop(key, None)
        if buffer is None:
            while len(self._buffers) >= self._KEEP:
                self._buffers.pop(next(iter(self._buffers)))
            buffer = np.empty(shape, dtype=dtype)
            if axis == 1:
                buffer[:, ones] = 1.0
            else:
                buffer[ones] = 1.0
        self._buffers[key] = buffer  # most recently used last
        return buffer

    def clear(self) -> None:
        """Let the scratch go (up to ~16 MiB per layout): at the end of a statistic's stream (``to_table``)."""
        self._buffers.clear()
        self._products = None

    def products(self, size: int, which: int) -> np.ndarray:
        """(size, size) float32 scratch number ``which`` (0 or 1) of :class:`_Float32Sums`."""
        if self._products is None or self._products.shape[1] != size:
            self._products = np.empty((2, size, size), dtype=np.float32)
        return self._products[which]


_THREAD = threading.local()


def _workspace() -> _Workspace:
    """This thread's :class:`_Workspace` (statistics updated from several threads never share scratch)."""
    workspace = getattr(_THREAD, "workspace", None)
    if workspace is None:
        workspace = _THREAD.workspace = _Workspace()
    return workspace


def _chunk_elements(precision: str) -> int:
    """Values per chunk of the kernels' buffer (float32 chunks are longer: BLAS needs the rows, see above)."""
    return (1 if precision == "float64" else _F32_CHUNKS) * _CHUNK_ELEMENTS


class _Float64Sums:
    """Float64 products of chunks, accumulated in place by BLAS ``dsyrk`` (upper triangle) — the float64 twin
    of :class:`_Float32Sums`, with the same ``add``/``result``."""

    def __init__(self, size: int) -> None:
        from scipy.linalg.blas import dsyrk

        self._dsyrk = dsyrk
        self._acc = np.zeros((size, size), dtype=np.float64, order="F")  # dsyrk updates a Fortran-ordered C

    def add(self, left: np.ndarray, right: np.ndarray, rows: int) -> None:
        """Fold in ``left @ right`` (``left`` is ``right.T``), handing BLAS whichever operand it reads in place."""
        if left.flags.f_contiguous:
            self._acc = self._dsyrk(1.0, left, beta=1.0, c=self._acc, trans=0, lower=0, overwrite_c=1)
        else:
            self._acc = self._dsyrk(1.0, right, beta=1.0, c=self._acc, trans=1, lower=0, overwrite_c=1)

    def result(self) -> np.ndarray:
        return self._acc


def _sums(precision: str, size: int, span: int, workspace: _Workspace) -> "_Float64Sums | _Float32Sums":
    """The chunk-product accumulator of ``precision`` for (size × size) sums (``span``: float32 rows per flush)."""
    return _Float64Sums(size) if precision == "float64" else _Float32Sums(size, span, workspace)


class _Float32Sums:
    """Float32 products of chunks, summed in float32 over at most ``span`` rows, then in float64.

    Each chunk's product ``Bᵀ B`` is numpy's (which runs it as a symmetric rank-k update, ``ssyrk``, on the
    buffer in place — numpy's BLAS: another OpenBLAS build, scipy's, took ~15 % longer for the same ``ssyrk``)
    written into float32 scratch; the chunk products are added in float32 until ``span`` rows, then flushed
    into a float64 sum. A batch of at most ``span`` rows is returned as the float32 accumulator itself (the
    thread's workspace: read it before the next kernel call), so its one float64 addition is into the
    statistic's pending sums."""

    def __init__(self, size: int, span: int, workspace: _Workspace) -> None:
        self._span = span
        self._c, self._scratch = workspace.products(size, 0), workspace.products(size, 1)
        self._rows = 0
        self._total: np.ndarray | None = None

    def add(self, left: np.ndarray, right: np.ndarray, rows: int) -> None:
        """Fold in ``left @ right`` (``left`` is ``right.T``: a Gram product) of ``rows`` samples."""
        if self._rows and self._rows + rows > self._span:
            self._flush()
        if self._rows:
            np.matmul(left, right, out=self._scratch)
            self._c += self._scratch
        else:
            np.matmul(left, right, out=self._c)
        self._rows += rows

    def _flush(self) -> None:
        if self._total is None:
            self._total = np.zeros(self._c.shape, dtype=np.float64)
        self._total += self._c
        self._rows = 0

    def result(self) -> np.ndarray:
        if self._total is None:
            return self._c
        if self._rows:
            self._flush()
        return self._total


def _numpy_batch_sums(arrays: Sequence[np.ndarray], dim: int, shift: np.ndarray, precision: str) -> np.ndarray:
    """Upper triangle of ``C = Σ [x − s, 1]ᵀ [x − s, 1] = [[G, g], [gᵀ, n]]`` over one batch, (D+1, D+1).

    ``arrays`` are (n, D_i) blocks of the same n samples, ``s`` the (D,) shift; ``G = Σ (x − s)(x − s)ᵀ``,
    ``g = Σ (x − s)``. One pass over the samples, with no concatenated or converted copy of the batch: rows
    are taken in cache-sized chunks, each written, shifted and converted into one buffer ``[x − s, 1]`` of
    D + 1 columns, and a symmetric rank-k update (one triangle: half the flops of the general product
    ``Xᵀ X``) folds the chunk into C. The column of ones delivers the sums without a separate pass. Only the
    upper triangle of C is meaningful (the lower one is 0).

    ``precision="float64"``: the buffer is float64 and BLAS ``dsyrk`` accumulates a float64 C in place.
    ``precision="float32"``: the buffer is float32 (inputs rounded to float32 first) and ``ssyrk`` accumulates
    the chunk products in float32 over at most ``_F32_SPAN_ELEMENTS / (D + 1)`` rows (~16,000 of 512
    channels), then in float64 (:class:`_Float32Sums`); C is returned in float32 when the batch is no longer.
    """
    workspace = _workspace()
    rows = int(arrays[0].shape[0])
    bounds = np.concatenate([[0], np.cumsum([b.shape[1] for b in arrays])]).astype(int)
    dtype = np.float64 if precision == "float64" else np.float32
    step = max(64, _chunk_elements(precision) // (dim + 1))
    sums = _sums(precision, dim + 1, max(step, _F32_SPAN_ELEMENTS // (dim + 1)), workspace)
    step = -(-rows // -(-rows // step))  # equal chunks: no short last one
    assign = _assigner(arrays)
    s = np.append(shift, 0.0).astype(dtype)  # the column of ones is not shifted
    shifted = bool(np.any(shift))  # a zero reference (_shift_of) needs no subtraction pass
    # without a shift to subtract, nothing needs the slice in L2: one converting copy per block and chunk
    # (float16 through torch: 50 calls per 100,000 samples of 512 channels instead of 784)
    fill = max(8, _FILL_ELEMENTS // (dim + 1)) if shifted else step
    buffer = workspace.buffer((min(rows, step), dim + 1), dtype, dim, axis=1)
    for start in range(0, rows, step):
        chunk = buffer[: min(step, rows - start)]
        # A converting copy of each block into its columns, then (with a shift) one contiguous in-place
        # subtraction of the shift, in slices that stay in L2 (≈1.5× faster than a subtraction into the strided
        # columns)
        for sub in range(0, chunk.shape[0], fill):
            part = chunk[sub : sub + fill]
            for i, b in enumerate(arrays):
                assign(part[:, bounds[i] : bounds[i + 1]], b[start + sub : start + sub + part.shape[0]])
            if shifted:
                part -= s
        # chunk.T is Fortran-ordered (D+1, k): BLAS reads it in place and updates C's upper triangle in place
        sums.add(chunk.T, chunk, chunk.shape[0])
    return sums.result()


def _maps_batch_sums(maps: Sequence[np.ndarray], dim: int, shift: np.ndarray, precision: str,
                     images: np.ndarray | None = None) -> np.ndarray:
    """:func:`_numpy_batch_sums` over the per-position samples of (N, C_i, H·W) maps, without their
    (N·H·W, C) channels-last copy; ``images`` (indexes into N, in order): only those images, gathered a slice
    at a time into the buffer (the same buffer contents, so the same bits, as maps indexed by them first).

    The samples are the N·H·W (image, position) pairs of :func:`samples_from_maps`'s ``"positions"`` mode: a
    chunk of whole images is written, shifted and converted channel-major into one buffer ``B = [x − s; 1]``
    of D + 1 rows (each image's H·W values of a channel are contiguous in the maps and stay contiguous in the
    buffer), and the rank-k update folds ``B Bᵀ`` into C — the same sums as :func:`_numpy_batch_sums` (the
    order of the samples inside a sum differs, so equal to rounding).
    """
    workspace = _workspace()
    n, hw = int(maps[0].shape[0] if images is None else len(images)), int(maps[0].shape[2])
    bounds = np.concatenate([[0], np.cumsum([m.shape[1] for m in maps])]).astype(int)
    dtype = np.float64 if precision == "float64" else np.float32
    step = max(1, _chunk_elements(precision) // ((dim + 1) * hw))
    sums = _sums(precision, dim + 1, max(step * hw, _F32_SPAN_ELEMENTS // (dim + 1)), workspace)
    step = -(-n // -(-n // step))  # equal chunks: no short last one
    assign = _assigner(maps)
    s = np.append(shift, 0.0).astype(dtype)  # the row of ones is not shifted
    shifted = bool(np.any(shift))
    fill = max(1, _FILL_ELEMENTS // ((dim + 1) * hw))  # the transposing copy needs its slice in L2, shift or not
    for start in range(0, n, step):
        k = min(step, n - start)
        buffer = workspace.buffer((dim + 1, k * hw), dtype, dim, axis=0)
        rows_of = buffer.reshape(dim + 1, k, hw)  # (D+1, k, HW) view of the buffer
        # (k, C, HW) maps → (C, k, HW) rows of the buffer, in slices of images that stay in L2: a converting
        # copy, then an in-place subtraction of the shift (the ones row is shifted by 0)
        for sub in range(0, k, fill):
            part = rows_of[:, sub : sub + fill]
            lo, hi = start + sub, start + sub + part.shape[1]
            for i, f in enumerate(maps):
                block = f[lo:hi] if images is None else f[images[lo:hi]]  # an L2-sized gather: these images only
                assign(part[bounds[i] : bounds[i + 1]], block.transpose(1, 0, 2))
            if shifted:
                part -= s[:, None, None]
        # buffer.T is (k·HW, D+1) with unit row stride: BLAS reads it in place (B Bᵀ)
        sums.add(buffer, buffer.T, k * hw)
    return sums.result()


def _read_accumulator(acc: np.ndarray, rows: int, shift: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, centred co-moment)`` from the upper triangle of ``C = Σ [x − s; 1][x − s; 1]ᵀ`` over ``rows``
    samples:
    ``mean = s + g/n`` and ``M2 = G − g gᵀ / n`` (exact algebra; with ``s`` close to the mean, ``g/n`` is small
    compared with the spread of the data, so the subtraction does not cancel)."""
    dim = acc.shape[0] - 1
    sums = acc[:dim, dim]
    scaled = sums / np.sqrt(rows)
    comoment = np.subtract(acc[:dim, :dim], np.outer(scaled, scaled), order="C")  # g gᵀ/n: a symmetric outer product
    return rows, shift + sums / rows, _symmetrize_upper(comoment)  # mirrored last: exactly symmetric


def _check_sums(acc: np.ndarray, bounds: np.ndarray, names: Sequence[str], precision: str) -> None:
    """Refuse a batch whose sums are not finite (a NaN or inf anywhere makes its column's sum non-finite, so
    bad input is caught without a separate ``isfinite`` pass), or whose squares overflowed the precision."""
    dim = acc.shape[0] - 1
    sums, squares = acc[:dim, dim], np.diagonal(acc)[:dim]
    if np.isfinite(sums).all() and np.isfinite(squares).all():
        return
    for i, name in enumerate(names):
        if not np.isfinite(sums[bounds[i]:bounds[i + 1]]).all():
            raise _not_finite(name)
        if not np.isfinite(squares[bounds[i]:bounds[i + 1]]).all():
            raise StageInputError(
                f"block {name!r} has values whose squares overflow {precision} (values more than "
                f"~{np.sqrt(np.finfo(precision).max / acc[dim, dim]):.1g} from an earlier batch's mean); rescale "
                'the activations or accumulate in float64 precision ([compare].moments_precision = "float64")'
            )


def _drifted(acc: np.ndarray, precision: str) -> bool:
    """True when the batch's mean is far (√_DRIFT within-batch standard deviations) from the shift in any
    channel of non-zero spread: its products then lost precision to the offset and are recomputed."""
    dim = acc.shape[0] - 1
    rows = acc[dim, dim]
    offset = acc[:dim, dim] / rows
    spread = np.diagonal(acc)[:dim] / rows - offset * offset
    return bool(np.any((offset * offset > _DRIFT[precision] * spread) & (spread > 0)))


def _all_finite(x: Any) -> bool:
    if _is_tensor(x):
        import torch

        return bool(torch.isfinite(x).all())
    return bool(np.isfinite(x).all())


def _concat(blocks: Sequence[Any], precision: str) -> Any:
    """Concatenate blocks (at least one a tensor) along channels as one tensor on the first tensor's device:
    float64 for float64 products; float32 for float32 products, which round every value to float32 anyway —
    a float64 copy there only doubled the device memory of the batch before that rounding."""
    import torch

    device = next(b for b in blocks if _is_tensor(b)).device
    dtype = torch.float64 if precision == "float64" else torch.float32
    return torch.cat([torch.as_tensor(b, dtype=dtype, device=device) for b in blocks], dim=1)


class MultiMoments(StreamingStatistic):
    """Joint moments of several channel blocks sampled together (same rows = same samples).

    Args:
        sizes: channel count of each block, e.g. ``[96, 256, 384]`` for three layers.
        names: one unique name per block (defaults to ``"0", "1", …``).
        precision: ``"float64"`` (default: every product in float64) or ``"float32"`` (each chunk's product in
            float32, at most a few thousand rows, summed in float64: about 2× faster on CPUs, with covariance
            errors up to a few 1e-6 of σᵢσⱼ; see the module docstring). Statistics of different precisions
            refuse to merge.

    State: ``n`` (int), ``mean`` (D,), ``m2`` (D, D) float64 with D = Σ sizes; between read-outs, the sums of
    the batches folded in since the last one, about a fixed reference shift (``[x − s, 1]ᵀ[x − s, 1]``), so a
    batch costs its rank-k update and one (D+1)² addition.
    """

    _KIND = "MultiMoments"

    def __init__(self, sizes: Sequence[int], names: Sequence[str] | None = None,
                 precision: str = "float64") -> None:
        if precision not in PRECISIONS:
            raise StageInputError(f"unknown moment precision {precision!r}; use one of {list(PRECISIONS)}")
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 0 for s in sizes):
            raise StageInputError(f"block sizes must be a non-empty list of channel counts ≥ 0; got {sizes}")
        names = [str(i) for i in range(len(sizes))] if names is None else [str(n) for n in names]
        if len(names) != len(sizes) or len(set(names)) != len(names):
            raise StageInputError(
                f"need one unique name per block; got names {names} for {len(sizes)} blocks of sizes {sizes}"
            )
        self.sizes: list[int] = sizes
        self.names: list[str] = names
        self.precision: str = precision
        self._bounds = offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._slices = {name: slice(int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(names)}
        dim = int(offsets[-1])
        self._n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._m2 = np.zeros((dim, dim), dtype=np.float64)
        self._ref: np.ndarray | None = None  # (D,) reference shift of the pending sums
        self._pending: np.ndarray | None = None  # (D+1, D+1) upper triangle of Σ [x − s, 1]ᵀ[x − s, 1]
        self._pending_rows = 0

    # ----------------------------------------------------------------- accumulation
    @property
    def dim(self) -> int:
        """Total channel count D."""
        return self._mean.shape[0]

    def update(self, *blocks: Any) -> None:
        """Fold one batch in: ``blocks[i]`` is an (n, sizes[i]) array or tensor, all with the same n rows."""
        if len(blocks) != len(self.sizes):
            raise StageInputError(
                f"update got {len(blocks)} blocks but this statistic has {len(self.sizes)} ({self.names})"
            )
        rows = None
        for name, size, block in zip(self.names, self.sizes, blocks):
            shape = tuple(block.shape)
            if len(shape) != 2 or shape[1] != size:
                raise StageInputError(
                    f"block {name!r} must be a (samples, {size}) matrix; got shape {shape}. "
                    "Flatten maps to samples first (samples_from_maps)"
                )
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise StageInputError(
                    f"all blocks of one batch must hold the same samples; got row counts "
                    f"{[tuple(b.shape)[0] for b in blocks]} for blocks {self.names}"
                )
        if not rows:
            return
        if any(_is_tensor(b) for b in blocks):
            for name, block in zip(self.names, blocks):
                if not _all_finite(block):
                    raise _not_finite(name)
            self._combine(*_tensor_batch_moments(_concat(blocks, self.precision), self.precision))
            return
        arrays = [np.asarray(b) for b in blocks]
        per_chunk = _chunk_elements(self.precision) // (self.dim + 1)
        heads = (min(int(rows), _HEAD_SAMPLES), min(int(rows), max(64, per_chunk)))
        self._fold(arrays, _numpy_batch_sums, heads=heads, rows=int(rows))

    def update_maps(self, *maps: Any, images: np.ndarray | None = None) -> None:
        """Fold in the per-position samples of one batch of maps: ``maps[i]`` is an (N, sizes[i], H, W) numpy
        array, all with the same N images and H × W grid; every (image, position) is one sample.

        The same statistic as ``update(*samples_from_maps(...))`` (mode ``"positions"``, equal grids) without
        the channels-last copy of the maps (see :func:`_maps_batch_sums`). ``images``: integer indexes into N
        of the images to fold in, in that order — the same bits as ``update_maps(*(m[images] for m in maps))``
        without copying the selected maps first (a split of a shard's images, e.g. its held-out ones).
        """
        if len(maps) != len(self.sizes):
            raise StageInputError(f"update_maps got {len(maps)} blocks but this statistic has {len(self.sizes)} "
                                  f"({self.names})")
        arrays = [np.asarray(m) for m in maps]
        for name, size, m in zip(self.names, self.sizes, arrays):
            if m.ndim != 4 or m.shape[1] != size or m.shape[0] != arrays[0].shape[0] or m.shape[2:] != arrays[0].shape[2:]:
                raise StageInputError(
                    f"block {name!r} must be an (N, {size}, H, W) map array with the same N, H, W as the other "
                    f"blocks; got shapes {[tuple(a.shape) for a in arrays]}. Resize the grids first (samples_from_maps)"
                )
        total, (h, w) = arrays[0].shape[0], arrays[0].shape[2:]
        if images is not None:
            images = np.asarray(images)
            if images.ndim != 1 or (images.size and (images.dtype.kind not in "iu" or images.min() < 0
                                                     or images.max() >= total)):
                raise StageInputError(
                    f"update_maps: images must be a 1-D array of integer indexes in [0, {total}); got "
                    f"{images.dtype} of shape {images.shape}" + (f", range {images.min()}…{images.max()}"
                                                                  if images.size and images.dtype.kind in "iu" else "")
                    + " (use np.flatnonzero(mask) for a boolean mask)"
                )
        n = total if images is None else len(images)
        if n == 0 or h == 0 or w == 0:
            return
        flat = [m.reshape(total, m.shape[1], h * w) for m in arrays]
        per_chunk = _chunk_elements(self.precision) // ((self.dim + 1) * h * w)
        heads = (min(n, -(-_HEAD_SAMPLES // (h * w))), min(n, max(1, per_chunk)))
        if images is None:
            self._fold(flat, _maps_batch_sums, heads=heads, rows=n * h * w)
            return

        def kernel(arrays: list[np.ndarray], dim: int, shift: np.ndarray, precision: str) -> np.ndarray:
            return _maps_batch_sums(arrays, dim, shift, precision, images)

        # a reference shift reads the first chosen images: gathered only when one is taken (first or drifted batch)
        self._fold(flat, kernel, heads=heads, rows=n * h * w,
                   shift_source=lambda: [f[images[: max(heads)]] for f in flat])

    def _fold(self, arrays: list[np.ndarray], kernel: Any, heads: tuple[int, int], rows: int,
              shift_source: Callable[[], list[np.ndarray]] | None = None) -> None:
        """Add one batch's sums about the reference shift to the pending sums (nothing changes if it is refused).

        The first batch sets the reference (0, or the mean of its first samples: :func:`_shift_of`); a later
        batch whose mean drifted far from it (:func:`_drifted`) settles the pending sums and becomes the new reference.
        ``shift_source``: the batch's leading rows for :func:`_shift_of` when they are not ``arrays``' own."""
        def shift_of() -> np.ndarray:
            return _shift_of(arrays if shift_source is None else shift_source(), heads[0], self.precision, heads[1])

        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf/overflow: refused by _check_sums
            fresh = self._ref is None
            shift = shift_of() if fresh else self._ref
            acc = kernel(arrays, self.dim, shift, self.precision)
            _check_sums(acc, self._bounds, self.names, self.precision)
            if not fresh and _drifted(acc, self.precision):
                shift = shift_of()
                acc = kernel(arrays, self.dim, shift, self.precision)
                self._settle()
                fresh = True
        if fresh:
            self._ref = shift
        if self._pending is None:
            self._pending = np.array(acc, dtype=np.float64, order="K")  # acc may be the thread's float32 scratch
        else:
            self._pending += acc
        self._pending_rows += rows

    def _settle(self) -> None:
        """Fold the pending sums into ``(n, mean, M2)`` (Chan's rule); the reference shift stays."""
        if self._pending is not None and self._pending_rows:
            self._combine(*_read_accumulator(self._pending, self._pending_rows, self._ref), owned=True)
        self._pending, self._pending_rows = None, 0

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray, owned: bool = False) -> None:
        """Fold ``(n, mean, M2)`` in (Chan's rule); ``owned``: the arrays are fresh, kept without a copy."""
        if n_b == 0:
            return
        if self._n == 0:
            self._n, self._mean, self._m2 = n_b, mean_b if owned else mean_b.copy(), m2_b if owned else m2_b.copy()
            return
        n_a = self._n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._n = n

    def merge(self, other: Self) -> Self:
        """Fold another shard's moments into this one (Chan's pairwise rule); returns ``self``.

        Both must describe the same blocks and have the same precision: a float32-precision shard folded into a
        float64 statistic would give float32 accuracy under a float64 label, so it is refused."""
        if type(other) is not type(self) or other.sizes != self.sizes or other.names != self.names:
            raise StageInputError(
                f"cannot merge {type(other).__name__}(sizes={other.sizes}, names={other.names}) into "
                f"{type(self).__name__}(sizes={self.sizes}, names={self.names}); both must describe the same blocks"
            )
        if other.precision != self.precision:
            raise StageInputError(
                f"cannot merge a {other.precision}-precision {type(other).__name__} into a {self.precision}-"
                f"precision one; accumulate every shard with the same precision (the moments_precision setting)"
            )
        self._combine(other._n, other._mean, other._m2)
        if other._pending is not None and other._pending_rows:
            if self._pending is not None and np.array_equal(self._ref, other._ref):
                self._pending += other._pending  # same reference: the sums simply add
                self._pending_rows += other._pending_rows
            else:
                self._combine(*_read_accumulator(other._pending, other._pending_rows, other._ref))
        return self

    def copy(self) -> Self:
        """An independent copy (merging into it leaves ``self`` unchanged)."""
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone._mean, clone._m2 = self._mean.copy(), self._m2.copy()
        if self._pending is not None:
            clone._pending = self._pending.copy()
        return clone

    # ---------------------------------------------------------------- serialisation
    def _attrs(self) -> dict[str, Any]:
        return {"kind": self._KIND, "sizes": self.sizes, "names": self.names, "precision": self.precision}

    def to_table(self) -> pa.Table:
        """One-row table: ``n`` int64 (1,), ``mean`` float64 (D,), ``m2`` float64 (D, D); sizes, names and
        precision in attrs."""
        self._settle()
        _workspace().clear()  # a shard's stream ends here: its thread's kernel scratch is not kept alive
        return pack_arrays({"n": np.array([self._n], np.int64), "mean": self._mean, "m2": self._m2}, self._attrs())

    @classmethod
    def _from_attrs(cls, attrs: dict[str, Any]) -> Self:
        return cls(attrs["sizes"], attrs["names"], attrs.get("precision", "float64"))

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != cls._KIND:
            raise StageInputError(f"table holds a {attrs.get('kind')!r} statistic, not a {cls._KIND!r}")
        stat = cls._from_attrs(attrs)
        stat._n = int(arrays["n"].reshape(-1)[0])
        stat._mean = arrays["mean"].astype(np.float64)
        stat._m2 = arrays["m2"].astype(np.float64)
        if stat._mean.shape != (stat.dim,) or stat._m2.shape != (stat.dim, stat.dim):
            raise StageInputError(
                f"moment table is corrupt: mean {stat._mean.shape}, m2 {stat._m2.shape}, D={stat.dim}"
            )
        return stat

    # -------------------------------------------------------------------- read-outs
    @property
    def n(self) -> int:
        """Number of samples folded in."""
        return self._n + self._pending_rows

    @property
    def mean(self) -> np.ndarray:
        """(D,) channel means."""
        self._settle()
        return self._mean.copy()

    @property
    def comoment(self) -> np.ndarray:
        """(D, D) centred co-moment ``Σ (x − mean)(x − mean)ᵀ`` (a view: do not modify)."""
        self._settle()
        return self._m2

    def result(self) -> np.ndarray:
        """The read-out: the ``(D, D)`` sample covariance of all blocks (:meth:`covariance`, ``ddof=1``)."""
        return self.covariance()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """(D, D) covariance ``M2 / (n − ddof)``."""
        self._settle()
        if self._n - ddof <= 0:
            raise StageInputError(
                f"covariance with ddof={ddof} needs more than {ddof} samples; this statistic holds n={self._n}. "
                "Accumulate more samples"
            )
        return self._m2 / (self._n - ddof)

    def variance(self, ddof: int = 1) -> np.ndarray:
        """(D,) channel variances (never negative)."""
        self._settle()
        if self._n - ddof <= 0:
            raise StageInputError(f"variance with ddof={ddof} needs more than {ddof} samples; n={self._n}")
        return np.maximum(np.diag(self._m2), 0.0) / (self._n - ddof)

    def correlation(self, dead_tol: float = 1e-10) -> np.ndarray:
        """(D, D) Pearson correlation; rows/columns of dead units are 0 (see :func:`dead_units`)."""
        from ._correlation import correlation_from_covariance

        return correlation_from_covariance(self.covariance(ddof=0), self._mean, dead_tol=dead_tol)

    def slice(self, name: str) -> slice:
        """Index range of block ``name`` in the concatenated channels."""
        if name not in self._slices:
            raise StageInputError(f"unknown block {name!r}; blocks are {self.names}")
        return self._slices[name]

    def block(self, row: str, col: str, ddof: int = 1) -> np.ndarray:
        """Covariance block between blocks ``row`` and ``col``: (sizes[row], sizes[col])."""
        self._settle()
        if self._n - ddof <= 0:
            raise StageInputError(f"covariance with ddof={ddof} needs more than {ddof} samples; n={self._n}")
        return self._m2[self.slice(row), self.slice(col)] / (self._n - ddof)

    def block_mean(self, name: str) -> np.ndarray:
        """Means of block ``name``."""
        self._settle()
        return self._mean[self.slice(name)].copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, names={self.names}, n={self._n})"


class JointMoments(MultiMoments):
    """Joint moments of net A's channels (Ca) and net B's channels (Cb): the per-(pair, layer) statistic.

    ``update(a, b)`` with a (n, Ca) and b (n, Cb) sample matrices (same rows = same image/position).
    """

    _KIND = "JointMoments"

    def __init__(self, ca: int, cb: int, precision: str = "float64") -> None:
        super().__init__([ca, cb], ["a", "b"], precision)

    @classmethod
    def _from_attrs(cls, attrs: dict[str, Any]) -> Self:
        ca, cb = attrs["sizes"]
        return cls(ca, cb, attrs.get("precision", "float64"))

    def update(self, a: Any, b: Any) -> None:  # type: ignore[override]
        """Fold in one batch: a (n, Ca), b (n, Cb), float32/float64 numpy arrays or torch tensors."""
        super().update(a, b)

    @property
    def ca(self) -> int:
        return self.sizes[0]

    @property
    def cb(self) -> int:
        return self.sizes[1]

    def cov_aa(self, ddof: int = 1) -> np.ndarray:
        """(Ca, Ca) within-A covariance."""
        return self.block("a", "a", ddof)

    def cov_ab(self, ddof: int = 1) -> np.ndarray:
        """(Ca, Cb) between-net covariance."""
        return self.block("a", "b", ddof)

    def cov_bb(self, ddof: int = 1) -> np.ndarray:
        """(Cb, Cb) within-B covariance."""
        return self.block("b", "b", ddof)

    def swapped(self) -> "JointMoments":
        """The same moments with the roles of A and B exchanged (for B-from-A regression)."""
        self._settle()
        out = JointMoments(self.cb, self.ca, self.precision)
        order = np.r_[np.arange(self.ca, self.ca + self.cb), np.arange(self.ca)]
        out._n = self._n
        out._mean = self._mean[order]
        out._m2 = self._m2[np.ix_(order, order)]
        return out
