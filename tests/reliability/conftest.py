"""Fixtures of the reliability tests; the plain helpers live in ``reliability_support`` next to this file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reliability_support import MINIMAL, TINY, Reference, reference_run, write_config  # noqa: E402


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """``make_config(base=MINIMAL, edit=fn, sub="")`` → a config path whose cache/out live in ``tmp_path``."""

    def make(base: Mapping[str, Any] = MINIMAL, edit: Callable[[dict[str, Any]], None] | None = None,
             sub: str = "") -> Path:
        return write_config(tmp_path / sub if sub else tmp_path, base, edit=edit)

    return make


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Reference:
    """An uninterrupted run of the real command on :data:`TINY`: the results every other run must equal."""
    directory = tmp_path_factory.mktemp("tiny-reference")
    return reference_run(directory, write_config(directory, TINY))
