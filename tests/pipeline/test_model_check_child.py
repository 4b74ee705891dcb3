"""A cluster run's client plans without loading torch: the model check runs in a short-lived child process
there, with the same outcome (and error messages) as in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import write_tiny_config

from repdissect.pipeline import ConfigError, load_config
from repdissect.pipeline import _dag

PROBE = """
import json, sys
from repdissect.pipeline import build_plan, load_config
plan = build_plan(load_config(sys.argv[1]))
print(json.dumps({"nodes": len(plan.nodes), "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("scheduler, torch_loaded", [("local", False), ("sync", True)])
def test_a_cluster_client_plans_without_torch(tmp_path, scheduler, torch_loaded):
    config = write_tiny_config(tmp_path)
    config.write_text(config.read_text().replace('scheduler = "sync"', f'scheduler = "{scheduler}"'))
    assert load_config(config).execution.scheduler == scheduler
    out = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["nodes"] > 0 and report["torch"] is torch_loaded


@pytest.mark.parametrize("layers", [("conv2",), ("nope",)])
def test_the_child_check_matches_the_in_process_one(tmp_path, layers):
    model = load_config(write_tiny_config(tmp_path, layers=layers)).models[0]
    outcomes = []
    for check in (_dag._check_model, _dag._check_model_in_child):
        try:
            check(model, 8, (32, 32))
            outcomes.append(None)
        except ConfigError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] is None) == (layers == ("conv2",))
