"""Broden layout: loader on a hand-written fixture, exporter round trip, and every error path."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repdissect.datasets import BrodenDataset, DatasetError, SyntheticWorld, create_dataset, export_broden

IH = IW = 16
SH = SW = 8
CANONICAL = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture"]
SHUFFLED = ["texture", "sh", "image", "part", "scene", "iw", "color", "split", "ih", "object", "material", "sw"]
LABELS = {  # number: (name, category field)
    1: ("red-c", "color(2)"), 2: ("blue-c", "color(1)"), 3: ("car", "object(2)"), 4: ("wheel", "part(2)"),
    5: ("window", "part(1)"), 6: ("fabric", "material(1);object(1)"), 7: ("street-s", "scene(1)"),
    8: ("striped", "texture(2)"), 9: ("dotted", "texture(1)"), 300: ("boat", "object(1)"),
}
CODES = {  # category: [(number, coverage)]
    "color": [(1, 1.5), (2, 0.25)], "object": [(3, 0.5), (300, 0.25), (6, 0.0625)], "part": [(4, 0.25), (5, 0.1)],
    "material": [(6, 0.75)], "scene": [(7, 1.0)], "texture": [(8, 2.0), (9, 1.0)],
}
CATEGORIES = [("color", 1, 2), ("object", 3, 300), ("part", 4, 5), ("material", 6, 6), ("scene", 7, 7),
              ("texture", 8, 9)]


def _layers() -> dict[str, dict[str, list[np.ndarray]]]:
    """Label-map layers per row stem and category (the expected decoded values); every pixel category has
    two layers in some row, and 'boat' (300 ≥ 256) exercises the G byte."""
    red_with_blue = _rect(1, 0, 8, 0, 8)
    red_with_blue[2:4, 2:4] = 2
    return {
        "a": {
            "color": [red_with_blue],
            "object": [_rect(3, 0, 4, 0, 8) + _rect(300, 4, 8, 0, 8), _rect(6, 5, 7, 5, 7)],  # car/boat + fabric
            "part": [_rect(4, 0, 2, 0, 2), _rect(5, 1, 3, 1, 3)],  # overlap: one pixel is wheel and window
            "material": [_rect(6, 5, 7, 5, 7)],
        },
        "b": {"color": [_rect(1, 0, 8, 0, 8), _rect(2, 0, 1, 0, 8)], "part": [_rect(4, 6, 8, 6, 8)]},
        "d": {"object": [_rect(3, 1, 2, 1, 2)], "material": [_rect(6, 3, 4, 3, 4), _rect(6, 0, 1, 0, 1)]},
    }


SCALARS = {"a": {"scene": "7", "texture": "8;9"}, "b": {"texture": "8"}, "c": {}, "d": {}}
SPLITS = {"a": "train", "b": "train", "c": "train", "d": "val"}  # c has no data at all: dropped


def _rect(value, r0, r1, c0, c1):
    out = np.zeros((SH, SW), np.int32)
    out[r0:r1, c0:c1] = value
    return out


def _save_label(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    Image.fromarray(rgb, "RGB").save(path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IH, IW, 3), dtype=np.uint8)


def write_fixture(root: Path, columns: list[str] = SHUFFLED) -> Path:
    (root / "images" / "syn").mkdir(parents=True)
    layers = _layers()
    rows = []
    for k, stem in enumerate("abcd"):
        Image.fromarray(_image(k)).save(root / "images" / "syn" / f"{stem}.png")
        row = {"image": f"syn/{stem}.png", "split": SPLITS[stem], "ih": IH, "iw": IW, "sh": SH, "sw": SW}
        for category in ("color", "object", "part", "material", "scene", "texture"):
            row[category] = SCALARS[stem].get(category, "")
        for category, maps in layers.get(stem, {}).items():
            names = [f"syn/{stem}_{category}_{i + 1}.png" for i in range(len(maps))]
            for name, labels in zip(names, maps):
                _save_label(root / "images" / name, labels)
            row[category] = ";".join(names)
        rows.append(row)
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "category.csv", "w", newline="") as handle:
        handle.write("name,first,last,count,frequency\n")
        for name, first, last in CATEGORIES:
            handle.write(f"{name},{first},{last},{len(CODES[name])},3\n")
    with open(root / "label.csv", "w", newline="") as handle:
        handle.write("number,name,category,frequency,coverage,syns\n")
        for number, (name, category) in LABELS.items():
            handle.write(f"{number},{name},{category},1,0.500000,\n")
    for category, codes in CODES.items():
        with open(root / f"c_{category}.csv", "w", newline="") as handle:
            handle.write("code,number,name,frequency,coverage\n")
            for code, (number, coverage) in enumerate(codes, start=1):
                handle.write(f"{code},{number},{LABELS[number][0]},1,{coverage}\n")
    return root


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    return write_fixture(tmp_path / "broden")


# ------------------------------------------------------------------------------------------------------ loader


@pytest.mark.parametrize("columns", [CANONICAL, SHUFFLED], ids=["canonical-columns", "shuffled-columns"])
def test_loader_decodes_layers_high_labels_and_whole_image_labels(tmp_path, columns):
    data = BrodenDataset(write_fixture(tmp_path / "b", columns))
    assert len(data) == 3  # row c had no data
    assert data.image_size == (IH, IW) and data.seg_size == (SH, SW)
    assert data.layers == {"color": 2, "object": 2, "part": 2, "material": 2, "scene": 0, "texture": 0}
    batch = data.load(np.arange(3))
    layers = _layers()
    for k, stem in enumerate("abd"):
        for category in ("color", "object", "part", "material"):
            expected = np.zeros((2, SH, SW), np.int32)
            for i, labels in enumerate(layers[stem].get(category, [])):
                expected[i] = labels
            assert np.array_equal(batch.pixel_labels[category][k], expected), (stem, category)
    assert (batch.pixel_labels["object"][0, 0] == 300).sum() == 32  # decoded through the G byte
    assert batch.image_labels["scene"].tolist() == [[7], [0], [0]]
    assert batch.image_labels["texture"].tolist() == [[8, 9], [8, 0], [0, 0]]
    expected_images = np.stack([_image(0), _image(1), _image(3)]).transpose(0, 3, 1, 2)
    assert np.array_equal(batch.images, expected_images)
    assert batch.landmarks is None and batch.class_label is None


def test_greyscale_images_are_expanded_to_rgb(fixture_root):
    grey = np.arange(IH * IW, dtype=np.uint8).reshape(IH, IW)
    Image.fromarray(grey, "L").save(fixture_root / "images" / "syn" / "b.png")
    image = BrodenDataset(fixture_root).load(np.array([1])).images[0]
    assert np.array_equal(image, np.stack([grey] * 3))


def test_primary_category_is_the_one_with_largest_coverage(fixture_root):
    data = BrodenDataset(fixture_root)
    assert data.primary_category[6] == "material"  # fabric: material 0.75 > object 0.0625
    assert data.primary_category[300] == "object"
    concepts = {c.label: c for c in data.concepts}
    assert sorted(concepts) == sorted(LABELS)
    assert concepts[6].category == "material" and concepts[6].name == "fabric"
    assert concepts[7].pixel_level is False and concepts[8].category == "texture"
    assert concepts[300].pixel_level is True
    assert data.categories == ["color", "object", "part", "material", "scene", "texture"]
    # With material unselected, fabric's only remaining category is object.
    assert BrodenDataset(fixture_root, categories="object,part").primary_category[6] == "object"


def test_category_selection_and_split_filter(fixture_root):
    data = BrodenDataset(fixture_root, categories=["part", "object"])
    assert data.categories == ["object", "part"]  # category.csv order
    assert len(data) == 3
    batch = data.load(np.arange(3))
    assert set(batch.pixel_labels) == {"object", "part"} and not batch.image_labels
    only_texture = BrodenDataset(fixture_root, categories="texture")
    assert len(only_texture) == 2 and set(only_texture.load(np.arange(2)).image_labels) == {"texture"}
    val = BrodenDataset(fixture_root, split="val")
    assert len(val) == 1
    data = BrodenDataset(fixture_root)
    assert data.split_indices("train").tolist() == [0, 1] and data.split_indices("val").tolist() == [2]


def test_registry_and_digest(fixture_root):
    data = create_dataset("broden", root=str(fixture_root))
    assert data.digest() == BrodenDataset(fixture_root).digest()
    assert data.digest() != BrodenDataset(fixture_root, categories="object").digest()
    with open(fixture_root / "label.csv", "a") as handle:
        handle.write("10,extra,object(1),1,0.1,\n")
    assert BrodenDataset(fixture_root).digest() != data.digest()


def test_resize_option_scales_images_and_label_maps(fixture_root):
    data = BrodenDataset(fixture_root, image_size=32, resize="resize")
    assert data.image_size == (32, 32) and data.seg_size == (16, 16)
    batch = data.load(np.arange(3))
    assert batch.images.shape == (3, 3, 32, 32)
    doubled = np.kron(_layers()["a"]["object"][0], np.ones((2, 2), int))
    assert np.array_equal(batch.pixel_labels["object"][0, 0], doubled)
    with pytest.raises(DatasetError, match=r"index.csv, line 2: .*expected 32×32.*resize='resize'"):
        BrodenDataset(fixture_root, image_size=32)


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("seg_scale", [1, 2])
def test_export_then_load_reproduces_the_generator_exactly(tmp_path, seg_scale):
    world = SyntheticWorld(images=40, size=32, seed=7, seg_scale=seg_scale)
    out = export_broden(world, tmp_path / "export", batch_size=16)
    loaded = BrodenDataset(out)
    assert len(loaded) == 40 and loaded.image_size == world.image_size and loaded.seg_size == world.seg_size
    assert loaded.concepts == world.concepts
    ours, theirs = world.load(np.arange(40)), loaded.load(np.arange(40))
    assert np.array_equal(ours.images, theirs.images)
    assert ours.pixel_labels.keys() == theirs.pixel_labels.keys()
    for key in ours.pixel_labels:
        assert np.array_equal(ours.pixel_labels[key], theirs.pixel_labels[key]), key
    assert np.array_equal(ours.image_labels["scene"], theirs.image_labels["scene"])
    for split in ("train", "val"):
        assert np.array_equal(world.split_indices(split), loaded.split_indices(split))
    assert not list(tmp_path.glob(".*tmp*"))


def test_export_bookkeeping_files_follow_the_reference_format(tmp_path):
    world = SyntheticWorld(images=30, size=32, seed=1)
    out = export_broden(world, tmp_path / "export")
    with open(out / "index.csv") as handle:
        header = next(csv.reader(handle))
    assert header == ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene"]
    batch = world.load(np.arange(30))
    with open(out / "label.csv") as handle:
        labels = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in labels] == [c.label for c in world.concepts]
    for row in labels:
        number = int(row["number"])
        category = next(c.category for c in world.concepts if c.label == number)
        maps = batch.pixel_labels.get(category, batch.image_labels.get(category))
        images_with = int((maps == number).reshape(30, -1).any(axis=1).sum())
        assert row["category"] == f"{category}({images_with})" and int(row["frequency"]) == images_with
        assert "e" not in row["coverage"] and "." in row["coverage"]
    with open(out / "category.csv") as handle:
        categories = {r["name"]: r for r in csv.DictReader(handle)}
    assert categories["scene"]["first"] == str(min(c.label for c in world.concepts if c.category == "scene"))
    assert int(categories["scene"]["frequency"]) == 30  # one scene label per image
    with open(out / "c_part.csv") as handle:
        codes = list(csv.DictReader(handle))
    assert [int(r["code"]) for r in codes] == [1, 2, 3]
    assert [int(r["frequency"]) for r in codes] == sorted((int(r["frequency"]) for r in codes), reverse=True)
    label_png = Image.open(out / "images" / "synthetic" / "000000_object.png")
    assert label_png.mode == "RGB" and label_png.size == (32, 32)


def test_export_refuses_a_non_empty_folder_and_cleans_up_on_failure(tmp_path):
    world = SyntheticWorld(images=5, size=32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(DatasetError, match="not an empty folder"):
        export_broden(world, tmp_path / "busy")

    class Failing(SyntheticWorld):
        def load(self, indices):
            if indices[0] >= 2:
                raise RuntimeError("disk on fire")
            return super().load(indices)

    with pytest.raises(RuntimeError, match="disk on fire"):
        export_broden(Failing(images=5, size=32), tmp_path / "new", batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no half-written export, no temp folder
    (tmp_path / "empty").mkdir()
    assert len(BrodenDataset(export_broden(world, tmp_path / "empty"))) == 5  # an empty folder is fine


# ------------------------------------------------------------------------------------------------ error paths


def _rewrite_index(root: Path, row: int, column: str, value: str) -> None:
    with open(root / "index.csv") as handle:
        rows = list(csv.DictReader(handle))
        columns = list(rows[0])
    rows[row][column] = value
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _corrupt_image(root: Path) -> None:
    (root / "images" / "syn" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def _grey_label(root: Path) -> None:
    Image.fromarray(np.zeros((SH, SW), np.uint8), "L").save(root / "images" / "syn" / "b_color_1.png")


def _small_label(root: Path) -> None:
    _save_label(root / "images" / "syn" / "b_color_1.png", np.ones((SH - 1, SW), np.int32))


def _big_image(root: Path) -> None:
    Image.fromarray(np.zeros((IH + 2, IW, 3), np.uint8)).save(root / "images" / "syn" / "b.png")


def _unknown_png_label(root: Path) -> None:
    _save_label(root / "images" / "syn" / "b_color_1.png", np.full((SH, SW), 301, np.int32))


def _escape_symlink(root: Path) -> None:
    outside = root.parent / "outside.png"
    Image.fromarray(_image(0)).save(outside)
    os.remove(root / "images" / "syn" / "b.png")
    os.symlink(outside, root / "images" / "syn" / "b.png")


def _extra_field(root: Path) -> None:
    text = (root / "index.csv").read_text().splitlines()
    text[2] += ",surplus"
    (root / "index.csv").write_text("\n".join(text) + "\n")


def _bad_label_category(root: Path) -> None:
    text = (root / "label.csv").read_text().replace("3,car,object(2)", "3,car,object")
    (root / "label.csv").write_text(text)


# (mutation, load needed?, expected message fragments)
ERRORS = [
    (lambda r: _rewrite_index(r, 1, "image", "../../outside.png"), False, ["index.csv, line 3", "'..'"]),
    (lambda r: _rewrite_index(r, 1, "image", "/etc/passwd.png"), False, ["index.csv, line 3", "relative"]),
    (_escape_symlink, True, ["index.csv, line 3", "outside the dataset folder"]),
    (lambda r: _rewrite_index(r, 1, "image", "syn/missing.png"), True, ["index.csv, line 3", "does not exist"]),
    (_corrupt_image, True, ["index.csv, line 3", "b.png", "cannot decode"]),
    (_extra_field, False, ["index.csv, line 3", "fields"]),
    (lambda r: _rewrite_index(r, 1, "ih", "sixteen"), False, ["index.csv, line 3", "'ih'", "sixteen"]),
    (lambda r: _rewrite_index(r, 1, "scene", "12"), False, ["index.csv, line 3", "label 12"]),
    (lambda r: _rewrite_index(r, 1, "object", "syn/b.jpg"), False, ["index.csv, line 3", "syn/b.jpg"]),
    (lambda r: _rewrite_index(r, 1, "sh", "4"), False, ["index.csv, line 3", "resize='resize'"]),
    (_grey_label, True, ["index.csv, line 3", "b_color_1.png", "mode 'L'"]),
    (_small_label, True, ["index.csv, line 3", "b_color_1.png", "7×8"]),
    (_unknown_png_label, True, ["index.csv, line 3", "label 301"]),
    (_big_image, True, ["index.csv, line 3", "b.png", "18×16"]),
    (lambda r: os.remove(r / "c_part.csv"), False, ["c_part.csv", "missing"]),
    (_bad_label_category, False, ["label.csv, line 4", "name(count)"]),
    (lambda r: os.remove(r / "index.csv"), False, ["index.csv", "missing"]),
]


@pytest.mark.parametrize("mutate, needs_load, fragments", ERRORS, ids=[
    "dotdot-path", "absolute-path", "symlink-escape", "missing-image", "corrupt-image", "extra-field",
    "non-integer-size", "unknown-scalar-label", "non-png-cell", "row-size-mismatch", "greyscale-label-png",
    "label-png-wrong-shape", "label-above-max", "image-wrong-size", "missing-code-file", "bad-category-item",
    "missing-index",
])
def test_errors_name_the_file_and_row(fixture_root, mutate, needs_load, fragments):
    mutate(fixture_root)
    with pytest.raises(DatasetError) as info:
        data = BrodenDataset(fixture_root)
        assert needs_load, "construction should have failed"
        data.load(np.arange(len(data)))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"categories": "object,weather"}, "weather"),
        ({"categories": 3}, "categories=3"),
        ({"resize": "stretch"}, "resize='stretch'"),
        ({"image_size": "big"}, "image_size='big'"),
        ({"split": "nope"}, "no rows"),
    ],
)
def test_bad_parameters(fixture_root, params, fragment):
    with pytest.raises(DatasetError, match=fragment):
        BrodenDataset(fixture_root, **params)


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        BrodenDataset(tmp_path / "nowhere")
