"""The procedural world: determinism, exact masks, landmarks on the object, parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from repdissect.datasets import DatasetError, SyntheticWorld, create_dataset
from repdissect.datasets import synthetic as syn

SHAPE_LABEL = {c.name: c.label for c in SyntheticWorld(images=1).concepts if c.category == "object"}
SHAPE_LABEL_ARRAY = np.array([SHAPE_LABEL[name] for name in syn.SHAPE_NAMES])


def _label(world: SyntheticWorld, name: str) -> int:
    return next(c.label for c in world.concepts if c.name == name)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(images=400, size=64, seed=3)


@pytest.fixture(scope="module")
def batch(world):
    return world.load(np.arange(len(world)))


def _arrays(batch) -> dict[str, np.ndarray]:
    out = {"images": batch.images, "landmarks": batch.landmarks, "visible": batch.landmark_visible,
           "class": batch.class_label}
    out.update({f"pixel/{k}": v for k, v in batch.pixel_labels.items()})
    out.update({f"image/{k}": v for k, v in batch.image_labels.items()})
    return out


# ------------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_digest():
    a, b = SyntheticWorld(images=50, seed=11), SyntheticWorld(images=50, seed=11)
    first, second = _arrays(a.load(np.arange(50))), _arrays(b.load(np.arange(50)))
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].tobytes() == second[key].tobytes(), key
    assert a.digest() == b.digest()


def test_different_seed_gives_different_images_and_digest():
    a, b = SyntheticWorld(images=20, seed=1), SyntheticWorld(images=20, seed=2)
    assert not np.array_equal(a.load(np.arange(20)).images, b.load(np.arange(20)).images)
    assert a.digest() != b.digest()
    assert SyntheticWorld(images=20, seed=1, noise=0).digest() != a.digest()


@pytest.mark.parametrize(
    "subset",
    [np.array([17]), np.array([399, 0, 5, 5, 123]), np.arange(397, 3, -7), np.arange(0, 400)],
    ids=["single", "shuffled-with-repeat", "reversed-stride", "all-crossing-chunks"],
)
def test_any_subset_in_any_order_matches_the_whole(world, batch, subset):
    part = _arrays(world.load(subset))
    whole = _arrays(batch)
    for key, value in part.items():
        assert value.tobytes() == whole[key][subset].tobytes(), key


def test_items_do_not_depend_on_world_length():
    short, long = SyntheticWorld(images=10, seed=5), SyntheticWorld(images=1000, seed=5)
    assert np.array_equal(short.load(np.arange(10)).images, long.load(np.arange(10)).images)


# ----------------------------------------------------------------------------------------- masks versus pixels


def test_label_maps_have_the_documented_layout(world, batch):
    n = len(world)
    assert batch.images.dtype == np.uint8 and batch.images.shape == (n, 3, 64, 64)
    assert {k: v.shape for k, v in batch.pixel_labels.items()} == {
        "color": (n, 1, 64, 64), "object": (n, 1, 64, 64), "part": (n, 2, 64, 64), "material": (n, 1, 64, 64)
    }
    assert all(v.dtype == np.int32 for v in batch.pixel_labels.values())
    assert batch.image_labels["scene"].shape == (n, 1)
    assert batch.landmarks.shape == (n, 5, 2) and batch.landmarks.dtype == np.float32
    assert batch.landmark_visible.dtype == bool and batch.class_label.dtype == np.int64
    by_category = {c.category: set() for c in world.concepts}
    for concept in world.concepts:
        by_category[concept.category].add(concept.label)
    for category, maps in batch.pixel_labels.items():
        assert set(np.unique(maps)) <= by_category[category] | {0}, category
    assert set(np.unique(batch.image_labels["scene"])) <= by_category["scene"]


def test_object_material_and_part_masks_cover_the_same_pixels(batch):
    objects = batch.pixel_labels["object"][:, 0] > 0
    assert np.array_equal(objects, batch.pixel_labels["material"][:, 0] > 0)
    assert np.array_equal(objects, batch.pixel_labels["part"][:, 0] > 0)  # rim/core partition each object
    assert not (batch.pixel_labels["part"][:, 1] > 0)[~objects].any()  # corners only on objects
    assert (batch.pixel_labels["color"] > 0).all()  # every pixel, background included, has a colour


def test_every_concept_occurs_and_classes_are_balanced(world, batch):
    present = set()
    for maps in list(batch.pixel_labels.values()) + list(batch.image_labels.values()):
        present |= set(np.unique(maps).tolist())
    assert {c.label for c in world.concepts} <= present
    counts = np.bincount(batch.class_label, minlength=len(world.class_names))
    assert counts.min() >= 0.5 * len(world) / len(world.class_names)


def test_class_label_is_the_main_objects_shape(world, batch):
    names = {c.label: c.name for c in world.concepts}
    center = np.floor(batch.landmarks[:, 0]).astype(int)
    shown = batch.landmark_visible[:, 0]
    rows = np.flatnonzero(shown)
    at_center = batch.pixel_labels["object"][rows, 0, center[rows, 1], center[rows, 0]]
    assert [names[v] for v in at_center] == [world.class_names[c] for c in batch.class_label[rows]]
    assert shown.mean() > 0.8


def test_shape_material_task_labels_the_main_objects_shape_and_material(world, batch):
    joint = SyntheticWorld(images=len(world), size=64, seed=3, task="shape_material")
    got = joint.load(np.arange(len(joint)))
    assert np.array_equal(got.images, batch.images)  # the task changes labels, never pixels
    assert len(joint.class_names) == len(syn.SHAPE_NAMES) * len(syn.MATERIAL_NAMES)
    assert np.array_equal(got.class_label // len(syn.MATERIAL_NAMES), batch.class_label)
    names = {c.label: c.name for c in joint.concepts}
    center = np.floor(got.landmarks[:, 0]).astype(int)
    rows = np.flatnonzero(got.landmark_visible[:, 0])
    material_at_center = got.pixel_labels["material"][rows, 0, center[rows, 1], center[rows, 0]]
    assert [joint.class_names[c] for c in got.class_label[rows]] == [
        f"{joint.class_names[c].split('_')[0]}_{names[m]}" for c, m in zip(got.class_label[rows], material_at_center)]
    counts = np.bincount(got.class_label, minlength=len(joint.class_names))
    assert counts.min() > 0


def test_the_default_task_leaves_the_world_digest_as_before_the_parameter():
    assert "task" not in SyntheticWorld(images=10).params()
    assert SyntheticWorld(images=10, task="shape").digest() == SyntheticWorld(images=10).digest()
    assert SyntheticWorld(images=10, task="shape_material").digest() != SyntheticWorld(images=10).digest()


def test_object_colours_are_exactly_the_drawn_palette_colour():
    world = SyntheticWorld(images=120, seed=9, noise=0)
    batch = world.load(np.arange(120))
    palette = world.scene_parameters(np.arange(120))["palette"]  # (n, 11, 3) jittered
    expected = np.rint(np.clip(palette, 0, 255)).astype(np.uint8)
    tint_target = np.where(syn.PALETTE @ [0.299, 0.587, 0.114] < 128, 255.0, 0.0)  # pattern: halfway to this
    tinted = np.rint(0.5 * (palette + tint_target[None, :, None])).astype(np.uint8)
    color_index = batch.pixel_labels["color"][:, 0] - 1
    pixels = batch.images.transpose(0, 2, 3, 1)
    rows = np.arange(120)[:, None, None]
    drawn, drawn_tinted = expected[rows, color_index], tinted[rows, color_index]
    on_object = batch.pixel_labels["object"][:, 0] > 0
    plain = (pixels == drawn).all(-1)
    pattern = (pixels == drawn_tinted).all(-1)
    assert (plain | pattern)[on_object].all()
    solid = batch.pixel_labels["material"][:, 0] == _label(world, "solid")
    assert plain[solid].all()
    for material in ("stripes", "dots", "checker"):
        mask = batch.pixel_labels["material"][:, 0] == _label(world, material)
        assert 0.1 < pattern[mask].mean() < 0.7, material
    # Unmodulated scenes: background pixels are exactly their colour too.
    flat_scenes = [_label(world, f"{s}-s") for s in ("plain", "grid", "horizon")]
    flat = np.isin(batch.image_labels["scene"][:, 0], flat_scenes)[:, None, None] & ~on_object
    assert flat.sum() > 10_000
    assert np.array_equal(pixels[flat], drawn[flat])
    # Modulated scenes: each background pixel is a brightness multiple of its colour.
    shaded = ~np.isin(batch.image_labels["scene"][:, 0], flat_scenes)[:, None, None] & ~on_object
    rgb, base = pixels[shaded].astype(float), palette[np.arange(120)[:, None, None], color_index][shaded]
    unsaturated = (rgb < 255).all(axis=1)
    scale = (rgb * base).sum(1) / (base * base).sum(1)
    residual = np.abs(rgb - scale[:, None] * base).max(axis=1)
    assert (residual[unsaturated] <= 1.0 + 0.01 * base.max(1)[unsaturated]).all()
    assert (scale > 0.35).all() and (scale < 1.25).all()


def test_colour_pairs_keep_objects_visible(world):
    p = world.scene_parameters(np.arange(len(world)))
    palette = syn.PALETTE
    assert (np.linalg.norm(palette[p["color"]] - palette[p["background"]], axis=1) > 100).all()
    # The material tint (halfway to white or black) must stand out from the background too.
    target = np.where(palette @ [0.299, 0.587, 0.114] < 128, 255.0, 0.0)
    tinted = 0.5 * (palette[p["color"]] + target[p["color"], None])
    assert (np.linalg.norm(tinted - palette[p["background"]], axis=1) > 60).all()
    assert (p["background"] != p["background2"]).all()


def _polygon_vertices(shape: str, aspect: float) -> np.ndarray | None:
    """Vertices (units of r) of the polygonal shapes, for an independent point-in-polygon check."""
    if shape == "square":
        h = syn._SQUARE_HALF
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "triangle":
        return syn._TRIANGLE
    if shape == "star":
        return syn._STAR
    if shape == "cross":
        length, w = syn._CROSS_LONG, syn._CROSS_HALF_WIDTH
        return np.array([(w, -length), (w, -w), (length, -w), (length, w), (w, w), (w, length), (-w, length),
                         (-w, w), (-length, w), (-length, -w), (-w, -w), (-w, -length)])
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "ellipse":
        angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        return np.stack([syn._ELLIPSE_MAJOR * np.cos(angles), syn._ELLIPSE_MAJOR * aspect * np.sin(angles)], 1)
    return None


def test_object_mask_matches_an_independent_point_in_polygon_test():
    """Two implementations of 'which pixels does the main object cover' must agree up to boundary pixels."""
    world = SyntheticWorld(images=160, seed=4, distractors=0)
    batch = world.load(np.arange(160))
    p = world.scene_parameters(np.arange(160))
    centres = np.stack(np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5, indexing="xy"), -1).reshape(-1, 2)
    checked = 0
    for k in range(160):
        shape = world.class_names[batch.class_label[k]]
        vertices = _polygon_vertices(shape, p["aspect"][k])
        if vertices is None:
            continue
        c, s = np.cos(p["theta"][k]), np.sin(p["theta"][k])
        # object frame (u, v) → image: x = cx + r (u cos θ − v sin θ), y = cy + r (u sin θ + v cos θ)
        xy = np.stack([p["cx"][k] + p["r"][k] * (vertices[:, 0] * c - vertices[:, 1] * s),
                       p["cy"][k] + p["r"][k] * (vertices[:, 0] * s + vertices[:, 1] * c)], 1)
        expected = MplPath(xy).contains_points(centres).reshape(64, 64)
        ours = batch.pixel_labels["object"][k, 0] == SHAPE_LABEL[shape]
        assert (expected != ours).sum() <= 3, (k, shape, (expected != ours).sum())
        checked += 1
    assert checked > 80


def test_parts_rim_is_a_band_along_the_outline_and_corners_sit_at_vertices():
    world = SyntheticWorld(images=60, seed=8, distractors=0)
    batch = world.load(np.arange(60))
    rim = batch.pixel_labels["part"][:, 0] == _label(world, "rim")
    core = batch.pixel_labels["part"][:, 0] == _label(world, "core")
    corner = batch.pixel_labels["part"][:, 1] == _label(world, "corner")
    obj = batch.pixel_labels["object"][:, 0] > 0
    # A core pixel never touches the background (4-neighbourhood); every outline pixel is rim.
    padded = np.pad(obj, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    interior = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    touches_background = obj & ~interior
    assert not (core & touches_background).any()
    assert rim[touches_background].all()
    assert core.sum() > 0.3 * obj.sum()
    has_corners = np.isin(batch.class_label, [world.class_names.index(s) for s in ("square", "triangle", "star")])
    assert (corner.sum(axis=(1, 2))[has_corners] > 0).all()
    round_shapes = np.isin(batch.class_label, [world.class_names.index(s) for s in ("circle", "ellipse")])
    assert (corner.sum(axis=(1, 2))[round_shapes] == 0).all()


def test_seg_scale_samples_the_full_resolution_labels():
    full = SyntheticWorld(images=12, seed=6, seg_scale=1).load(np.arange(12))
    half = SyntheticWorld(images=12, seed=6, seg_scale=2)
    assert half.seg_size == (32, 32) and half.image_size == (64, 64)
    coarse = half.load(np.arange(12))
    assert np.array_equal(coarse.images, full.images)
    for key, maps in full.pixel_labels.items():
        assert np.array_equal(coarse.pixel_labels[key], maps[..., 1::2, 1::2]), key


@pytest.mark.parametrize("size", [32, 96])
def test_other_image_sizes_render(size):
    world = SyntheticWorld(images=20, size=size, seed=1)
    batch = world.load(np.arange(20))
    assert batch.images.shape == (20, 3, size, size)
    assert (batch.pixel_labels["object"] > 0).mean() > 0.05


def test_rotation_bounds_the_main_object_only():
    upright = SyntheticWorld(images=200, seed=1, rotation=0).scene_parameters(np.arange(200))
    assert (upright["theta"] == 0).all()
    assert np.ptp(upright["distractor_theta"][upright["distractor_active"]]) > 5  # distractors turn freely
    tilted = SyntheticWorld(images=200, seed=1, rotation=30).scene_parameters(np.arange(200))["theta"]
    assert np.abs(tilted).max() <= np.radians(30) and np.abs(tilted).max() > np.radians(25)
    free = SyntheticWorld(images=200, seed=1, rotation=180).scene_parameters(np.arange(200))["theta"]
    assert np.abs(free).max() > np.radians(170)


# ------------------------------------------------------------------------------------------------- landmarks


def test_visible_landmarks_are_inside_the_image_and_on_the_main_object(world, batch):
    xy = batch.landmarks
    shown = batch.landmark_visible
    assert ((xy[shown] >= 0) & (xy[shown] < 64)).all()
    px, py = np.floor(xy[..., 0]).astype(int), np.floor(xy[..., 1]).astype(int)
    n, p = np.nonzero(shown)
    main = SHAPE_LABEL_ARRAY[batch.class_label[n]]
    assert np.array_equal(batch.pixel_labels["object"][n, 0, py[n, p], px[n, p]], main)
    assert shown.mean() > 0.85
    assert len(world.landmark_names) == 5


def test_axis_landmarks_sit_on_the_objects_own_axes():
    """top/bottom/left/right are the centre ± 0.45 r along the object's rotated axes (they turn with it)."""
    world = SyntheticWorld(images=80, seed=12, distractors=0, rotation=40)
    index = np.arange(80)
    p = world.scene_parameters(index)
    batch = world.load(index)
    xy = batch.landmarks.astype(np.float64)
    for k, (du, dv) in enumerate([(0, -1), (0, 1), (-1, 0), (1, 0)], start=1):
        c, s = np.cos(p["theta"]), np.sin(p["theta"])
        x = p["cx"] + 0.45 * p["r"] * (du * c - dv * s)
        y = p["cy"] + 0.45 * p["r"] * (du * s + dv * c)
        np.testing.assert_allclose(xy[:, k, 0], x, atol=1e-4)
        np.testing.assert_allclose(xy[:, k, 1], y, atol=1e-4)
    # top and bottom are symmetric about the centre, and so are left and right
    np.testing.assert_allclose(xy[:, 1] + xy[:, 2], 2 * xy[:, 0], atol=1e-3)
    np.testing.assert_allclose(xy[:, 3] + xy[:, 4], 2 * xy[:, 0], atol=1e-3)
    # Without distractors nothing occludes: an in-image landmark is hidden only when its pixel is off the shape.
    inside = ((xy >= 0) & (xy < 64)).all(axis=2)
    assert not (batch.landmark_visible & ~inside).any()
    assert batch.landmark_visible[inside].mean() > 0.9


def test_occluded_landmarks_are_hidden():
    world = SyntheticWorld(images=300, seed=2, distractors=4)
    batch = world.load(np.arange(300))
    xy = batch.landmarks
    inside = ((xy >= 0) & (xy < 64)).all(axis=2)
    hidden_inside = inside & ~batch.landmark_visible
    assert hidden_inside.any()  # some landmarks are covered by distractors
    n, p = np.nonzero(hidden_inside)
    px, py = np.floor(xy[n, p, 0]).astype(int), np.floor(xy[n, p, 1]).astype(int)
    # Landmarks lie on the main object's axes, so a hidden one inside the image is covered by a distractor
    # (rarely, on a thin shape, its pixel centre falls just off the drawn outline).
    assert (batch.pixel_labels["object"][n, 0, py, px] > 0).mean() > 0.9


# ----------------------------------------------------------------------------------------------- bookkeeping


def test_concepts_are_unique_numbered_and_describe_the_world(world):
    concepts = world.concepts
    labels = [c.label for c in concepts]
    assert labels == sorted(labels) == list(range(1, len(labels) + 1))
    assert len({c.name for c in concepts}) == len(concepts)
    assert world.categories == ["color", "object", "part", "material", "scene"]
    assert {c.category: c.pixel_level for c in concepts} == {
        "color": True, "object": True, "part": True, "material": True, "scene": False
    }
    assert all(c.name.endswith("-c") for c in concepts if c.category == "color")
    assert all(c.name.endswith("-s") for c in concepts if c.category == "scene")
    assert world.class_names == [c.name for c in concepts if c.category == "object"]
    info = world.describe()
    assert info["kind"] == "synthetic" and info["concepts"] == len(concepts) and info["classes"] == 8


def test_registry_builds_the_world_and_splits_partition_it():
    world = create_dataset("synthetic", images=30, size=32, seed=1)
    assert isinstance(world, SyntheticWorld) and len(world) == 30
    train, val = world.split_indices("train"), world.split_indices("val")
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(30))
    assert [len(s) for s in world.shards(8)] == [8, 8, 8, 6]


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"images": 0}, "images=0"),
        ({"images": True}, "images=True"),
        ({"images": 2.5}, "images=2.5"),
        ({"size": 8}, "size=8"),
        ({"seed": -1}, "seed=-1"),
        ({"seg_scale": 3}, "seg_scale=3"),
        ({"seg_scale": 0}, "seg_scale=0"),
        ({"distractors": -1}, "distractors=-1"),
        ({"noise": -1.0}, "noise=-1.0"),
        ({"noise": "lots"}, "noise='lots'"),
        ({"rotation": 200}, "rotation=200"),
        ({"task": "colour"}, "task='colour'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_value(params, fragment):
    with pytest.raises(DatasetError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        SyntheticWorld(**params)


@pytest.mark.parametrize("indices", [np.array([5]), np.array([-1]), np.zeros((2, 2), int), np.array([0.5])])
def test_bad_indices_are_rejected(indices):
    with pytest.raises(DatasetError):
        SyntheticWorld(images=5).load(indices)


def test_block_cache_returns_the_same_bytes_as_rendering_and_fresh_arrays():
    from repdissect.datasets import synthetic

    synthetic.clear_block_cache()
    world = SyntheticWorld(images=700, seed=5)
    direct = world._render(np.array([3, 260, 699, 10], dtype=np.int64))
    for request in (np.arange(0, 300), np.array([3, 260, 699, 10]), np.arange(256, 512), np.array([699])):
        got = world.load(request)  # mixes cached whole blocks and directly rendered items
        alone = [world._render(np.array([i], dtype=np.int64)) for i in request[:3]]
        for k, one in enumerate(alone):
            assert np.array_equal(got.images[k], one.images[0])
            assert all(np.array_equal(got.pixel_labels[c][k], one.pixel_labels[c][0]) for c in one.pixel_labels)
            assert np.array_equal(got.landmarks[k], one.landmarks[0])
    again = world.load(np.array([3, 260, 699, 10]))
    assert np.array_equal(again.images, direct.images)
    # cached blocks hold narrowed label maps: a load from them alone gives a fresh render's values and dtypes
    cached, fresh = world.load(np.array([3, 260])), world._render(np.array([3, 260], dtype=np.int64))
    for got, want in ((cached.pixel_labels, fresh.pixel_labels), (cached.image_labels, fresh.image_labels)):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    again.images[:] = 0  # callers may write into what they get: the cache keeps its own copy
    assert np.array_equal(world.load(np.array([3, 260, 699, 10])).images, direct.images)
    assert synthetic._BLOCK_CACHE  # whole blocks were kept
    other = SyntheticWorld(images=700, seed=6)  # another world never sees this world's blocks
    assert not np.array_equal(other.load(np.arange(0, 300)).images, world.load(np.arange(0, 300)).images)
    synthetic.clear_block_cache()
