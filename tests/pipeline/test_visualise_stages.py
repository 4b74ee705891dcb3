"""The visualisation stages in a whole run: dataset search == argsort of the summaries, any sharding; AM, filters,
t-SNE entries; the report's unit cards carry the AM image; `repdissect visualise` writes the figures."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from helpers import write_tiny_config
from repdissect.cli import main
from repdissect.pipeline import run
from repdissect.stages import read_summaries, table_images


def test_visualise_stages_in_a_run(tmp_path, capsys):
    result = run(write_tiny_config(tmp_path))
    search = dict(((lab["instance"], lab["layer"]), e) for lab, e in result.entries("dataset_search"))
    extract = dict((lab["instance"], e) for lab, e in result.entries("extract"))
    assert set(search) == {(name, "conv2") for name in extract}  # every instance
    # top-k == a stable argsort of every image's maximum (ties → smaller image index)
    inst = "cnn@s0"
    s = [read_summaries(pq.read_table(p)) for p in extract[inst].parts("summaries@conv2")]
    ids, maxima = np.concatenate([x.image for x in s]), np.concatenate([x.max for x in s]).astype(np.float64)
    top = search[(inst, "conv2")].frame("top")
    k = int(top["rank"].max()) + 1
    for unit, rows in top.groupby("unit"):
        order = np.argsort(-maxima[:, unit], kind="stable")[:k]
        np.testing.assert_array_equal(rows.sort_values("rank")["image"], ids[order])
    maps = search[(inst, "conv2")].frame("maps")
    assert len(maps) == len(top) and np.allclose([max(m) for m in maps["map"]], top["value"], rtol=1e-3)

    am = dict(((lab["instance"], lab["layer"]), e) for lab, e in result.entries("activation_max"))
    assert set(am) == {("cnn@s0", "conv2"), ("cnn@s0", "logits")}  # first seed, trained only; + class models
    units = am[("cnn@s0", "conv2")].frame("units")
    images = table_images(am[("cnn@s0", "conv2")].frame("images"))
    assert len(units) == len(images) == 8 and images[0].shape == (32, 32, 3)
    classes = am[("cnn@s0", "logits")].frame("units")
    assert list(classes["unit"]) == list(range(len(classes))) and len(classes) >= 2  # one image per class
    assert "dataset_max" not in classes and (units["activation_max"] > 0).all()
    assert {lab["instance"] for lab, _ in result.entries("filters")} == {"cnn@s0", "cnn@s0-random"}
    points = result.tables("tsne", "points")
    assert set(points["instance"]) == {"cnn@s0", "cnn@s0-random"} and (points.groupby("instance").size() == 60).all()

    assert main(["visualise", str(tmp_path / "tiny.toml"), "--dream", "3", "--octaves", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    figs = tmp_path / "out" / "figures"
    for name in ("filters.png", "tsne_cnn_conv2.png", "am_cnn_s0_conv2.png", "am_cnn_s0_logits.png",
                 "dream_3_conv2.png"):
        assert (figs / name).is_file(), out
    assert main(["visualise", str(tmp_path / "tiny.toml"), "--dream", "100000"]) == 2


def test_report_cards_carry_the_am_image(tmp_path):
    from repdissect.reports import write_run_report

    result = run(write_tiny_config(tmp_path, quantile=0.05, iou=0.0))
    write_run_report(result)
    cards = sorted((tmp_path / "out").rglob("unit_*.png"))
    assert cards
    strip = Image.open(cards[0])
    k = 5
    # k exemplar cells + gaps + the AM cell (as wide as the strip is high)
    assert strip.width > k * strip.height + strip.height
    html = (tmp_path / "out" / "index.html").read_text()
    assert "tsne_cnn_conv2.png" in html and "filters.png" in html
