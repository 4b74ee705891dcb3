"""The distribution claims only the ``repdissect`` import name (no top-level ``datasets`` & co.)."""

import importlib
import importlib.metadata as md

import pytest

GENERIC = ("datasets", "pipeline", "stages", "reports", "configs")


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


@pytest.mark.parametrize("sub", GENERIC[:4])
def test_namespace_subpackages_import(sub):
    module = importlib.import_module(f"repdissect.{sub}")
    assert module.__name__ == f"repdissect.{sub}"


def test_console_script_is_declared():
    eps = _installed_distribution().entry_points
    assert any(ep.name == "repdissect" and ep.value == "repdissect.pipeline._cli:main" for ep in eps)
