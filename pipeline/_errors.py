"""The orchestration layer's own user error: an invalid configuration.

The shared error types (``PipelineError``, ``CacheError``, ``USER_ERRORS``) live in :mod:`repdissect.core`
so that every layer can raise and catch them without importing the layers above it.
"""

from __future__ import annotations

from ..core import USER_ERRORS, CacheError, PipelineError, UserInputError

__all__ = ["ConfigError", "PipelineError", "CacheError", "USER_ERRORS"]


class ConfigError(UserInputError):
    """Invalid configuration: names the key, the value received and what is allowed."""
