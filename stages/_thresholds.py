"""Exact per-unit top-quantile thresholds (Network Dissection's ``T_u``) as mergeable statistics.

Convention (the one number every later stage relies on): for unit ``u`` with activation values ``v_u`` —
every image × every position of the layer's own H×W grid, in the activation dtype —

    threshold[u] = numpy.quantile(v_u, 1 - q)        # method="linear", 1 - q a Python float

bit for bit, so it is a value of the activation dtype (float16 stays float16). With ``n`` values, numpy's
"linear" rule reads the ascending order statistics at ``lo = ⌊(n−1)(1−q)⌋`` and ``lo + 1`` and
interpolates with weight ``(n−1)(1−q) − lo``; ``count[u]`` is the number of values strictly above the
threshold (≈ q·n for continuous data, the "on" test of the IoU stage being ``> T`` too). Reference
NetDissect uses a randomised KLL sketch and reads quantile 994/999 ≈ 0.99499; ours is exact.

The constraint that shaped it: the statistic must merge exactly across shards with memory independent of
the number of images. ``n`` is known up front (images × H × W), so only the top ``k = n − lo`` values per
unit can ever matter. Two exact statistics:

* :class:`TopQuantile` — one pass; keeps the ``k`` largest values per unit (merging two states keeps the
  top ``k`` of their union). Memory: ``k · C · itemsize`` bytes for the state (plus one transposed copy
  of the shard being folded in); it refuses to start when that exceeds ``budget_bytes``.
* :class:`RadixQuantile` — the fallback when it does not fit: a radix select over the order-preserving
  integer keys of the floats. Each pass histograms the next digit of the keys that share the prefix found
  so far (one row for ``lo`` and, when interpolating, one for ``lo + 1``), merged as integer sums; after
  ``⌈bits / digit⌉`` passes the keys, hence the values, are known exactly. Memory: ``targets · C · 2^digit``
  int64 counts, the digit width chosen so that fits ``budget_bytes``. float16 needs one pass, float32 two or
  three, float64 four or more.

:func:`threshold_method` picks one from the layer shape; :func:`unit_thresholds` runs either in-process.
Both produce the table ``unit`` (int64), ``threshold`` (float64, exactly the dtype value), ``count`` (int64).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal, Self

import numpy as np
import pandas as pd
import pyarrow as pa

from ._errors import StageInputError
from ._topk import keep_largest
from ..core import StreamingStatistic, pack_arrays, unpack_arrays

__all__ = [
    "DEFAULT_QUANTILE",
    "DEFAULT_BUDGET_BYTES",
    "TopQuantile",
    "RadixQuantile",
    "quantile_ranks",
    "threshold_method",
    "topk_state_bytes",
    "unit_thresholds",
]

DEFAULT_QUANTILE = 0.005
DEFAULT_BUDGET_BYTES = 256 * 2**20

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_UINT_OF = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# Transient working set of one update chunk (keys, digits, flat indexes), independent of the state budget.
_CHUNK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------- shared


def _check_quantile(quantile: float) -> float:
    quantile = float(quantile)
    if not 0.0 <= quantile <= 1.0:
        raise StageInputError(f"quantile must be the top fraction in [0, 1] (e.g. 0.005); got {quantile}")
    return quantile


def _check_images(num_images: int) -> int:
    if int(num_images) != num_images or num_images < 1:
        raise StageInputError(f"num_images must be the positive total number of images over all shards; got {num_images}")
    return int(num_images)


def quantile_ranks(n: int, quantile: float) -> tuple[int, int, float]:
    """Ascending order statistics numpy's ``quantile(v, 1 - quantile)`` reads on ``n`` values.

    Returns:
        ``(lo, hi, gamma)``: the result interpolates ``v_sorted[lo]`` and ``v_sorted[hi]`` with weight
        ``gamma`` (``hi == lo`` at the top end, where numpy returns the maximum).
    """
    position = (n - 1) * (1.0 - quantile)  # float64, exactly numpy's virtual index
    if position >= n - 1:
        return n - 1, n - 1, 0.0
    lo = math.floor(position)
    return lo, lo + 1, float(position - lo)


def _numpy_lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's ``_lerp`` for a weak (Python float) weight: same operations, so the same bits."""
    diff = b - a
    result = np.add(a, diff * gamma)
    if gamma >= 0.5:
        result = np.subtract(b, diff * (1 - gamma))
    return result


def _as_unit_values(acts: np.ndarray, who: str) -> tuple[np.ndarray, int]:
    """``(C, N·H·W)`` copy of a shard's activations, −0.0 folded into +0.0; also returns H·W."""
    acts = np.asarray(acts)
    if acts.ndim == 2:
        acts = acts[:, :, None, None]
    if acts.ndim != 4:
        raise StageInputError(f"{who}: activations must be (N, C, H, W) or (N, C); got shape {acts.shape}")
    if acts.dtype not in _FLOAT_DTYPES:
        raise StageInputError(
            f"{who}: activations must be float16/float32/float64; got dtype {acts.dtype} (cast them first)"
        )
    if acts.size and not (np.isfinite(acts.max()) and np.isfinite(acts.min())):  # two reductions, no mask array
        bad = int((~np.isfinite(acts)).sum())
        raise StageInputError(f"{who}: activations contain {bad} NaN/inf values; fix the extraction (quantiles of NaN are NaN)")
    n, c, h, w = acts.shape
    values = np.empty((c, n * h * w), dtype=acts.dtype)
    # x + 0.0 turns -0.0 into +0.0, so equal values always have equal radix keys.
    np.add(acts.transpose(1, 0, 2, 3).reshape(c, n * h * w), acts.dtype.type(0), out=values)
    return values, h * w


class _Layout:
    """Units, positions per image and dtype of a layer, fixed by the first batch and checked afterwards."""

    def __init__(self, num_units: int | None = None, spatial: int | None = None, dtype: str | None = None):
        self.num_units, self.spatial, self.dtype = num_units, spatial, dtype

    @property
    def known(self) -> bool:
        return self.num_units is not None

    def absorb(self, num_units: int, spatial: int, dtype: np.dtype, who: str) -> None:
        if not self.known:
            self.num_units, self.spatial, self.dtype = int(num_units), int(spatial), np.dtype(dtype).str
            return
        if (num_units, spatial, np.dtype(dtype).str) != (self.num_units, self.spatial, self.dtype):
            raise StageInputError(
                f"{who}: this batch has {num_units} units × {spatial} positions of {np.dtype(dtype)}, but earlier "
                f"batches had {self.num_units} × {self.spatial} of {np.dtype(self.dtype)}; every shard of one layer "
                "must have the same shape and storage dtype"
            )

    def attrs(self) -> dict[str, Any]:
        return {"num_units": self.num_units, "spatial": self.spatial, "dtype": self.dtype}


def _result_frame(thresholds: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "unit": np.arange(len(thresholds), dtype=np.int64),
            "threshold": thresholds.astype(np.float64),
            "count": counts.astype(np.int64),
        }
    )


# ------------------------------------------------------------------------------------------------ top-k


def topk_state_bytes(num_images: int, spatial: int, num_units: int, itemsize: int, quantile: float) -> int:
    """Bytes of a full :class:`TopQuantile` state: ``k · C · itemsize`` with ``k = n − lo``."""
    n = num_images * spatial
    lo, _, _ = quantile_ranks(n, quantile)
    return (n - lo) * num_units * itemsize


class TopQuantile(StreamingStatistic):
    """Exact per-unit threshold at the top ``quantile`` fraction, by keeping each unit's ``k`` largest values.

    ``k = n − ⌊(n−1)(1−q)⌋`` (≈ q·n + 1) for ``n = num_images · H · W`` values per unit, so the state is
    bounded by ``k · C`` values whatever the shard layout; :func:`threshold_method` says when that exceeds
    the budget and :class:`RadixQuantile` is needed instead.

    Args:
        num_images: total number of images over all shards (checked when the result is read).
        quantile: top fraction ``q``; the threshold is ``numpy.quantile(v, 1 - q)``.
        budget_bytes: refuse (with the fix in the message) when the state would exceed this.
    """

    def __init__(self, num_images: int, quantile: float = DEFAULT_QUANTILE, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.num_images = _check_images(num_images)
        self.quantile = _check_quantile(quantile)
        self.budget_bytes = int(budget_bytes)
        self._layout = _Layout()
        self._top: np.ndarray | None = None  # (C, m ≤ k), unordered
        self._seen = 0  # values per unit folded in so far

    # -- geometry
    def _num_values(self) -> int:
        return self.num_images * int(self._layout.spatial)

    def _k(self) -> int:
        n = self._num_values()
        lo, _, _ = quantile_ranks(n, self.quantile)
        return n - lo

    def _start(self, num_units: int, spatial: int, dtype: np.dtype) -> None:
        first = not self._layout.known
        self._layout.absorb(num_units, spatial, dtype, "TopQuantile")
        if first:
            need = topk_state_bytes(self.num_images, spatial, num_units, np.dtype(dtype).itemsize, self.quantile)
            if need > self.budget_bytes:
                raise StageInputError(
                    f"TopQuantile: keeping the top {self._k()} of {self._num_values()} values for {num_units} units needs "
                    f"{need / 2**20:.0f} MiB, over the budget of {self.budget_bytes / 2**20:.0f} MiB; use RadixQuantile "
                    "(threshold_method(...) picks it) or raise budget_bytes"
                )

    # -- protocol
    def update(self, acts: np.ndarray) -> None:
        """Fold in one shard of activations ``(N, C, H, W)`` (or ``(N, C)``), float16/32/64."""
        values, spatial = _as_unit_values(acts, "TopQuantile.update")
        self._start(values.shape[0], spatial, values.dtype)
        self._top = keep_largest(self._top, values, self._k())
        self._seen += values.shape[1]

    def merge(self, other: Self) -> Self:
        if (other.num_images, other.quantile) != (self.num_images, self.quantile):
            raise StageInputError(
                f"TopQuantile.merge: states for {self.num_images} images at q={self.quantile} and "
                f"{other.num_images} images at q={other.quantile} cannot be merged"
            )
        if other._top is None:
            return self
        self._start(other._layout.num_units, other._layout.spatial, np.dtype(other._layout.dtype))
        self._top = keep_largest(self._top, other._top, self._k())
        self._seen += other._seen
        return self

    def to_table(self) -> pa.Table:
        arrays = {} if self._top is None else {"top": self._top}
        attrs = {
            "kind": "TopQuantile",
            "num_images": self.num_images,
            "quantile": self.quantile,
            "budget_bytes": self.budget_bytes,
            "seen": self._seen,
            **self._layout.attrs(),
        }
        return pack_arrays(arrays, attrs)

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        arrays = {name: array.copy() for name, array in arrays.items()}  # unpacked arrays are read-only views
        if attrs.get("kind") != "TopQuantile":
            raise StageInputError(f"TopQuantile.from_table: table holds a {attrs.get('kind')!r} state")
        stat = cls(attrs["num_images"], attrs["quantile"], attrs["budget_bytes"])
        stat._layout = _Layout(attrs["num_units"], attrs["spatial"], attrs["dtype"])
        stat._top = arrays.get("top")
        stat._seen = int(attrs["seen"])
        return stat

    # -- results
    def result(self) -> pd.DataFrame:
        """Table ``unit, threshold, count`` (see the module docstring for the convention)."""
        if self._top is None:
            raise StageInputError("TopQuantile.result: no activations were added")
        n = self._num_values()
        if self._seen != n:
            raise StageInputError(
                f"TopQuantile.result: saw {self._seen // self._layout.spatial} images but num_images is "
                f"{self.num_images}; feed every shard exactly once (or fix num_images)"
            )
        lo, hi, gamma = quantile_ranks(n, self.quantile)
        k = n - lo
        # The k kept values are v_sorted[lo:], so v[lo] is their minimum and v[hi] the next one.
        smallest = np.partition(self._top, min(1, k - 1), axis=1)
        a = smallest[:, 0]
        b = smallest[:, 1] if hi > lo else a
        thresholds = _numpy_lerp(a, b, gamma)
        counts = (self._top > thresholds[:, None]).sum(axis=1)
        return _result_frame(thresholds, counts)


# ------------------------------------------------------------------------------------------------ radix


def _float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving unsigned keys of IEEE floats (finite, no −0.0): ``a < b ⇔ key(a) < key(b)``."""
    uint = _UINT_OF[values.dtype.itemsize]
    bits = values.view(uint)
    sign = uint(1) << uint(8 * values.dtype.itemsize - 1)
    return np.where(bits & sign, ~bits, bits | sign)


def _keys_to_floats(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    uint = _UINT_OF[dtype.itemsize]
    keys = keys.astype(uint)
    sign = uint(1) << uint(8 * dtype.itemsize - 1)
    bits = np.where(keys & sign, keys & ~sign, ~keys)
    return bits.view(dtype)


def _digit_schedule(bits: int, num_targets: int, num_units: int, budget_bytes: int) -> list[int]:
    """Digit widths (most significant first) whose int64 histograms fit the budget, as even as possible."""
    bins = budget_bytes // (8 * num_targets * num_units)
    width = min(16, bits, int(math.log2(bins)) if bins >= 2 else 0)
    if width < 1:
        raise StageInputError(
            f"RadixQuantile: budget_bytes={budget_bytes} cannot hold even a 2-bin histogram for {num_units} units; "
            f"raise it to at least {16 * num_targets * num_units}"
        )
    passes = math.ceil(bits / width)
    base, extra = divmod(bits, passes)
    return [base + 1] * extra + [base] * (passes - extra)


def _add_counts(histogram: np.ndarray, keys: np.ndarray) -> None:
    """``histogram[k] += #(keys == k)`` in place (1-D); sorts instead of scanning every bin when keys are few."""
    if keys.size * 16 >= histogram.size:
        histogram += np.bincount(keys, minlength=histogram.size)
    else:
        values, repeats = np.unique(keys, return_counts=True)
        histogram[values] += repeats  # values are distinct


class RadixQuantile(StreamingStatistic):
    """Exact per-unit top-quantile threshold by multi-pass radix select; memory set by ``budget_bytes``.

    One object is one pass: ``update`` every shard, ``merge`` the shard states, then ``next_pass()`` turns the
    merged histogram into the (empty) statistic of the next pass, until ``done``; ``result()`` then gives the
    same table as :class:`TopQuantile`. Every pass must see the same shards; totals are checked.

    Args:
        num_images: total number of images over all shards.
        quantile: top fraction ``q``; the threshold is ``numpy.quantile(v, 1 - q)``.
        budget_bytes: upper bound on the histogram memory of one pass.
    """

    def __init__(self, num_images: int, quantile: float = DEFAULT_QUANTILE, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.num_images = _check_images(num_images)
        self.quantile = _check_quantile(quantile)
        self.budget_bytes = int(budget_bytes)
        self._layout = _Layout()
        self._pass = 0
        self._schedule: list[int] = []
        # Per target (ascending rank) and unit: key prefix found so far, values above that prefix's bucket,
        # values inside it, and the target's rank inside it.
        self._prefix: np.ndarray | None = None  # (T, C) uint64
        self._above: np.ndarray | None = None  # (T, C) int64
        self._bucket: np.ndarray | None = None  # (T, C) int64
        self._rank: np.ndarray | None = None  # (T, C) int64
        self._hist: np.ndarray | None = None  # (T, C, 2**digit) int64 for the current pass

    # -- geometry
    def _targets(self) -> list[int]:
        lo, hi, gamma = quantile_ranks(self.num_images * int(self._layout.spatial), self.quantile)
        return [lo] if (hi == lo or gamma == 0.0) else [lo, hi]

    @property
    def bits(self) -> int:
        return 8 * np.dtype(self._layout.dtype).itemsize

    @property
    def resolved_bits(self) -> int:
        return sum(self._schedule[: self._pass])

    @property
    def done(self) -> bool:
        """True when the keys are fully resolved and :meth:`result` can be read (no data needed)."""
        return self._layout.known and self.resolved_bits == self.bits

    @property
    def passes(self) -> int:
        """Total passes over the data this layer needs (known after the first batch)."""
        return len(self._schedule)

    def _start(self, num_units: int, spatial: int, dtype: np.dtype) -> None:
        if self._layout.known:
            self._layout.absorb(num_units, spatial, dtype, "RadixQuantile")
            return
        self._layout.absorb(num_units, spatial, dtype, "RadixQuantile")
        targets = np.array(self._targets(), dtype=np.int64)
        self._schedule = _digit_schedule(self.bits, len(targets), num_units, self.budget_bytes)
        shape = (len(targets), num_units)
        self._prefix = np.zeros(shape, dtype=np.uint64)
        self._above = np.zeros(shape, dtype=np.int64)
        self._bucket = np.full(shape, self.num_images * spatial, dtype=np.int64)
        self._rank = np.repeat(targets[:, None], num_units, axis=1)
        self._new_histogram()

    def _new_histogram(self) -> None:
        if self._pass < len(self._schedule):
            targets, units = self._prefix.shape
            self._hist = np.zeros((targets, units, 2 ** self._schedule[self._pass]), dtype=np.int64)
        else:
            self._hist = None

    # -- protocol
    def update(self, acts: np.ndarray) -> None:
        """Histogram one shard ``(N, C, H, W)`` (or ``(N, C)``) for the current pass."""
        values, spatial = _as_unit_values(acts, "RadixQuantile.update")
        self._start(values.shape[0], spatial, values.dtype)
        if self.done:
            raise StageInputError("RadixQuantile.update: all passes are done; read result() instead of adding data")
        width, resolved = self._schedule[self._pass], self.resolved_bits
        uint = _UINT_OF[values.dtype.itemsize]
        digit_shift, mask = uint(self.bits - resolved - width), uint(2**width - 1)
        units, count = values.shape
        rows = max(1, _CHUNK_BYTES // max(1, 24 * count))
        for start in range(0, units, rows):
            stop = min(units, start + rows)
            keys = _float_keys(values[start:stop])
            digits = ((keys >> digit_shift) & mask).astype(np.intp)
            digits += (np.arange(stop - start, dtype=np.intp) * 2**width)[:, None]
            for t in range(self._prefix.shape[0]):
                shared = t and np.array_equal(self._prefix[t, start:stop], self._prefix[t - 1, start:stop])
                if not shared:  # else both ranks are still in the same bucket: same keys
                    if resolved == 0:
                        flat = digits.ravel()
                    else:
                        prefix = self._prefix[t, start:stop].astype(uint)[:, None]
                        flat = digits[(keys >> uint(self.bits - resolved)) == prefix]
                _add_counts(self._hist[t, start:stop].reshape(-1), flat)

    def merge(self, other: Self) -> Self:
        if (other.num_images, other.quantile) != (self.num_images, self.quantile):
            raise StageInputError(
                f"RadixQuantile.merge: states for {self.num_images} images at q={self.quantile} and "
                f"{other.num_images} images at q={other.quantile} cannot be merged"
            )
        if not other._layout.known:
            return self
        if not self._layout.known:
            self._start(other._layout.num_units, other._layout.spatial, np.dtype(other._layout.dtype))
            if other._pass:
                self._pass = other._pass
                self._prefix, self._above = other._prefix.copy(), other._above.copy()
                self._bucket, self._rank = other._bucket.copy(), other._rank.copy()
                self._new_histogram()
        layout = other._layout
        self._layout.absorb(layout.num_units, layout.spatial, np.dtype(layout.dtype), "RadixQuantile")
        if other._pass != self._pass or not np.array_equal(other._prefix, self._prefix):
            raise StageInputError(
                f"RadixQuantile.merge: states of different passes ({self._pass} and {other._pass}) or prefixes; "
                "merge only the shard states of one pass"
            )
        if self._hist is not None:
            self._hist += other._hist
        return self

    def next_pass(self) -> Self:
        """The empty statistic of the next pass, narrowed by this (fully merged) pass's histogram."""
        if not self._layout.known:
            raise StageInputError("RadixQuantile.next_pass: no activations were added in this pass")
        if self.done:
            raise StageInputError("RadixQuantile.next_pass: all passes are done; read result()")
        seen = self._hist.sum(axis=2)
        if not np.array_equal(seen, self._bucket):
            raise StageInputError(
                f"RadixQuantile.next_pass: pass {self._pass} counted {int(seen.min())}..{int(seen.max())} values in the "
                f"current bucket where {int(self._bucket.min())}..{int(self._bucket.max())} were expected; every pass "
                "must see every shard exactly once and num_images must be the true total"
            )
        width = self._schedule[self._pass]
        cumulative = np.cumsum(self._hist, axis=2)
        digit = (cumulative <= self._rank[:, :, None]).sum(axis=2)  # first digit whose cumulative count > rank
        upto = np.take_along_axis(cumulative, digit[:, :, None], axis=2)[:, :, 0]
        inside = np.take_along_axis(self._hist, digit[:, :, None], axis=2)[:, :, 0]

        nxt = type(self)(self.num_images, self.quantile, self.budget_bytes)
        nxt._layout = _Layout(self._layout.num_units, self._layout.spatial, self._layout.dtype)
        nxt._schedule = list(self._schedule)
        nxt._pass = self._pass + 1
        nxt._prefix = (self._prefix << np.uint64(width)) | digit.astype(np.uint64)
        nxt._above = self._above + (self._bucket - upto)
        nxt._rank = self._rank - (upto - inside)
        nxt._bucket = inside
        nxt._new_histogram()
        return nxt

    def to_table(self) -> pa.Table:
        attrs = {
            "kind": "RadixQuantile",
            "num_images": self.num_images,
            "quantile": self.quantile,
            "budget_bytes": self.budget_bytes,
            "pass": self._pass,
            "schedule": self._schedule,
            **self._layout.attrs(),
        }
        arrays = {}
        if self._layout.known:
            arrays = {"prefix": self._prefix, "above": self._above, "bucket": self._bucket, "rank": self._rank}
            if self._hist is not None:  # sparse: a shard fills few of the bins
                nonzero = np.flatnonzero(self._hist)
                arrays |= {"hist_bins": nonzero, "hist_counts": self._hist.reshape(-1)[nonzero]}
        return pack_arrays(arrays, attrs)

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        arrays = {name: array.copy() for name, array in arrays.items()}  # unpacked arrays are read-only views
        if attrs.get("kind") != "RadixQuantile":
            raise StageInputError(f"RadixQuantile.from_table: table holds a {attrs.get('kind')!r} state")
        stat = cls(attrs["num_images"], attrs["quantile"], attrs["budget_bytes"])
        stat._layout = _Layout(attrs["num_units"], attrs["spatial"], attrs["dtype"])
        stat._pass, stat._schedule = int(attrs["pass"]), list(attrs["schedule"])
        if stat._layout.known:
            stat._prefix, stat._above = arrays["prefix"], arrays["above"]
            stat._bucket, stat._rank = arrays["bucket"], arrays["rank"]
            stat._new_histogram()
            if stat._hist is not None:
                stat._hist.reshape(-1)[arrays["hist_bins"]] = arrays["hist_counts"]
        return stat

    def result(self) -> pd.DataFrame:
        """Table ``unit, threshold, count``, once :attr:`done`."""
        if not self.done:
            raise StageInputError(
                f"RadixQuantile.result: {self.resolved_bits} of {self.bits} key bits resolved; run the remaining passes "
                "(update every shard, merge, next_pass) first"
            )
        dtype = np.dtype(self._layout.dtype)
        n = self.num_images * int(self._layout.spatial)
        lo, hi, gamma = quantile_ranks(n, self.quantile)
        values = _keys_to_floats(self._prefix, dtype)
        a = values[0]
        b = values[1] if values.shape[0] > 1 else a
        thresholds = _numpy_lerp(a, b, gamma)
        above_lo, above_hi = self._above[0], self._above[-1]
        if values.shape[0] == 1:
            counts = above_lo  # threshold == v[lo]
        else:
            # Nothing lies strictly between v[lo] and v[hi]: above v[hi] when T == v[hi], else from v[hi] up.
            counts = np.where(thresholds >= b, above_hi, n - hi)
        return _result_frame(thresholds, counts)


# ----------------------------------------------------------------------------------------------- driver


def threshold_method(
    num_images: int,
    shape: tuple[int, int, int],
    dtype: str | np.dtype = "float32",
    quantile: float = DEFAULT_QUANTILE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Literal["topk", "radix"]:
    """``"topk"`` when a :class:`TopQuantile` state for ``shape = (C, H, W)`` fits the budget, else ``"radix"``."""
    c, h, w = shape
    need = topk_state_bytes(_check_images(num_images), h * w, c, np.dtype(dtype).itemsize, _check_quantile(quantile))
    return "topk" if need <= budget_bytes else "radix"


def unit_thresholds(
    shards: Callable[[], Iterable[np.ndarray]],
    num_images: int,
    quantile: float = DEFAULT_QUANTILE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    method: Literal["auto", "topk", "radix"] = "auto",
) -> pd.DataFrame:
    """In-process driver: thresholds of one layer from its activation shards.

    Args:
        shards: called once per pass, returns an iterable of ``(N, C, H, W)`` activation arrays covering
            every image exactly once (e.g. ``lambda: (a for _, a in iter_activation_parts(paths))``).
        num_images: total number of images.
        quantile: top fraction ``q``.
        budget_bytes: memory bound of the state.
        method: ``"auto"`` uses :func:`threshold_method` on the first shard's shape.

    Returns:
        DataFrame ``unit, threshold, count``.
    """
    if method not in ("auto", "topk", "radix"):
        raise StageInputError(f"unit_thresholds: method must be 'auto', 'topk' or 'radix'; got {method!r}")
    iterator = iter(shards())
    first = next(iterator, None)
    if first is None:
        raise StageInputError("unit_thresholds: the shard iterable is empty")
    first = np.asarray(first)
    if method == "auto":
        shape = first.shape[1:] if first.ndim == 4 else (*first.shape[1:2], 1, 1)
        method = threshold_method(num_images, shape, first.dtype, quantile, budget_bytes)
    if method == "topk":
        stat = TopQuantile(num_images, quantile, budget_bytes)
        stat.update(first)
        for acts in iterator:
            stat.update(acts)
        return stat.result()
    stat = RadixQuantile(num_images, quantile, budget_bytes)
    stat.update(first)
    for acts in iterator:
        stat.update(acts)
    while True:
        stat = stat.next_pass()
        if stat.done:
            return stat.result()
        for acts in shards():
            stat.update(acts)
