"""Reuse of the per-side matrix factorisations that the similarity metrics recompute many times over.

The constraint: the layer × layer similarity stage scores every metric on 1 + G jackknife replicates and on
B permutation replicates of each layer pair. A permutation of net B's samples changes only the cross block
M_xy; the within-side scatters M_xx and M_yy are the *same matrix* in all B replicates, and the same side is
factorised again by every metric of the CCA family, the shape metrics and Fréchet. Without reuse, the
symmetric eigen-decompositions of those identical matrices were most of the stage's CPU time.

:func:`sym_eigh` returns ``numpy.linalg.eigh`` of a stack (R, p, p) of symmetric matrices, computing each
*distinct* matrix once: replicates are told apart by a 128-bit BLAKE2b digest of their bytes, and a small
least-recently-used table keeps recent results across calls (the metrics of one layer pair run back to back).
:func:`memoised` does the same for any function of one matrix (google/svcca's whitening ``√(pinv(Σ))``).
Results are bit-identical to factorising every replicate: the same LAPACK routine runs on the same bytes,
and identical inputs give identical outputs (the callers run BLAS single-threaded).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from ._lapack import eigh

__all__ = ["sym_eigh", "memoised", "clear_factor_cache"]

#: bytes of cached results kept (least recently used dropped first): a 128 × 128 eigenbasis is 0.13 MB
_CAPACITY_BYTES = 64 << 20
_CACHE: OrderedDict[tuple[str, bytes], tuple[Any, int]] = OrderedDict()
_held = 0
_LOCK = threading.Lock()  # a Dask worker may run several tasks in threads of one process


def clear_factor_cache() -> None:
    """Drop every cached factorisation (tests; memory is bounded by ``_CAPACITY_BYTES`` anyway)."""
    global _held
    with _LOCK:
        _CACHE.clear()
        _held = 0


def _digest(matrix: np.ndarray) -> bytes:
    m = np.ascontiguousarray(matrix)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((m.shape, m.dtype.str)).encode())
    h.update(memoryview(m).cast("B"))
    return h.digest()


def _lookup(tag: str, key: bytes) -> Any:
    with _LOCK:
        hit = _CACHE.get((tag, key))
        if hit is None:
            return None
        _CACHE.move_to_end((tag, key))
        return hit[0]


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 64


def _store(tag: str, key: bytes, value: Any) -> None:
    global _held
    size = _nbytes(value)
    with _LOCK:
        if size > _CAPACITY_BYTES // 4 or (tag, key) in _CACHE:  # huge results are not worth keeping
            return
        _CACHE[(tag, key)] = (value, size)
        _held += size
        while _held > _CAPACITY_BYTES:
            _, (_, dropped) = _CACHE.popitem(last=False)
            _held -= dropped


def memoised(tag: str, matrix: np.ndarray, compute: Callable[[np.ndarray], Any]) -> Any:
    """``compute(matrix)``, reused when the same ``tag`` was computed on a bit-identical matrix recently.

    The cached value is returned as is: callers must not modify it in place.
    """
    key = _digest(matrix)
    hit = _lookup(tag, key)
    if hit is None:
        hit = compute(matrix)
        _store(tag, key, hit)
    return hit


def sym_eigh(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.linalg.eigh`` of a stack (R, p, p) of symmetric matrices, each distinct matrix computed once.

    Returns fresh arrays ``(eigenvalues (R, p) ascending, eigenvectors (R, p, p))``, exactly what
    ``numpy.linalg.eigh(stack)`` returns.
    """
    stack = np.asarray(stack)
    reps, p = stack.shape[0], stack.shape[-1]
    values = np.empty((reps, p), dtype=np.result_type(stack.dtype, np.float64))
    vectors = np.empty((reps, p, p), dtype=values.dtype)
    todo: dict[bytes, list[int]] = {}
    left = np.arange(reps)
    while left.size:  # group bit-identical replicates by comparison, then digest one of each group
        same = (stack[left] == stack[left[0]]).all(axis=(1, 2))
        same[0] = True  # a replicate holding NaN is not equal to itself
        rows, left = left[same], left[~same]
        key = _digest(stack[rows[0]])
        hit = _lookup("eigh", key)
        if hit is not None:
            values[rows], vectors[rows] = hit
        else:
            todo.setdefault(key, []).extend(rows.tolist())
    if todo:
        first = [rows[0] for rows in todo.values()]
        lam, vec = eigh(stack[first])
        for i, (key, rows) in enumerate(todo.items()):
            values[rows], vectors[rows] = lam[i], vec[i]
            _store("eigh", key, (lam[i].copy(), vec[i].copy()))
    return values, vectors
