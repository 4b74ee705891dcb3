"""The torch release the network stages key on: read without importing torch, the same release torch reports."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from repdissect.stages import StageInputError, check_device_params, torch_build


def test_torch_build_names_the_release_torch_itself_reports():
    import torch

    build = torch_build()
    assert build == f"torch {metadata.version('torch')}"
    # The distribution's version and torch.__version__ agree up to the local tag ("+cu130", "+cpu").
    assert build.removeprefix("torch ").split("+")[0] == torch.__version__.split("+")[0]


def test_torch_build_does_not_import_torch():
    code = ("import sys; from repdissect.stages import torch_build; build = torch_build(); "
            "assert build.startswith('torch ') and 'torch' not in sys.modules, build")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_node_keyed_on_another_torch_is_refused():
    here = {"device": "cpu", "determinism": "deterministic", "torch": torch_build()}
    check_device_params(here, "cpu", training=True)
    with pytest.raises(StageInputError, match=r"computed by 'torch 0\.0\.1', but this worker runs 'torch .*'.*install "
                                              r"the same torch on every worker"):
        check_device_params(dict(here, torch="torch 0.0.1"), "cpu", training=False)
