"""A per-process LRU of built networks, so each Dask worker builds (and loads weights into) a model once.

Several worker threads may ask for one model at a time: each key is built by one thread only, and the
extractor's hooks ignore other threads' forward passes, so one cached model serves them all.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from torch import nn

__all__ = ["cached_model", "clear_model_cache"]


_CACHE: collections.OrderedDict[str, nn.Module] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
_BUILD_LOCKS: dict[str, threading.Lock] = {}


def cached_model(key: str, build: Callable[[], nn.Module], *, maxsize: int = 4) -> nn.Module:
    """The model built by ``build()`` for ``key``, built once per process and reused (LRU of ``maxsize``).

    ``key`` must identify the model completely (e.g. the training stage's cache key or the spec digest plus
    the weights digest). Safe for concurrent Dask worker threads: each key is built by one thread only, and
    :class:`Extractor` hooks ignore other threads' forward passes.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        build_lock = _BUILD_LOCKS.setdefault(key, threading.Lock())
    with build_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        model = build()
        with _CACHE_LOCK:
            _CACHE[key] = model
            _CACHE.move_to_end(key)
            while len(_CACHE) > maxsize:
                old, _ = _CACHE.popitem(last=False)
                _BUILD_LOCKS.pop(old, None)
    return model


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once no caller holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _BUILD_LOCKS.clear()
