"""The error types every layer shares, and :data:`USER_ERRORS`: the ones the CLI reports without a traceback.

Every error a user can cause (bad config, bad data, bad weights, unreachable scheduler, unwritable cache)
must end as one message naming the problem, the value received and the fix, and exit code 2. Each layer
raises its own subclass of :class:`UserInputError` (``ConfigError``, ``DatasetError``, ``StageInputError``);
they live in the core so the executor and the CLI can catch exactly these without importing the layers
above, and a genuine bug still shows its traceback.
"""

from __future__ import annotations

__all__ = ["UserInputError", "PipelineError", "CacheError", "USER_ERRORS"]


class UserInputError(ValueError):
    """Bad input the user can fix; the message names the problem, the value received and the fix."""


class PipelineError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (scheduler unreachable, cache not writable, …)."""


class CacheError(PipelineError):
    """A cache entry failed validation (missing file, size or checksum mismatch, bad manifest)."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserInputError, PipelineError)
