"""The source-change guard: docstring-free fingerprints of exactly the modules each stage declares."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

import repdissect.stages
from repdissect.core import get_stage, list_stages, source_fingerprint

STAGES_DIR = Path(repdissect.stages.__file__).parent

BASE = '''"""Module docstring."""

import math


def area(r):
    """Area of a disc."""
    return math.pi * r ** 2  # the formula


class Shape:
    """A shape."""

    def scale(self, k):
        return k
'''


@pytest.mark.parametrize("edited, same", [
    (BASE.replace('"""Module docstring."""', '"""Reworded, longer\n\nmodule docstring."""'), True),
    (BASE.replace('"""Area of a disc."""', '"""The area πr² of a disc of radius r."""'), True),
    (BASE.replace('"""A shape."""\n', ""), True),
    (BASE.replace("# the formula", "# see any geometry book"), True),
    (BASE.replace("    return math.pi * r ** 2", "\n    return math.pi * r**2\n"), True),
    (BASE.replace("r ** 2", "r ** 3"), False),
    (BASE.replace("return k", "return 2 * k"), False),
    (BASE + "\nLIMIT = 3\n", False),
    (BASE.replace('"""Area of a disc."""', "x = 'Area of a disc.'"), False),  # a string statement that is code
], ids=["module-doc", "function-doc", "class-doc-removed", "comment", "layout", "constant", "method", "new-name",
        "assigned-string"])
def test_fingerprint_ignores_documentation_only(edited, same):
    assert (source_fingerprint(edited) == source_fingerprint(BASE)) is same


def test_fingerprint_can_leave_out_classes():
    edited = BASE.replace("return k", "return 2 * k")
    assert source_fingerprint(edited, drop_classes=["Shape"]) == source_fingerprint(BASE, drop_classes=["Shape"])


def _copy_sources(tmp_path: Path) -> Path:
    root = tmp_path / "stages"
    shutil.copytree(STAGES_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def builtin_stages() -> list[str]:
    """The stages declared in the package (tests register their own stages too)."""
    return [n for n in list_stages() if type(get_stage(n)).__module__.startswith("repdissect.stages.")]


def _flagged(root: Path) -> set[str]:
    """Stages whose fingerprints over the copy ``root`` differ from those of the installed sources."""
    return {name for name in builtin_stages() if type(get_stage(name)).source_hashes(root)
            != type(get_stage(name)).source_hashes()}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) >= 1, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _append_code(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n_GUARD_TEST_CONSTANT = 1\n", encoding="utf-8")


def _first_function_docstring(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node, clean=False):
            return ast.get_docstring(node, clean=False)
    raise AssertionError(f"no documented function or class in {path}")


@pytest.mark.parametrize("module, expected", [
    ("_iou.py", {"iou"}),
    ("_iou_kernels.py", {"iou"}),
    ("_thresholds.py", {"thresholds"}),
    ("_stability.py", {"stability", "stability_center"}),
    ("compare/_regression.py", {"compare"}),
    ("compare/_samples.py", {"moments"}),
    ("compare/_moments.py", {"moments", "compare", "cka", "similarity", "sensitivity"}),
    ("_activations.py", {"extract", "thresholds", "iou", "stability", "moments", "cka", "dataset_search",
                         "activation_max", "filters", "tsne", "attribute", "attribution_mass", "similarity",
                         "sensitivity"}),
    ("_training.py", {"train", "extract", "activation_max", "filters", "tsne", "attribute", "attribution_mass"}),
    ("_topk.py", {"thresholds", "stability", "stability_center", "dataset_search", "activation_max", "filters",
                  "tsne"}),
    ("attribution/_lrp.py", {"attribute", "attribution_mass"}),
])
def test_a_code_edit_flags_exactly_the_stages_using_the_module(tmp_path, module, expected):
    root = _copy_sources(tmp_path)
    assert _flagged(root) == set()
    _append_code(root / module)
    assert _flagged(root) == expected


@pytest.mark.parametrize("module", ["_iou.py", "_stage_dissect.py", "compare/_cca.py", "_extraction.py"])
def test_documentation_edits_flag_nothing(tmp_path, module):
    root = _copy_sources(tmp_path)
    path = root / module
    doc = _first_function_docstring(path)
    _edit(path, doc, doc + "\n\n        A sentence added by the test.\n        ")
    text = path.read_text(encoding="utf-8")
    path.write_text("# a comment added by the test\n" + text.replace('"""', '"""Reworded. ', 1), encoding="utf-8")
    assert _flagged(root) == set()


def test_an_edit_to_one_stage_class_does_not_flag_its_neighbours(tmp_path):
    root = _copy_sources(tmp_path)
    _edit(root / "_stage_dissect.py", 'tables={"thresholds": stat.result()}',
          'tables={"thresholds": stat.result().slice(0)}')
    assert _flagged(root) == {"thresholds"}


# error types, the lazy importer and the allocator settings (mallopt / malloc_trim) cannot change a number
_NOT_SCIENCE = {"_errors.py", "_lazy.py", "_allocator.py"}


def _relative_imports(path: Path) -> set[str]:
    """Modules (POSIX paths under the stages directory) that ``path`` imports relatively or lazily."""
    here = path.parent.relative_to(STAGES_DIR)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        names: list[tuple[int, str]] = []
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module:
                names.append((node.level, node.module))
            else:
                names += [(node.level, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "LazyModule":
            m = re.fullmatch(r"(\.+)(.*)", node.args[0].value)
            if m is not None:  # an absolute name (a third-party library loaded lazily) is not stage science
                names.append((len(m.group(1)), m.group(2)))
        for level, name in names:
            base = here
            for _ in range(level - 1):
                base = base.parent
            if base.parts and base.parts[0] == "..":
                continue
            rel = base.joinpath(*name.split("."))
            if (STAGES_DIR / rel).is_dir():
                rel = rel / "__init__.py"
            else:
                rel = rel.with_suffix(".py")
            if (STAGES_DIR / rel).is_file():
                out.add(rel.as_posix())
    return out


@pytest.mark.parametrize("stage", builtin_stages())
def test_declared_dependencies_are_closed_under_import(stage):
    """Every module a declared dependency imports from the stages package is declared too, so an edit
    anywhere below a stage's science is seen."""
    files = type(get_stage(stage)).source_files()
    declared = set(files)
    own = Path(type(get_stage(stage)).__module__.replace(".", "/")).name + ".py"
    for name in sorted(declared - {own}):
        missing = _relative_imports(STAGES_DIR / name) - declared - _NOT_SCIENCE
        assert not missing, f"stage {stage!r}: {name} imports {sorted(missing)}, which its depends_on omits"


def test_declaring_modules_imports_are_declared_by_some_stage():
    for module in sorted({type(get_stage(s)).__module__ for s in builtin_stages()}):
        stages = [s for s in builtin_stages() if type(get_stage(s)).__module__ == module]
        declared = set().union(*(type(get_stage(s)).source_files() for s in stages))
        path = STAGES_DIR / (module.rsplit(".", 1)[1] + ".py")
        for imported in _relative_imports(path) - _NOT_SCIENCE:
            if imported.endswith("__init__.py"):  # a package: some module of it must be declared
                assert any(d.startswith(imported[: -len("__init__.py")]) for d in declared), (module, imported)
            else:
                assert imported in declared, f"{module} imports {imported}, which none of its stages declares"
