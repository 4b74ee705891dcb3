"""Shared tools of the reliability tests: tiny configs as TOML, cache comparison, CLI and process drivers.

(Imported by the tests as ``reliability_support``; ``conftest.py`` puts this folder on the path.)

The constraint: these tests kill processes, corrupt files and feed bad input, so every check needs a
trustworthy notion of "the same results" (every table of every entry, by (stage, key), timing columns
dropped) and of "nothing was written" (no entry directory in the cache). Both live here, once.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from repdissect.pipeline import CacheStore
from repdissect.cli import main as cli_main

#: wall-clock columns are records of a run, not results (train history's ``seconds``)
TIMING_COLUMNS = ("seconds",)

#: the smallest config that still exercises every stage: 1 seed + its random-init baseline, 1 layer,
#: several shards per extraction (so resumption at shard level matters)
TINY: dict[str, Any] = {
    "run": {"name": "rel"},
    "dataset": {"kind": "synthetic", "params": {"images": 48, "size": 32, "seed": 0}},
    "models": [{
        "name": "cnn", "architecture": "builtin:cnn", "init": "trained", "seeds": [0], "layers": ["conv2"],
        "random_baseline": True, "arch": {"width": 4, "depth": 2}, "train": {"epochs": 1, "batch_size": 16},
    }],
    "thresholds": {"quantile": 0.02},
    "stability": {"top_k": 8},
    "compare": {"alphas": [0.0, 0.1], "match_thresholds": [0.5]},
    "extract": {"batch_size": 16},
    "execution": {"scheduler": "sync", "workers": 2, "shard_size": 16, "progress": False},
}

#: no training, no comparison, no stability: extraction → thresholds → iou of one random-init network
MINIMAL: dict[str, Any] = {
    "run": {"name": "bad"},
    "dataset": {"kind": "synthetic", "params": {"images": 12, "size": 32, "seed": 0}},
    "models": [{
        "name": "cnn", "architecture": "builtin:cnn", "init": "random", "seeds": [0], "layers": ["conv1"],
        "random_baseline": False, "arch": {"width": 4, "depth": 2},
    }],
    "stability": {"enabled": False},
    "compare": {"pairs": "none", "cka_layers": False},
    "extract": {"batch_size": 6},
    "execution": {"scheduler": "sync", "shard_size": 6, "progress": False},
}


# ------------------------------------------------------------------------------------------------ TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_table(prefix: str, table: Mapping[str, Any], lines: list[str], array: bool = False) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
    lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
    for k, v in table.items():
        if isinstance(v, dict):
            _toml_table(f"{prefix}.{k}", v, lines)
    lines.append("")


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(data: Mapping[str, Any]) -> str:
    """The TOML text of a config dict (top-level tables, ``[[models]]`` arrays, nested sub-tables)."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            _toml_table(key, value, lines)
        elif _is_table_list(value):
            for item in value:
                _toml_table(key, item, lines, array=True)
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(directory: Path, base: Mapping[str, Any], *, name: str = "config.toml",
                 edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write ``base`` (deep-copied, then ``edit``-ed) with cache and outputs inside ``directory``."""
    data = copy.deepcopy(dict(base))
    data["run"] = {**data.get("run", {}), "cache_dir": (directory / "cache").as_posix(),
                   "out_dir": (directory / "out").as_posix()}
    if edit is not None:
        edit(data)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(to_toml(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ caches
def cache_tables(root: Path, *, verify: bool = True) -> dict[tuple[str, str, str], pa.Table]:
    """Every table part of every entry by ``(stage, key, table#part)``, timing columns dropped.

    Each entry is validated against its manifest first (sha256 when ``verify``); an invalid entry fails.
    """
    store = CacheStore(root)
    out: dict[tuple[str, str, str], pa.Table] = {}
    for stage, key, path in store.iter_entries():
        entry = store._validate(path, key, verify)  # raises CacheError: a test failure, never quarantined here
        for table, files in entry.manifest["tables"].items():
            for i, rel in enumerate(files):
                t = pq.read_table(path / rel)
                out[(stage, key, f"{table}#{i}")] = t.drop_columns([c for c in t.column_names if c in TIMING_COLUMNS])
    return out


def assert_same_results(a: Mapping[tuple[str, str, str], pa.Table], b: Mapping[tuple[str, str, str], pa.Table],
                        context: str = "") -> None:
    """Same entries, and every table equal (``pyarrow.Table.equals``, metadata included)."""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    assert not missing and not extra, f"{context}: entries differ; only in first {missing[:5]}, only in second {extra[:5]}"
    differing = [k for k in a if not a[k].equals(b[k], check_metadata=True)]
    assert not differing, f"{context}: {len(differing)} tables differ, e.g. {differing[:3]}"


def non_finite_cells(table: pa.Table) -> dict[str, int]:
    """Count of NaN/inf values per floating column (nested list columns flattened)."""
    bad: dict[str, int] = {}
    for name in table.column_names:
        column = table.column(name)
        values: Any = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
        while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        if pa.types.is_floating(values.type):
            arr = values.to_numpy(zero_copy_only=False)
            count = int(np.count_nonzero(~np.isfinite(arr)))
            if count:
                bad[name] = count
    return bad


def entry_names(root: Path) -> list[str]:
    """``stage/key`` of every entry directory (valid or not) under ``root``."""
    return [f"{stage}/{key}" for stage, key, _ in CacheStore(root).iter_entries()]


def leftovers(root: Path) -> list[Path]:
    """Temp and staging directories left in a cache (``.tmp-*`` next to entries, ``.staging-*`` per stage)."""
    if not root.is_dir():
        return []
    return sorted(list(root.glob("*/.staging-*")) + list(root.glob("*/*/.tmp-*")))


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``repdissect ARGV`` in-process: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_command(*args: Any) -> list[str]:
    """The real console entry point in a fresh interpreter (``python -m repdissect.cli ARGS``)."""
    return [sys.executable, "-m", "repdissect.cli", *[str(a) for a in args]]


def start_run(config: Path, cache: Path, out: Path, *extra: str,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``repdissect run`` in its own process (stdout/stderr to files next to ``out``; ``env``: extra
    environment variables, e.g. an armed crash point)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(
        cli_command("run", config, "--cache", cache, "--out", out, "--no-report", "--no-progress", *extra),
        stdout=open(out / "stdout.txt", "wb"), stderr=open(out / "stderr.txt", "wb"), env=env,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def code_fingerprint() -> str:
    """sha256 over the package's source files: results are only comparable between runs of the same code."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted(p for d in ("pipeline", "stages", "datasets") for p in (root / d).rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Reference:
    config: Path
    tables: dict
    seconds: float  # from the cache directory's appearance to exit
    publishing: tuple[float, float]  # first and last entry's appearance, same clock
    fingerprint: str  # code_fingerprint() when the run started


def reference_run(directory: Path, config: Path) -> Reference:
    """An uninterrupted run of the real command: its tables, and how long it works once its cache exists."""
    cache, out = directory / "cache", directory / "out"
    fingerprint = code_fingerprint()
    proc = start_run(config, cache, out)
    try:
        assert wait_for(lambda: cache.is_dir() or proc.poll() is not None, timeout=300), "the run never started"
        started = time.monotonic()
        published: list[float] = []  # when each entry appeared, relative to ``started``
        while proc.poll() is None:
            published += [time.monotonic() - started] * (len(entry_names(cache)) - len(published))
            time.sleep(0.01)
        code = proc.wait()
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, (out / "stderr.txt").read_text()[-2000:]
    assert leftovers(cache) == []
    return Reference(config=config, tables=cache_tables(cache), seconds=seconds,
                     publishing=(published[0], published[-1]) if published else (0.0, seconds), fingerprint=fingerprint)
