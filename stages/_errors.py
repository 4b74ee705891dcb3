"""Errors a stage raises for bad *input* (as opposed to bugs): the CLI reports them in one line, exit 2."""

from __future__ import annotations

from ..core import UserInputError

__all__ = ["StageInputError"]


class StageInputError(UserInputError):
    """Bad input to a stage or a math function: the message names the problem, the value and the fix."""
