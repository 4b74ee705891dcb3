"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_tiny_config


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A whole-DAG config that runs in seconds, with its cache and outputs in ``tmp_path``."""
    return write_tiny_config(tmp_path)
