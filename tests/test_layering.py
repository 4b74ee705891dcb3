"""The package order holds: imports flow one way and no package reaches into another's private modules.

Every module of every package is parsed with :mod:`ast` (top-level and function-level imports, relative
and absolute). Two rules:

* no cycle between packages (the order is core ← datasets ← stages ← pipeline ← reports ← cli, written
  in each package's docstring; this test checks acyclicity, and that each import goes down that order);
* no import of another package's private (``_x``) module: cross-package names come from the public
  ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: bottom to top; a package may import only packages listed before it
ORDER = ["core", "datasets", "stages", "pipeline", "reports", "cli"]
PACKAGE = "repdissect"


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return [PACKAGE, *parts]


def _imports(path: Path) -> list[tuple[int, list[str], str]]:
    """``(line, absolute dotted target, source text)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name.split("."), f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            # `from .. import stages` / `from . import _x` name modules in their import list
            for alias in node.names:
                out.append((node.lineno, [*target, alias.name], text))
    return out


def _edges() -> list[tuple[str, str, list[str], str, int, str]]:
    """``(from package, to package, target, file, line, text)`` for every import between two packages."""
    edges = []
    for pkg in ORDER:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, target, text in _imports(path):
                if len(target) < 2 or target[0] != PACKAGE or target[1] not in ORDER or target[1] == pkg:
                    continue
                edges.append((pkg, target[1], target, str(path.relative_to(ROOT)), line, text))
    return edges


EDGES = _edges()


def test_the_scan_sees_the_packages():
    # guards against a scan that finds nothing (and so cannot fail)
    assert {(a, b) for a, b, *_ in EDGES} >= {("stages", "core"), ("pipeline", "stages"), ("cli", "pipeline")}


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {pkg: set() for pkg in ORDER}
    for a, b, *_ in EDGES:
        graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = 2
        return None

    for pkg in ORDER:
        if pkg not in state and (cycle := visit(pkg, [])):
            start = cycle.index(cycle[-1])
            loop = cycle[start:]
            culprits = dict.fromkeys(f"  {f}:{n}: {t}" for a, b, _, f, n, t in EDGES
                                     if any(a == x and b == y for x, y in zip(loop, loop[1:])))
            pytest.fail(f"package import cycle {' -> '.join(loop)}:\n" + "\n".join(culprits))


def test_imports_go_down_the_package_order():
    upward = list(dict.fromkeys(f"  {f}:{n}: {t}  ({a} is below {b} in {' <- '.join(ORDER)})"
                                for a, b, _, f, n, t in EDGES if ORDER.index(b) > ORDER.index(a)))
    assert not upward, "imports going up the package order:\n" + "\n".join(upward)


def test_no_import_of_another_packages_private_module():
    private = list(dict.fromkeys(f"  {f}:{n}: {t}" for _, _, target, f, n, t in EDGES
                                 if any(part.startswith("_") for part in target[2:])))
    assert not private, ("imports of another package's private module (import the name from the package's "
                         "__init__ instead):\n" + "\n".join(private))
