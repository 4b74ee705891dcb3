"""User-facing errors of the orchestration layer and the set of error types the CLI reports without a traceback.

Every error a user can cause (bad config, bad data, bad weights, unreachable scheduler, unwritable cache)
must end as one message naming the problem, the value received and the fix, and exit code 2. Library
layers raise their own ValueError subclasses (`DatasetError`, `StageInputError`); the CLI catches exactly
the types listed in :data:`USER_ERRORS`, so a genuine bug still shows its traceback.
"""

from __future__ import annotations

from ..datasets._base import DatasetError
from ..stages._errors import StageInputError

__all__ = ["ConfigError", "PipelineError", "CacheError", "USER_ERRORS"]


class ConfigError(ValueError):
    """Invalid configuration: names the key, the value received and what is allowed."""


class PipelineError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (scheduler unreachable, cache not writable, …)."""


class CacheError(PipelineError):
    """A cache entry failed validation (missing file, size or checksum mismatch, bad manifest)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, PipelineError, DatasetError, StageInputError)
