"""Per-group mergeable sums for the metrics beyond CKA and their jackknife: :class:`GroupedMoments`, :class:`SubsetRows`.

:class:`GroupedMoments` keeps, for each of G random groups of samples (a sample's group is a hash of its image
id, so groups are exchangeable partitions whatever the sharding), the additive raw sums every moment-based
metric needs: n, Σx (D,), Σxxᵀ (D × D), and the fourth-order per-sample terms of debiased CKA
(Kornblith et al. 2019; Song et al. 2012's unbiased HSIC) per channel block i, j with α_t^i = ‖x_t^i‖²:
Σ_t α^i α^j (L × L) and Σ_t α^i x_t (L × D). Memory is G·(D² + L·D), independent of the number of samples.
Because every sum is additive, the total is Σ_g and the leave-one-group-out state is total − group g
(:meth:`GroupedMoments.states`), vectorised over groups: the jackknife needs no second pass.

Numerics: raw float64 sums (not Chan's centred update) so that removing a group is an exact subtraction;
the centred scatter is formed as Σxxᵀ − n·μμᵀ, which loses about log10(1 + mean²/variance) digits — harmless
for activations whose means are within a few standard deviations of 0 (ReLU maps, pooled features).

:class:`SubsetRows` is a fixed, seeded subset of samples for the measures that need per-sample rows (RSA,
permutation nulls): the ``size`` samples with the smallest seeded hash of their id. Merging keeps the smallest
``size`` of the union, so the subset is the same however images are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self, Sequence

import numpy as np
import pyarrow as pa

from .._errors import StageInputError
from ...core import StreamingStatistic, pack_arrays, unpack_arrays
from ._factor_cache import sym_eigh

__all__ = ["GroupedMoments", "MomentState", "SubsetRows", "hash_ids", "group_of"]


def hash_ids(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded splitmix64 hash of integer ids → uint64 (same id and seed, same hash, on any machine)."""
    x = np.asarray(ids, dtype=np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (int(seed) + 1)) % (1 << 64))
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def group_of(ids: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """Jackknife group (0 … groups − 1) of each id, from a seeded hash (exchangeable, independent of order)."""
    return (hash_ids(ids, seed + 7919) % np.uint64(groups)).astype(np.int64)


@dataclass(frozen=True)
class MomentState:
    """Stacked moment states (R replicates × D channels), the input of every moment-based metric.

    ``n`` (R,), ``mean`` (R, D), ``m2`` (R, D, D) centred scatter Σ(x − μ)(x − μ)ᵀ, ``sq`` (R, L, L) with
    ``sq[r, i, j] = Σ_t a_t^i a_t^j`` for the centred squared norms a_t^i = ‖x_t^i − μ^i‖² of blocks i, j.
    Replicate 0 is the full data, replicates 1 … G leave one group out (see :meth:`GroupedMoments.states`).
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    sq: np.ndarray
    slices: dict[str, slice]
    index: dict[str, int]
    _spectra: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def block(self, name: str) -> slice:
        if name not in self.slices:
            raise StageInputError(f"unknown block {name!r}; blocks are {list(self.slices)}")
        return self.slices[name]

    def spectrum(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Eigen-decomposition of block ``name``'s scatter for every replicate: ``(λ (R, p) in decreasing order,
        clipped at 0; V (R, p, p), columns in the same order)``. Computed once per state and shared by every
        metric that whitens or takes square roots (CCA family, shape metrics, Fréchet distance)."""
        if name not in self._spectra:
            s = self.block(name)
            m = self.m2[:, s, s]
            lam, vec = sym_eigh((m + np.swapaxes(m, 1, 2)) * 0.5)  # identical replicates factorised once
            self._spectra[name] = (np.maximum(lam[:, ::-1], 0.0), vec[:, :, ::-1])
        return self._spectra[name]


class GroupedMoments(StreamingStatistic):
    """Raw sums per jackknife group for named channel blocks sampled together.

    Args:
        sizes: channel count of each block.
        names: a unique name per block.
        groups: number of jackknife groups G (≥ 2; ≥ 10 recommended).
    """

    _KIND = "GroupedMoments"

    def __init__(self, sizes: Sequence[int], names: Sequence[str], groups: int = 10) -> None:
        sizes = [int(s) for s in sizes]
        names = [str(n) for n in names]
        if not sizes or any(s <= 0 for s in sizes) or len(names) != len(sizes) or len(set(names)) != len(names):
            raise StageInputError(f"need one unique name per block of ≥ 1 channel; got names {names}, sizes {sizes}")
        if int(groups) < 2:
            raise StageInputError(f"the jackknife needs at least 2 groups; got groups={groups}")
        self.sizes, self.names, self.groups = sizes, names, int(groups)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._slices = {name: slice(int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(names)}
        dim, blocks = int(offsets[-1]), len(sizes)
        self._count = np.zeros(self.groups, np.int64)
        self._sum = np.zeros((self.groups, dim))
        self._cross = np.zeros((self.groups, dim, dim))
        self._sq = np.zeros((self.groups, blocks, blocks))
        self._sqx = np.zeros((self.groups, blocks, dim))

    @property
    def dim(self) -> int:
        return self._sum.shape[1]

    @property
    def n(self) -> int:
        return int(self._count.sum())

    def update(self, *blocks: Any, group: np.ndarray) -> None:  # type: ignore[override]
        """Fold one batch: ``blocks[i]`` (n, sizes[i]) arrays of the same n samples; ``group`` (n,) ints in [0, G)."""
        if len(blocks) != len(self.sizes):
            raise StageInputError(f"update got {len(blocks)} blocks; this statistic has {len(self.sizes)} ({self.names})")
        arrays = []
        for name, size, block in zip(self.names, self.sizes, blocks):
            arr = np.asarray(block.cpu() if hasattr(block, "cpu") else block, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != size:
                raise StageInputError(f"block {name!r} must be (samples, {size}); got shape {arr.shape}")
            arrays.append(arr)
        rows = {a.shape[0] for a in arrays}
        group = np.asarray(group, dtype=np.int64).reshape(-1)
        if len(rows) != 1 or group.size != arrays[0].shape[0]:
            raise StageInputError(f"blocks and group must have the same rows; got {sorted(rows)} and {group.size}")
        if group.size and (group.min() < 0 or group.max() >= self.groups):
            raise StageInputError(f"group ids must be in [0, {self.groups}); got {group.min()}…{group.max()}")
        x = np.concatenate(arrays, axis=1)
        if not np.isfinite(x).all():
            raise StageInputError("activations contain NaN or inf values; clean or drop those samples first")
        if x.shape[0] == 0:
            return
        norms = np.stack([(a * a).sum(axis=1) for a in arrays], axis=1)  # (n, L): α_t per block
        if (group == group[0]).all():  # one group: no reordering copy
            bounds = np.zeros(self.groups + 1, np.int64)
            bounds[group[0] + 1 :] = group.size
        else:  # one sorting copy, then contiguous per-group views (no fancy-index copy per group)
            order = np.argsort(group, kind="stable")
            x, norms = x[order], norms[order]
            bounds = np.searchsorted(group[order], np.arange(self.groups + 1))
        for g in range(self.groups):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            if hi == lo:
                continue
            xg, ag = x[lo:hi], norms[lo:hi]
            self._count[g] += hi - lo
            self._sum[g] += xg.sum(axis=0)
            self._cross[g] += xg.T @ xg
            self._sq[g] += ag.T @ ag
            self._sqx[g] += ag.T @ xg

    def merge(self, other: Self) -> Self:
        if type(other) is not type(self) or (other.sizes, other.names, other.groups) != (
            self.sizes, self.names, self.groups
        ):
            raise StageInputError(
                f"cannot merge GroupedMoments(sizes={other.sizes}, groups={other.groups}) into "
                f"GroupedMoments(sizes={self.sizes}, groups={self.groups})"
            )
        self._count += other._count
        self._sum += other._sum
        self._cross += other._cross
        self._sq += other._sq
        self._sqx += other._sqx
        return self

    def to_table(self) -> pa.Table:
        arrays = {"count": self._count, "sum": self._sum, "cross": self._cross, "sq": self._sq, "sqx": self._sqx}
        return pack_arrays(arrays, {"kind": self._KIND, "sizes": self.sizes, "names": self.names, "groups": self.groups})

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != cls._KIND:
            raise StageInputError(f"table holds a {attrs.get('kind')!r} statistic, not a {cls._KIND!r}")
        stat = cls(attrs["sizes"], attrs["names"], attrs["groups"])
        stat._count, stat._sum, stat._cross = (np.array(arrays[k]) for k in ("count", "sum", "cross"))
        stat._sq, stat._sqx = np.array(arrays["sq"]), np.array(arrays["sqx"])
        return stat

    def group_sizes(self) -> np.ndarray:
        """(G,) samples per group."""
        return self._count.copy()

    def states(self, jackknife: bool = True) -> MomentState:
        """The full-data state (replicate 0) and, with ``jackknife``, the G leave-one-group-out states.

        Every replicate is total − group (vectorised over groups); groups with no samples are skipped.
        """
        total = (self._count.sum(), self._sum.sum(0), self._cross.sum(0), self._sq.sum(0), self._sqx.sum(0))
        reps = [tuple(t[None] for t in total)]
        if jackknife:
            used = np.flatnonzero(self._count > 0)
            reps.append(
                (
                    total[0] - self._count[used],
                    total[1][None] - self._sum[used],
                    total[2][None] - self._cross[used],
                    total[3][None] - self._sq[used],
                    total[4][None] - self._sqx[used],
                )
            )
        count, sums, cross, sq, sqx = (np.concatenate([r[k] for r in reps]) for k in range(5))
        return _centre(count, sums, cross, sq, sqx, self._slices)


def _centre(
    count: np.ndarray, sums: np.ndarray, cross: np.ndarray, sq: np.ndarray, sqx: np.ndarray, slices: dict[str, slice]
) -> MomentState:
    """Raw sums → centred moments and Σ a^i a^j (the note's expansion of ‖x − μ‖² products), vectorised over R."""
    n = count.astype(np.float64)
    safe = np.where(n > 0, n, 1.0)
    mean = sums / safe[:, None]
    m2 = cross - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
    names = list(slices)
    blocks = len(names)
    # Per block i: Σα^i = tr S_ii, ‖μ^i‖², μ^i·s^i; per pair: Σα^i (x^j·μ^j), μ^iᵀ S_ij μ^j.
    tr = np.stack([np.einsum("rii->r", cross[:, s, s]) for s in slices.values()], axis=1)  # (R, L)
    mu2 = np.stack([(mean[:, s] ** 2).sum(1) for s in slices.values()], axis=1)  # (R, L)
    mus = np.stack([(mean[:, s] * sums[:, s]).sum(1) for s in slices.values()], axis=1)  # (R, L) = n‖μ‖²
    weighted = np.stack([np.einsum("rld,rd->rl", sqx[:, :, s], mean[:, s]) for s in slices.values()], axis=2)
    # weighted[r, i, j] = μ^j · Σ_t α^i x^j_t
    bilinear = np.zeros((count.size, blocks, blocks))
    for i, si in enumerate(slices.values()):
        for j, sj in enumerate(slices.values()):
            if j < i:
                bilinear[:, i, j] = bilinear[:, j, i]
                continue
            bilinear[:, i, j] = np.einsum("ra,rab,rb->r", mean[:, si], cross[:, si, sj], mean[:, sj])
    out = (
        sq
        - 2 * weighted
        + tr[:, :, None] * mu2[:, None, :]
        - 2 * np.swapaxes(weighted, 1, 2)
        + 4 * bilinear
        - 2 * mu2[:, None, :] * mus[:, :, None]
        + mu2[:, :, None] * tr[:, None, :]
        - 2 * mu2[:, :, None] * mus[:, None, :]
        + n[:, None, None] * mu2[:, :, None] * mu2[:, None, :]
    )
    return MomentState(n, mean, m2, out, dict(slices), {name: k for k, name in enumerate(names)})


class SubsetRows(StreamingStatistic):
    """A fixed seeded subset of samples: the ``size`` rows whose id has the smallest seeded hash.

    Args:
        sizes, names: the channel blocks (as :class:`GroupedMoments`).
        size: number of samples kept.
        seed: seed of the hash (a different seed, a different subset).
    """

    _KIND = "SubsetRows"

    def __init__(self, sizes: Sequence[int], names: Sequence[str], size: int = 500, seed: int = 0) -> None:
        if int(size) < 4:
            raise StageInputError(f"the per-sample subset needs at least 4 samples; got size={size}")
        self.sizes, self.names, self.size, self.seed = [int(s) for s in sizes], [str(n) for n in names], int(size), int(seed)
        self._ids = np.zeros(0, np.int64)
        self._keys = np.zeros(0, np.uint64)
        self._rows = np.zeros((0, sum(self.sizes)), np.float64)

    def update(self, *blocks: Any, ids: np.ndarray) -> None:  # type: ignore[override]
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = np.concatenate([np.asarray(b, np.float64) for b in blocks], axis=1)
        if x.shape != (ids.size, sum(self.sizes)):
            raise StageInputError(f"subset update: rows {x.shape} do not match ids ({ids.size}) × {sum(self.sizes)}")
        self._fold(ids, hash_ids(ids, self.seed), x)

    def _fold(self, ids: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> None:
        ids = np.concatenate([self._ids, ids])
        keys = np.concatenate([self._keys, keys])
        rows = np.concatenate([self._rows, rows])
        order = np.lexsort((ids, keys))[: self.size]
        self._ids, self._keys, self._rows = ids[order], keys[order], rows[order]

    def merge(self, other: Self) -> Self:
        if (other.sizes, other.names, other.size, other.seed) != (self.sizes, self.names, self.size, self.seed):
            raise StageInputError("cannot merge subsets of different blocks, sizes or seeds")
        self._fold(other._ids, other._keys, other._rows)
        return self

    def to_table(self) -> pa.Table:
        attrs = {"kind": self._KIND, "sizes": self.sizes, "names": self.names, "size": self.size, "seed": self.seed}
        return pack_arrays({"ids": self._ids, "keys": self._keys, "rows": self._rows}, attrs)

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != cls._KIND:
            raise StageInputError(f"table holds a {attrs.get('kind')!r} statistic, not a {cls._KIND!r}")
        stat = cls(attrs["sizes"], attrs["names"], attrs["size"], attrs["seed"])
        stat._ids, stat._keys = np.array(arrays["ids"]), np.array(arrays["keys"])
        stat._rows = np.array(arrays["rows"]).reshape(-1, sum(stat.sizes))
        return stat

    def rows(self) -> dict[str, np.ndarray]:
        """``{block: (k, size) rows}`` of the subset in id order (k = min(size, samples seen))."""
        order = np.argsort(self._ids, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        return {name: self._rows[order, offsets[i] : offsets[i + 1]] for i, name in enumerate(self.names)}

    @property
    def ids(self) -> np.ndarray:
        return np.sort(self._ids)
