"""The t-SNE's dominant concept: class-defining categories are left out (on the procedural world the object
category is the class, so the naive rule reproduced the class colouring); purity against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics.cluster import contingency_matrix

from repdissect.datasets import create_dataset
from repdissect.stages import class_purity, dominant_concepts


def _labels(rows: list[list[int]]) -> np.ndarray:
    """``(N, 1, 1, P)`` labels from one list of pixel labels per image."""
    return np.asarray(rows, np.int32)[:, None, None, :]


# Four images, 6 pixels each. "shape" (labels 1–2) follows the class exactly; "colour" (3–5) does not and covers
# every pixel; "texture" (6–7) covers two pixels and is independent of the class.
SHAPE = _labels([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 0, 0], [2, 0, 0, 0, 0, 0]])
COLOUR = _labels([[3, 3, 4, 4, 4, 4], [5, 5, 5, 5, 5, 3], [3, 3, 3, 3, 3, 4], [5, 5, 5, 4, 4, 4]])
TEXTURE = _labels([[6, 7, 0, 0, 0, 0], [7, 7, 0, 0, 0, 0], [6, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0]])
CLASSES = np.array([0, 0, 1, 1])


@pytest.mark.parametrize("labels, classes, concept, category, excluded", [
    # class decides "shape" (purity 1) → left out; colour covers the most pixels of what is left
    ({"shape": SHAPE, "colour": COLOUR}, CLASSES, [4, 5, 3, 4], ["colour"] * 4, ["shape"]),
    # no class labels: the naive rule over every category (image 3: three 4s, three 5s → the smaller label)
    ({"shape": SHAPE, "colour": COLOUR}, None, [4, 5, 3, 4], ["colour"] * 4, []),
    # without colour the naive rule picks the shape, i.e. the class (the bug); texture stays (purity 0.5)
    ({"shape": SHAPE, "texture": TEXTURE}, CLASSES, [6, 7, 6, 7], ["texture"] * 4, ["shape"]),
    # every category class-defining → none left out (better the class than nothing)
    ({"shape": SHAPE}, CLASSES, [1, 1, 2, 2], ["shape"] * 4, []),
    # images without class (−1) do not count towards purity; shape still decided by the classes present
    ({"shape": SHAPE, "colour": COLOUR}, np.array([0, 0, 1, -1]), [4, 5, 3, 4], ["colour"] * 4, ["shape"]),
])
def test_dominant_concept_leaves_out_class_defining_categories(labels, classes, concept, category, excluded):
    got = dominant_concepts(labels, classes)
    np.testing.assert_array_equal(got.concept, concept)
    assert list(got.category) == category
    assert got.excluded == excluded


def test_unlabelled_images_get_concept_zero():
    got = dominant_concepts({"shape": np.zeros((3, 1, 4, 4), np.int32)}, None)
    np.testing.assert_array_equal(got.concept, [0, 0, 0])
    assert list(got.category) == ["", "", ""]
    empty = dominant_concepts({}, None)
    assert empty.concept.size == 0


@pytest.mark.parametrize("seed", range(5))
def test_purity_equals_scikit_learn_contingency(seed):
    rng = np.random.default_rng(seed)
    dominant = rng.integers(0, 6, 300)
    classes = rng.integers(0, 4, 300)
    expected = contingency_matrix(classes, dominant).max(axis=1).sum() / 300
    assert class_purity(dominant, classes) == pytest.approx(expected, abs=1e-12)
    assert class_purity(classes * 7 + 1, classes) == 1.0  # a function of the class
    assert np.isnan(class_purity(dominant, np.full(300, -1)))


def test_procedural_world_colours_by_something_other_than_the_class():
    world = create_dataset("synthetic", images=160, size=32, seed=0)
    batch = world.load(np.arange(160))
    got = dominant_concepts(batch.pixel_labels, batch.class_label)
    names = {c.label: c.name for c in world.concepts}
    assert "object" in got.excluded and got.purity["object"] == 1.0  # the object category is the class
    assert set(got.category) == {"color"}  # colours label every pixel, so the dominant concept is a colour
    assert class_purity(got.concept, batch.class_label) < 0.5  # distinct from the class colouring
    assert not set(names[int(c)] for c in got.concept) & set(world.class_names)


@pytest.mark.parametrize("group_values", [1, 17, 64, 1 << 21])  # one image per group … all at once
def test_label_counts_in_groups_of_images_equal_a_count_per_image(group_values, monkeypatch):
    import repdissect.stages._concepts as concepts

    labels = np.random.default_rng(3).integers(0, 9, (7, 2, 4, 4)).astype(np.int32)
    monkeypatch.setattr(concepts, "_COUNT_VALUES", group_values)
    got = concepts._per_image_counts(labels, 9)
    expected = np.stack([np.bincount(image.ravel(), minlength=9) for image in labels])
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert concepts._per_image_counts(labels[:0], 9).shape == (0, 9)
