"""Load (or compile) the IoU tally's compiled kernels in a background thread, off the critical path.

The compiled kernels (``_iou_kernels``, Numba, the optional ``[fast]`` extra) are compiled on their first call
and cached on disk next to the module (or in Numba's user cache directory; where neither is writable, once per
process). Even a cache hit costs about a second (importing Numba, loading and linking the cached machine code),
and a first compile after a fresh install costs 10–30 s on a loaded CPU. :func:`warm_kernels` starts that work
in a daemon thread as a run begins, so it overlaps training and extraction, which come before any tally: by
the time the first shard is counted, the kernels are ready. A tally that starts earlier simply waits for the
same compilation (Numba compiles under one lock, never twice); a failure here is logged and left to the tally,
which reports it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

__all__ = ["warm_kernels"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def warm_kernels() -> threading.Thread | None:
    """Start (once per process) a daemon thread that loads the compiled IoU kernels; returns it.

    Returns ``None`` where Numba is not installed (the tally then counts with torch, nothing to load). Call
    ``.join()`` on the result to wait for it. Idempotent and thread-safe.
    """
    global _thread
    with _lock:
        if _thread is None and importlib.util.find_spec("numba") is not None:
            _thread = threading.Thread(target=_warm, name="repdissect-kernel-warm-up", daemon=True)
            _thread.start()
        return _thread


def _warm() -> None:
    """One tiny tally through the compiled path: the signatures a run uses (float32 maps, int32 labels)."""
    try:
        import numpy as np

        from ..datasets import Batch, Concept
        from ._iou import IoUTally

        for union in ("category-images", "lite"):
            tally = IoUTally([Concept(1, "warm-up", "object", True)], (8, 8), kernel="compiled", union=union)
            batch = Batch(index=np.arange(2, dtype=np.int64), images=np.zeros((2, 3, 1, 1), np.uint8),
                          pixel_labels={"object": np.ones((2, 1, 8, 8), np.int32)},
                          image_labels={"scene": np.zeros((2, 1), np.int32)})
            tally.update(np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4), np.array([20.0]), batch)
    except Exception:  # the tally itself will raise a clear error if the kernels cannot be used
        log.debug("warming the compiled IoU kernels failed", exc_info=True)
