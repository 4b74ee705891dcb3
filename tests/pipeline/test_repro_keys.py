"""Keys hold what changes results: the IoU union convention, the device class and its determinism mode;
the source-change guard names exactly the stages whose science changed."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.pipeline import run, status

from helpers import write_tiny_config


def test_iou_union_is_keyed_and_lite_ious_are_higher_or_equal(tmp_path):
    base = write_tiny_config(tmp_path)
    first = run(base)
    lite = tmp_path / "lite.toml"
    lite.write_text(base.read_text().replace("[iou]\n", '[iou]\nunion = "lite"\n'))
    reasons = [s for s in status(lite) if not s.cached]
    assert {s.stage for s in reasons} == {"iou"}
    assert all('param union: "category-images" → "lite"' in s.reason for s in reasons)
    second = run(lite)
    a = first.tables("iou", "unit_label").sort_values(["instance", "layer", "unit", "label"])
    b = second.tables("iou", "unit_label").sort_values(["instance", "layer", "unit", "label"])
    np.testing.assert_array_equal(a["intersection"], b["intersection"])
    np.testing.assert_array_equal(a["truth"], b["truth"])
    assert (b["activation"].to_numpy() <= a["activation"].to_numpy()).all()
    assert (b["iou"].to_numpy() >= a["iou"].to_numpy() - 1e-15).all()
    assert set(second.tables("iou", "summary")["union"]) == {"lite"}
    assert set(first.tables("iou", "summary")["union"]) == {"category-images"}


def test_status_names_the_changed_module_for_exactly_the_stages_using_it(tmp_path, monkeypatch):
    from repdissect.core import get_stage

    config = write_tiny_config(tmp_path)
    run(config)
    assert all(s.reason == "cached" for s in status(config))
    iou = type(get_stage("iou"))
    recorded = iou.source_hashes()
    assert "_iou.py" in recorded
    monkeypatch.setattr(iou, "source_hashes", classmethod(lambda cls, root=None: {**recorded, "_iou.py": "0" * 64}))
    reasons = {s.node_id: s for s in status(config)}
    warned = {s.stage for s in reasons.values() if "warning" in s.reason}
    assert warned == {"iou"}
    assert all(s.cached for s in reasons.values())
    message = next(s.reason for s in reasons.values() if s.stage == "iou")
    assert message.startswith("cached (warning: _iou.py changed since this entry was computed, but the iou stage "
                              "version was not bumped")
