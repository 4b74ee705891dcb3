"""A whole-DAG run (training, extraction, tallies, comparison, activation maximisation, t-SNE) never imports
torch's compiler stack: ``torch._dynamo`` and what it pulls in (inductor, sympy, triton) cost ~150 MB resident,
more than a small run holds of its own (see benchmarks/README.md, "Memory")."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import write_tiny_config

#: modules the pipeline must not load: torch.optim.Optimizer's methods and torch.use_deterministic_algorithms
#: import the first two, and they import the rest
COMPILER_STACK = ("torch._dynamo", "torch._inductor", "sympy", "triton")

SCRIPT = """
import json, sys
from repdissect.pipeline import run
result = run(sys.argv[1])
stages = sorted({n.stage for n in result.plan.nodes if not result.results[n.key].hit})
print(json.dumps({"stages": stages, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("sympy", "triton")
                  or m.startswith(("torch._dynamo", "torch._inductor")))}))
"""


def test_a_whole_run_does_not_import_the_torch_compiler_stack(tmp_path):
    config = write_tiny_config(tmp_path, images=60, shard=30)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # the run computed the stages that use an optimizer or set deterministic algorithms
    assert {"train", "activation_max", "extract", "iou", "tsne"} <= set(report["stages"]), report["stages"]
    assert report["loaded"] == [], f"imported {report['loaded'][:10]} (of {COMPILER_STACK})"
