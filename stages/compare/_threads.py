"""One BLAS thread around loops of small matrix products (eigh/SVD of C × C blocks, coordinate descent).

The constraint: on a busy machine, multi-threaded OpenBLAS spends more time waking its threads than computing
on matrices this small (a 256 × 256 ``eigh`` took 1.6 s with two threads on a loaded 2-core machine, 36 ms with
one; the lasso's coordinate loop 5–10× slower). ``threadpoolctl`` is optional: without it nothing is limited
and results are the same, only slower there.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Literal, TypeVar

__all__ = ["one_blas_thread", "with_one_blas_thread"]

_F = TypeVar("_F", bound=Callable[..., Any])


def one_blas_thread(user_api: Literal["blas"] | None = None) -> ContextManager[object]:
    """A context limiting the native thread pools (``user_api="blas"``: only BLAS) to one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api=user_api)


def with_one_blas_thread(fn: _F) -> _F:
    """``fn`` run under :func:`one_blas_thread`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with one_blas_thread():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
