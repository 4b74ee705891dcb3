"""Named crash points: an armed point kills its process exactly at the chosen hit, an unarmed one does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repdissect.core import CRASH_ENV, CRASH_ONCE_ENV, CRASH_POINTS, crash_point

# Passes five hits of "shard-staged" (where = node0..node4) and one "node-published", printing each as it passes.
# The module is loaded from its file (standard library only), so each child starts in a fraction of a second.
_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("crash", sys.argv[1])
module = sys.modules["crash"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
crash_point = module.crash_point
for i in range(5):
    crash_point("shard-staged", f"extract[node{i}]")
    print(f"staged {i}", flush=True)
crash_point("node-published", "iou[node0]")
print("published", flush=True)
"""


def _run(spec: str | None, once: str | None = None) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, CRASH_ONCE_ENV)}
    if spec is not None:
        env[CRASH_ENV] = spec
    if once is not None:
        env[CRASH_ONCE_ENV] = once
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(_CRASH_MODULE)], env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout.splitlines()


_CRASH_MODULE = Path(__file__).resolve().parents[2] / "core" / "_crash.py"
KILLED = -signal.SIGKILL
ALL = ["staged 0", "staged 1", "staged 2", "staged 3", "staged 4", "published"]


@pytest.mark.parametrize("spec, code, printed", [
    (None, 0, ALL),                                          # unarmed: nothing happens
    ("", 0, ALL),
    ("shard-staged", KILLED, []),                            # first hit
    ("shard-staged#3", KILLED, ["staged 0", "staged 1"]),    # third hit
    ("shard-staged:node4", KILLED, ALL[:4]),                 # the hit whose where-text matches
    ("shard-staged:node1#2", 0, ALL),                        # only one hit matches: no second one
    ("shard-staged:iou", 0, ALL),
    ("node-published", KILLED, ALL[:5]),
    ("node-published:iou, shard-staged#9", KILLED, ALL[:5]),  # several specs
])
def test_an_armed_point_kills_exactly_there(spec, code, printed):
    assert _run(spec) == (code, printed)


def test_once_fires_for_the_first_process_only(tmp_path):
    marker = tmp_path / "crashed"
    assert _run("shard-staged#2", once=str(marker)) == (KILLED, ["staged 0"])
    pid, name, where = marker.read_text().splitlines()
    assert int(pid) > 0 and (name, where) == ("shard-staged", "extract[node1]")
    assert _run("shard-staged#2", once=str(marker)) == (0, ALL)  # the retry passes


@pytest.mark.parametrize("spec, message", [("no-such-point", "unknown crash point"),
                                           ("shard-staged#x", "not an integer")])
def test_a_misspelt_spec_is_refused(monkeypatch, spec, message):
    monkeypatch.setenv(CRASH_ENV, spec)
    with pytest.raises(ValueError, match=message):
        crash_point("shard-staged", "x")


def test_every_listed_point_is_placed_in_the_code():
    root = Path(__file__).resolve().parents[2]
    sources = "\n".join(p.read_text(encoding="utf-8") for pkg in ("core", "pipeline", "reports")
                        for p in (root / pkg).glob("*.py"))
    for name in CRASH_POINTS:
        assert f'crash_point("{name}"' in sources, f"crash point {name!r} is listed but never placed"
