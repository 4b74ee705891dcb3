"""Shared checkers for the report tests: a LaTeX syntax checker and an HTML link/escape inspector."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

_UNESCAPED_TEXT = set("_^#~<>")


def latex_problems(source: str) -> list[str]:
    """Problems that would break (or silently corrupt) a LaTeX table; empty when the source is valid.

    Checks: balanced ``\\begin``/``\\end`` with matching names, braces balanced over the document and never
    closed before they open (escaped ``\\{ \\}`` excluded), paired ``$`` per line, no unescaped
    ``_ ^ # ~ < >`` in text mode, ``%`` only as a whole-line comment or the last character of a line (a
    ``%`` from data would comment out the rest of its row), ``&`` only inside ``tabular`` with the column
    count of its spec.
    """
    problems: list[str] = []
    envs: list[str] = []
    columns: list[int] = []
    depth = 0
    for lineno, raw in enumerate(source.splitlines(), 1):
        if raw.lstrip().startswith("%"):
            continue
        # Label keys are not typeset: underscores are legal there.
        line = re.sub(r"\\label\{[^}]*\}", "", raw)
        # Whole commands first: \begin{x}, \end{x}.
        for m in re.finditer(r"\\(begin|end)\{([^}]*)\}(\{([^}]*)\})?", line):
            kind, name = m.group(1), m.group(2)
            if kind == "begin":
                envs.append(name)
                if name == "tabular":
                    spec = m.group(4) or ""
                    columns.append(len(re.findall(r"[lrcpX]", spec)))
            else:
                if not envs or envs[-1] != name:
                    problems.append(f"line {lineno}: \\end{{{name}}} does not close {envs[-1] if envs else 'anything'}")
                else:
                    envs.pop()
                    if name == "tabular":
                        columns.pop()
        in_math = False
        ampersands = 0
        i = 0
        while i < len(line):
            ch = line[i]
            if ch == "\\":
                # A control word or an escaped character: skip it whole.
                m = re.match(r"\\([A-Za-z]+|.)", line[i:])
                i += len(m.group(0)) if m else 1
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth < 0:
                    problems.append(f"line {lineno}: unbalanced '}}'")
                    depth = 0
            elif ch == "$":
                in_math = not in_math
            elif ch == "%" and i == len(line) - 1:
                pass  # an end-of-line comment marker (suppresses the line break's space)
            elif ch == "%":
                problems.append(f"line {lineno}: unescaped % comments out the rest of the line: {raw!r}")
            elif ch == "&":
                if "tabular" not in envs:
                    problems.append(f"line {lineno}: & outside a tabular")
                ampersands += 1
            elif ch in _UNESCAPED_TEXT and not in_math:
                problems.append(f"line {lineno}: unescaped {ch!r} in text mode: {raw!r}")
            i += 1
        if in_math:
            problems.append(f"line {lineno}: unpaired $: {raw!r}")
        if ampersands and columns and ampersands != columns[-1] - 1:
            problems.append(f"line {lineno}: {ampersands + 1} cells but the tabular has {columns[-1]} columns")
    if envs:
        problems.append(f"unclosed environments: {envs}")
    if depth != 0:
        problems.append(f"unbalanced braces at the end ({depth:+d} open)")
    return problems


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, name, value))

    def handle_data(self, data):
        self.text.append(data)


def html_refs(markup: str) -> tuple[list[tuple[str, str, str]], int, str]:
    """``(refs (tag, attr, value), number of <script> elements, visible text)`` of an HTML document."""
    parser = _Refs()
    parser.feed(markup)
    return parser.refs, parser.scripts, "".join(parser.text)


def unresolved_refs(index: Path, refs) -> list[str]:
    """Every ``src``/``href`` that is not an in-page anchor and does not name an existing file next to ``index``."""
    missing = []
    for _tag, _attr, value in refs:
        if value.startswith("#"):
            continue
        parsed = urlparse(value)
        if parsed.scheme not in ("", "file"):
            missing.append(f"{value} (external)")
            continue
        target = Path(unquote(parsed.path)) if parsed.scheme == "file" else index.parent / unquote(parsed.path)
        if not target.is_file():
            missing.append(value)
    return missing


@pytest.fixture
def check_latex():
    return latex_problems


@pytest.fixture
def inspect_html():
    """``inspect(index_path) -> (refs, scripts, text, unresolved)`` for a written page."""

    def inspect(index: Path):
        refs, scripts, text = html_refs(index.read_text(encoding="utf-8"))
        return refs, scripts, text, unresolved_refs(index, refs)

    return inspect


# ------------------------------------------------------------------------------------------------
# A synthetic finished run: real Plan / Node / CacheStore / RunResult objects, stage tables in the
# documented schemas filled with random numbers (compare tables from the real compare_moments).
# ------------------------------------------------------------------------------------------------
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

EVIL_LABEL = '<script>alert("x")</script>'
LAYER_SHAPES = {"conv1": (6, 16, 16), "conv2": (8, 8, 8)}


def _iou_tables(rng, units, concepts, threshold):
    cats = list(dict.fromkeys(c.category for c in concepts))
    label = rng.choice([c.label for c in concepts], size=units)
    by = {c.label: c for c in concepts}
    iou = rng.uniform(0.0, 0.12, size=units)
    iou[0] = 0.0  # a unit without any concept
    table = {"unit": np.arange(units), "label": np.where(iou > 0, label, 0),
             "name": [by[l].name if i > 0 else "" for l, i in zip(label, iou)],
             "category": [by[l].category if i > 0 else "" for l, i in zip(label, iou)],
             "iou": iou, "interpretable": iou > threshold}
    for cat in cats:
        table[f"{cat}_label"] = np.zeros(units, np.int64)
        table[f"{cat}_name"] = [""] * units
        table[f"{cat}_iou"] = np.zeros(units)
    frame = pd.DataFrame(table)
    summary = {"units": units, "interpretable_units": int(frame.interpretable.sum()),
               "unique_detectors_total": int(frame.loc[frame.interpretable, "label"].nunique()),
               "iou_threshold": threshold}
    for cat in cats:
        det = frame.interpretable & (frame.category == cat)
        summary[f"detectors_{cat}"] = int(det.sum())
        summary[f"unique_detectors_{cat}"] = int(frame.loc[det, "label"].nunique())
    return {"units": frame, "summary": pd.DataFrame([summary])}


def build_fake_run(root: Path, *, seeds=(0, 1, 2), images=24, size=32, evil=True, stability=True):
    from repdissect.datasets import Concept, create_dataset
    from repdissect.pipeline import CacheStore, RunResult
    from repdissect.pipeline._config import config_from_dict
    from repdissect.pipeline._dag import Instance, Plan
    from repdissect.pipeline._executor import NodeResult
    from repdissect.core import Node
    from repdissect.stages._activations import activations_table
    from repdissect.stages import summaries_table
    from repdissect.stages.compare import (GroupedMoments, JointMoments, compare_moments, group_of, sensitivity_test,
                                           similarity_table)

    rng = np.random.default_rng(7)
    layers = list(LAYER_SHAPES)
    cfg = config_from_dict({
        "run": {"name": "fake", "cache_dir": str(root / "cache"), "out_dir": str(root / "out")},
        "dataset": {"kind": "synthetic", "params": {"images": images, "size": size, "seed": 0}},
        "models": [{"name": "cnn", "seeds": list(seeds), "layers": layers, "random_baseline": True}],
    })
    spec = {"kind": "synthetic", "params": dict(cfg.dataset.params)}
    dataset = create_dataset("synthetic", **spec["params"])
    concepts = list(dataset.concepts)
    if evil:
        concepts[0] = Concept(concepts[0].label, EVIL_LABEL, concepts[0].category, True)
        concepts[1] = Concept(concepts[1].label, "a_b 50% & #1", concepts[1].category, True)
    store = CacheStore(cfg.run.cache_dir)
    model = cfg.models[0]
    instances = [Instance(model, s, init) for s in seeds for init in ("trained", "random")]
    nodes, results = [], {}
    acts_of: dict[tuple[str, str], np.ndarray] = {}

    def publish(stage, label, tables=None, staged=None, extras=None):
        node = Node(stage=stage, label=label, params={"fake": dict(label)}, version=1)
        entry = store.publish(stage, node.key, {k: (pa.Table.from_pandas(v, preserve_index=False)
                                                    if isinstance(v, pd.DataFrame) else v)
                                                for k, v in (tables or {}).items()},
                              staged=staged, manifest={"extras": extras or {}})
        nodes.append(node)
        results[node.key] = NodeResult(node=node, hit=True, seconds=0.0, entry=entry)

    for s in seeds:
        history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "train_acc": [0.5, 0.8 + s / 100],
                                "val_loss": [1.1, 0.6], "val_acc": [0.45, 0.7 + s / 50], "lr": [0.1, 0.01],
                                "seconds": [1.5, 1.25 + s]})
        publish("train", {"model": "cnn", "seed": str(s)}, {"history": history},
                extras={"final_val_acc": 0.7 + s / 50, "final_train_acc": 0.8 + s / 100, "epochs": 2,
                        "train_seconds": 2.75 + s})
    staging = root / "staging"
    for inst in instances:
        staged, tables = {}, {}
        for layer, (c, h, w) in LAYER_SHAPES.items():
            acts = rng.gamma(1.0, 1.0, size=(images, c, h, w)).astype(np.float32)
            acts_of[(inst.name, layer)] = acts
            for name, maker in (("activations", lambda ids, a: activations_table(ids, a)),
                                ("summaries", lambda ids, a: summaries_table(
                                    ids, a.max(axis=(2, 3)), a.reshape(len(a), c, -1).argmax(-1),
                                    a.mean(axis=(2, 3)), (c, h, w)))):
                paths = []
                for part, sl in enumerate((slice(0, images // 2), slice(images // 2, images))):
                    path = staging / inst.name / f"{name}@{layer}" / f"part-{part:05d}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(maker(np.arange(images)[sl], acts[sl]), path)
                    paths.append(path)
                staged[f"{name}@{layer}"] = paths
            tables[f"units@{layer}"] = pd.DataFrame({"unit": np.arange(c), "mean": acts.mean(axis=(0, 2, 3))})
        tables["shards"] = pd.DataFrame({"shard": [0, 1], "start": [0, images // 2], "stop": [images // 2, images]})
        publish("extract", {"instance": inst.name}, tables, staged=staged)
        for layer in layers:
            label = {"instance": inst.name, "layer": layer}
            acts = acts_of[(inst.name, layer)]
            flat = acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1)
            thr = np.quantile(flat, 0.9, axis=1)
            publish("thresholds", label, {"thresholds": pd.DataFrame(
                {"unit": np.arange(len(thr)), "threshold": thr, "count": (flat > thr[:, None]).sum(1)})})
            publish("iou", label, _iou_tables(rng, acts.shape[1], concepts, cfg.iou.threshold))
            if stability:
                publish("stability", label, {"summary": pd.DataFrame(
                    {"units": [acts.shape[1]], "valid_units": [acts.shape[1] - int(rng.integers(0, 2))],
                     "landmarks": [5], "top_k": [20], "instability": [rng.uniform(0.05, 0.2)]})})
    if stability:
        publish("stability_center", {"dataset": "synthetic"}, {"summary": pd.DataFrame(
            {"units": [1], "valid_units": [1], "landmarks": [5], "top_k": [20], "instability": [0.21]})})

    trained = [i for i in instances if i.init == "trained"]
    pairs = [(a, b, "seed") for k, a in enumerate(trained) for b in trained[k + 1:]]
    randoms = [Instance(model, a.seed, "random") for a in trained]
    pairs += [(a, randoms[(k + 1) % len(trained)], "unrelated") for k, a in enumerate(trained)]
    pairs += [(a, b, "random_pair") for k, a in enumerate(randoms) for b in randoms[k + 1:]]
    pairs += [(a, r, "drift") for a, r in zip(trained, randoms)]
    for a, b, kind in pairs:
        for layer in layers:
            xa = acts_of[(a.name, layer)].transpose(0, 2, 3, 1).reshape(-1, LAYER_SHAPES[layer][0]).astype(float)
            xb = acts_of[(b.name, layer)].transpose(0, 2, 3, 1).reshape(-1, LAYER_SHAPES[layer][0]).astype(float)
            xb = xb + 0.8 * xa[:, ::-1]
            cut = int(0.8 * len(xa))
            tr, ho = JointMoments(xa.shape[1], xb.shape[1]), JointMoments(xa.shape[1], xb.shape[1])
            tr.update(xa[:cut], xb[:cut])
            ho.update(xa[cut:], xb[cut:])
            tables = compare_moments(tr, ho, alphas=[0.0, 0.01, 0.1], thresholds=[0.3, 0.6])
            publish("compare", {"a": a.name, "b": b.name, "kind": kind, "layer": layer}, tables)
        cka = pd.DataFrame([{"layer_a": la, "layer_b": lb, "linear_cka": float(rng.uniform(0.2, 0.9))}
                            for la in layers for lb in layers])
        publish("cka", {"a": a.name, "b": b.name, "kind": kind}, {"cka": cka})
        names = [f"{r}:{layer}" for r in "ab" for layer in layers]
        pooled = [acts_of[(inst.name, layer)].mean(axis=(2, 3)) for inst in (a, b) for layer in layers]
        pooled[len(layers):] = [x + 0.8 * y for x, y in zip(pooled[len(layers):], pooled[:len(layers)])]
        grouped = GroupedMoments([x.shape[1] for x in pooled], names, 5)
        grouped.update(*pooled, group=group_of(np.arange(images), 5))
        sim = similarity_table(grouped, [(x, y) for x in names[:len(layers)] for y in names[len(layers):]],
                               subset={n: x for n, x in zip(names, pooled)}, permutations=9)
        sim["layer_a"], sim["layer_b"] = sim["layer_a"].str.slice(2), sim["layer_b"].str.slice(2)
        publish("similarity", {"a": a.name, "b": b.name, "kind": kind}, {"similarity": sim})
    labels = np.arange(images) % 3
    reps = {layer: {str(i.seed): acts_of[(i.name, layer)].mean(axis=(2, 3)) + labels[:, None] for i in trained}
            for layer in layers}
    summary, detail = sensitivity_test(reps, labels, np.arange(images) % 5 != 4,
                                       ["linear_cka", "procrustes", "cca_mean", "rsa"], steps=3)
    publish("sensitivity", {"model": "cnn"}, {"sensitivity": summary, "sensitivity_rows": detail})
    plan = Plan(config=cfg, dataset_spec=spec, dataset_digest=dataset.digest(), nodes=nodes, instances=instances,
                pairs=pairs)
    return RunResult(plan=plan, results=results, out_dir=Path(cfg.run.out_dir), seconds=1.0, record={})


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory):
    """A synthetic finished run (3 seeds + random baselines, 2 layers) with its report written once."""
    from repdissect.reports import write_report

    from unittest import mock

    root = tmp_path_factory.mktemp("fake-run")
    # Durability is the cache's business, not this fixture's: skip the fsyncs of ~100 publishes.
    with mock.patch("os.fsync"):
        result = build_fake_run(root)
    index = write_report(result)
    return result, index
