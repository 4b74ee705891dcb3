"""Security: no code runs from user data, dataset paths stay inside their root, reports escape user strings.

The static checks parse every module of the package (``ast``, not grep, so comments and strings do not
count) and refuse the constructs that execute or unpickle data: ``torch.load`` without
``weights_only=True``, ``pickle``/``marshal``/``shelve``/``dill`` loads, ``eval``/``exec``, ``numpy.load``
with ``allow_pickle=True``, ``pandas.read_pickle``, YAML's unsafe loaders and ``shell=True``. Dynamic checks
feed hostile inputs: a checkpoint carrying a payload, index rows pointing outside the dataset, and concept
names full of HTML and LaTeX markup that must come out escaped in the report.
"""

from __future__ import annotations

import ast
import csv
import html
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ["pipeline", "stages", "datasets", "reports"]


def _modules() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNPICKLERS = {"pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "marshal.load", "marshal.loads",
              "shelve.open", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}


def unsafe_calls(source: str, filename: str = "<module>") -> list[str]:
    """Every call in ``source`` that could execute code from data (see the module docstring)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name.endswith("torch.load"):
            if not _is_true(_keyword(node, "weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
        elif name in UNPICKLERS:
            problems.append(f"{where}: {name}")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
            problems.append(f"{where}: {name}()")
        elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
            problems.append(f"{where}: {name}(allow_pickle=True)")
        elif _is_true(_keyword(node, "shell")):
            problems.append(f"{where}: {name}(shell=True)")
    return problems


def test_the_scanner_catches_each_unsafe_construct():
    bad = """
import torch, pickle, numpy as np, subprocess, yaml
torch.load(p)
torch.load(p, weights_only=False)
pickle.loads(b)
eval(text)
exec(text)
np.load(p, allow_pickle=True)
subprocess.run(cmd, shell=True)
yaml.load(text)
"""
    good = "import torch, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n"
    assert len(unsafe_calls(bad)) == 8
    assert unsafe_calls(good) == []


def test_package_never_executes_or_unpickles_data():
    modules = _modules()
    assert len(modules) > 20, "the scan found too few modules; is the layout different?"
    problems = [p for path in modules for p in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert problems == []


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(path, node) for path in _modules() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and _dotted(node.func).endswith("torch.load")]
    assert calls, "expected at least one checkpoint reader"
    assert all(_is_true(_keyword(node, "weights_only")) for _, node in calls)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_readers_refuse_code(tmp_path):
    from repdissect.stages import StageInputError
    from repdissect.stages._models import read_state_dict
    from repdissect.stages._training import load_checkpoint

    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, weights)
    for reader in (read_state_dict, load_checkpoint):
        with pytest.raises(StageInputError, match="weights_only"):
            reader(weights)
    assert not marker.exists()


def test_compare_cli_refuses_pickled_arrays(tmp_path):
    from repdissect.cli import main

    marker = tmp_path / "PWNED"
    path = tmp_path / "a.npy"
    np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    assert main(["compare", str(path), str(path)]) == 2
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ datasets
@pytest.fixture(scope="module")
def broden_template(tmp_path_factory) -> Path:
    from repdissect.datasets import SyntheticWorld, export_broden

    root = tmp_path_factory.mktemp("broden-sec") / "data"
    export_broden(SyntheticWorld(images=4, size=16, seed=0), root)
    return root


@pytest.mark.parametrize("path", ["../secret.png", "images/../../secret.png", "/etc/hostname", "C:/x.png",
                                  "a/../../../secret.png", "..\\secret.png"])
def test_dataset_paths_cannot_leave_the_root(tmp_path, broden_template, path):
    from repdissect.datasets import DatasetError, create_dataset

    root = tmp_path / "data"
    shutil.copytree(broden_template, root)
    (tmp_path / "secret.png").write_bytes((root / "images" / "synthetic" / "000000.png").read_bytes())
    rows = (root / "index.csv").read_text().splitlines()
    cells = rows[1].split(",")
    cells[0] = path
    rows[1] = ",".join(cells)
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="line 2"):
        dataset = create_dataset("broden", root=str(root))
        dataset.load(np.arange(len(dataset)))


def test_image_folder_refuses_links_leaving_the_root(tmp_path):
    from PIL import Image

    from repdissect.datasets import DatasetError, create_dataset

    root = tmp_path / "folder"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "cats" / "b.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        create_dataset("imagefolder", root=str(root), size=8)


# ------------------------------------------------------------------------------------------------ reports
HOSTILE = '<script>alert("x")</script>&\\input{/etc/passwd}_$^#%~{}'


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.handlers = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.handlers += sum(1 for name, _ in attrs if name.lower().startswith("on"))

    def handle_data(self, data):
        self.text.append(data)


def test_hostile_concept_names_are_escaped_in_the_report(tmp_path, broden_template):
    """Concept names come from the dataset's label.csv: they reach tables, the page and LaTeX escaped."""
    from repdissect.pipeline import run
    from repdissect.reports import write_run_report
    from reliability_support import MINIMAL, write_config

    root = tmp_path / "data"
    shutil.copytree(broden_template, root)
    for path in [root / "label.csv", *root.glob("c_*.csv")]:  # every concept name gets the hostile suffix
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**row, "name": row["name"] + HOSTILE} for row in rows)

    def edit(d):
        d["dataset"] = {"kind": "broden", "params": {"root": root.as_posix()}}
        d["iou"] = {"threshold": 0.0}  # every unit gets a (hostile) label

    result = run(write_config(tmp_path, MINIMAL, edit=edit))
    write_run_report(result)
    labels = result.tables("iou", "units")["name"].tolist()
    assert labels and all(HOSTILE in name for name in labels), "the hostile names reached the results"
    page = (result.out_dir / "index.html").read_text(encoding="utf-8")
    parser = _Scripts()
    parser.feed(page)
    assert parser.scripts == 0 and parser.handlers == 0
    assert "<script>alert" not in page and html.escape(HOSTILE, quote=True) in page
    from repdissect.reports import latex_escape, markdown_escape

    tex = {p.name: p.read_text(encoding="utf-8") for p in result.out_dir.rglob("*.tex")}
    assert any(latex_escape(HOSTILE) in source for source in tex.values()), "the names reach a LaTeX table"
    assert not [name for name, source in tex.items() if "\\input{/etc/passwd}" in source or "<script>" in source]
    markdown = [p.read_text(encoding="utf-8") for p in result.out_dir.rglob("*.md")]
    assert any(markdown_escape(HOSTILE) in source for source in markdown)
