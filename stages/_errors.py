"""Errors a stage raises for bad *input* (as opposed to bugs): the CLI reports them in one line, exit 2."""

from __future__ import annotations

__all__ = ["StageInputError"]


class StageInputError(ValueError):
    """Bad input to a stage or a math function: the message names the problem, the value and the fix."""
