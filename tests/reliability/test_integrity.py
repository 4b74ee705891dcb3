"""Integrity: a damaged cache entry is reported, quarantined and recomputed — never trusted.

Starting from a complete cache of the tiny config, each case damages one file of one entry the way disks
and interrupted copies do (truncation, a flipped byte, appended bytes, a missing file, a broken or foreign
manifest). The next run (sha256 checked when configured, sizes always) must quarantine exactly that entry
with a reason, recompute exactly that node — downstream keys do not change — and end with results equal to
the undamaged run. ``repdissect verify`` finds a flipped byte that a size check cannot see.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from repdissect.pipeline import CacheStore, run
from repdissect.core import MANIFEST

from reliability_support import TINY, assert_same_results, cache_tables, entry_names, run_cli, write_config


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 7)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


def _manifest_garbage(path: Path) -> None:
    (path.parent / MANIFEST).write_text('{"manifest_schema": 1, "key": ')


def _manifest_missing(path: Path) -> None:
    (path.parent / MANIFEST).unlink()


def _manifest_foreign_key(path: Path) -> None:
    manifest = path.parent / MANIFEST
    data = json.loads(manifest.read_text())
    data["key"] = "0" * 64
    manifest.write_text(json.dumps(data))


def _manifest_without_sizes(path: Path) -> None:
    manifest = path.parent / MANIFEST
    data = json.loads(manifest.read_text())
    for info in data["files"].values():
        del info["bytes"]
    manifest.write_text(json.dumps(data))


def _manifest_unlisted_part(path: Path) -> None:
    manifest = path.parent / MANIFEST
    data = json.loads(manifest.read_text())
    del data["files"][path.name]  # the table still names the file, but nothing vouches for it
    manifest.write_text(json.dumps(data))


# (damage, file it hits, needs sha256 to be seen, what the quarantine reason says)
CASES: list[tuple[Callable[[Path], None], str, bool, str]] = [
    (_truncate, "train:model.pt", False, "truncated"),
    (_truncate, "extract:activations@conv2/part-00001.parquet", False, "truncated"),
    (_flip, "thresholds:thresholds.parquet", True, "sha256"),
    (_flip, "extract:activations@conv2/part-00000.parquet", True, "sha256"),
    (_flip, "train:model.pt", True, "sha256"),
    (_append, "iou:units.parquet", False, "bytes"),
    (_empty, "moments:train.parquet", False, "bytes"),
    (_delete, "compare:summary.parquet", False, "missing"),
    (_manifest_garbage, "cka:cka.parquet", False, "unreadable"),
    (_manifest_missing, "stability:units.parquet", False, "manifest.json is missing"),
    (_manifest_foreign_key, "stability_center:summary.parquet", False, "does not match"),
    (_manifest_without_sizes, "thresholds:thresholds.parquet", False, "malformed"),
    (_manifest_unlisted_part, "iou:summary.parquet", False, "malformed"),
]


def _copy_cache(reference_config: Path, target: Path) -> Path:
    source = reference_config.parent / "cache"
    shutil.copytree(source, target / "cache")
    return write_config(target, TINY)


def _entry_file(cache: Path, spec: str) -> tuple[str, str, Path]:
    stage, name = spec.split(":", 1)
    store = CacheStore(cache)
    for entry_stage, key, path in store.iter_entries():
        if entry_stage == stage and (path / name).is_file():
            return stage, key, path / name
    raise AssertionError(f"no {stage} entry holds {name}")


@pytest.mark.parametrize("damage,target,needs_sha,reason", CASES,
                         ids=[f"{c[0].__name__.strip('_')}-{c[1].split(':')[0]}" for c in CASES])
def test_damaged_entry_is_quarantined_and_recomputed(tiny_reference, tmp_path, caplog, damage, target, needs_sha,
                                                     reason):
    config = _copy_cache(tiny_reference.config, tmp_path)
    cache = tmp_path / "cache"
    stage, key, path = _entry_file(cache, target)
    damage(path)
    caplog.set_level("WARNING", logger="repdissect.cache")

    # a same-size flip passes the size check: only the sha256 check ([execution].verify_checksums) sees it
    result = run(_with_checksums(config) if needs_sha else config)

    recomputed = sorted(f"{r.node.stage}/{k}" for k, r in result.results.items() if not r.hit)
    assert recomputed == [f"{stage}/{key}"], "exactly the damaged node is recomputed"
    quarantined = list((cache / "_quarantine").iterdir())
    assert len(quarantined) == 1
    why = (quarantined[0] / "QUARANTINE_REASON.txt").read_text()
    assert reason in why and key in why
    assert any("quarantined" in r.getMessage() for r in caplog.records), "the damage is reported"
    assert_same_results(tiny_reference.tables, cache_tables(cache), context=target)


def _with_checksums(config: Path) -> Path:
    text = config.read_text().replace("[execution]\n", "[execution]\nverify_checksums = true\n", 1)
    path = config.with_name("checked.toml")
    path.write_text(text)
    return path


def test_verify_command_finds_a_flipped_byte(tiny_reference, tmp_path, capsys):
    config = _copy_cache(tiny_reference.config, tmp_path)
    cache = tmp_path / "cache"
    stage, key, path = _entry_file(cache, "iou:unit_label.parquet")
    code, out, _ = run_cli(["verify", config], capsys)
    assert code == 0 and "0 corrupt" in out
    _flip(path)
    code, out, _ = run_cli(["verify", config], capsys)
    assert code == 1
    assert f"CORRUPT  {stage}/{key[:16]}" in out and "sha256" in out and "1 corrupt" in out
    assert f"{stage}/{key}" not in entry_names(cache)
    result = run(config)
    assert [r.node.stage for r in result.results.values() if not r.hit] == [stage]
    assert_same_results(tiny_reference.tables, cache_tables(cache), context="after verify")


def test_clean_removes_only_stale_temp_and_staging_dirs(tiny_reference, tmp_path):
    import os
    import time

    config = _copy_cache(tiny_reference.config, tmp_path)
    cache = tmp_path / "cache"
    store = CacheStore(cache)
    run(config)  # records a run, so clean keeps every entry
    stage, key, path = _entry_file(cache, "thresholds:thresholds.parquet")
    old_tmp = path.parent.parent / f".tmp-{key[:16]}-old"
    old_staging = cache / "iou" / ".staging-old"
    busy_staging = cache / "iou" / ".staging-busy"  # started long ago, still being written
    for directory in (old_tmp, old_staging, busy_staging / "activations"):
        directory.mkdir(parents=True)
        (directory / "part-00000.parquet").write_bytes(b"x")
    hour_ago = time.time() - 7200
    for item in [old_tmp, old_staging, busy_staging, *old_tmp.rglob("*"), *old_staging.rglob("*")]:
        os.utime(item, (hour_ago, hour_ago))
    os.utime(busy_staging, (hour_ago, hour_ago))  # only its newest file is recent
    removed = store.clean()
    assert set(removed) == {old_tmp, old_staging}
    assert busy_staging.exists() and not old_tmp.exists() and not old_staging.exists()
    assert_same_results(tiny_reference.tables, cache_tables(cache), context="after clean")
