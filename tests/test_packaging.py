"""The distribution claims only the ``repdissect`` import name (no top-level ``datasets`` & co.), and the
default install (without the ``fast`` extra: Numba, polars) runs the whole pipeline."""

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_tiny_config

GENERIC = ("datasets", "pipeline", "stages", "reports", "configs", "core", "cli")


def _installed_distribution() -> md.Distribution:
    # A source checkout may hold a build-time ``repdissect.egg-info`` (it lists *source* files); the
    # installed distribution is the ``.dist-info`` one.
    for dist in md.distributions(name="repdissect"):
        if str(getattr(dist, "_path", "")).endswith(".dist-info"):
            return dist
    pytest.fail("repdissect is not installed (pip install .)")


def test_distribution_provides_no_generic_top_level_module():
    dist = _installed_distribution()
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert not set(top_level) & set(GENERIC), top_level
    for file in dist.files or []:
        parts = file.parts
        if parts and parts[0].endswith((".dist-info", ".egg-info")):
            continue
        assert parts[0] not in GENERIC, f"distribution installs {file} at the top level"
    provided = md.packages_distributions()
    for name in GENERIC:
        assert "repdissect" not in provided.get(name, []), f"top-level {name!r} is provided by repdissect"


@pytest.mark.parametrize("sub", [g for g in GENERIC if g != "configs"])
def test_namespace_subpackages_import(sub):
    module = importlib.import_module(f"repdissect.{sub}")
    assert module.__name__ == f"repdissect.{sub}"


def test_console_script_is_declared():
    eps = _installed_distribution().entry_points
    assert any(ep.name == "repdissect" and ep.value == "repdissect.cli:main" for ep in eps)


#: runs the CLI with Numba and polars absent: not importable, and unknown to ``importlib.util.find_spec``
_WITHOUT_FAST_EXTRA = """
import importlib.abc, importlib.util, sys
ABSENT = {"numba", "polars"}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name.split(".")[0] in ABSENT else real_find_spec(name, *args)
from repdissect.cli import main
code = main(sys.argv[1:])
loaded = sorted(ABSENT & set(sys.modules))
assert not loaded, loaded
sys.exit(code)
"""


def test_pipeline_runs_without_the_fast_extra(tmp_path):
    config = write_tiny_config(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_FAST_EXTRA, "run", str(config), "--no-report"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "computed" in proc.stdout
    assert list((tmp_path / "cache" / "iou").rglob("manifest.json")), "no IoU entry was published"


#: import name -> distribution name, where they differ
_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "distributed": "dask"}
#: optional libraries the code guards (an extra, or an opt-in backend) — never needed by the default install;
#: llvmlite is Numba's own dependency, imported only by the compiled kernels (its intrinsics)
_OPTIONAL = {"numba", "llvmlite", "polars", "openTSNE"}


def test_every_library_the_code_imports_is_a_declared_dependency():
    """A fresh ``pip install .`` must have every third-party module the package imports (anywhere, lazily
    too), unless it is one of the guarded optional ones."""
    import ast
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    imported = set()
    for folder in ("core", "datasets", "stages", "pipeline", "reports", "cli", "configs"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "repdissect"} - _OPTIONAL
    missing = sorted(m for m in third_party if _DISTRIBUTION.get(m, m).lower() not in declared)
    assert not missing, f"imported by the package but not in [project].dependencies: {missing}"
