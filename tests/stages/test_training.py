"""Training: seeded bit-reproducibility, learning a separable toy task, checkpoints and digests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from repdissect.datasets import Batch, ConceptDataset
from repdissect.stages._errors import StageInputError
from repdissect.stages._models import ModelSpec, build_model
from repdissect.stages._training import (
    HISTORY_COLUMNS,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    state_dict_digest,
    train_model,
)


class SquaresAndDisks(ConceptDataset):
    """Tiny two-class world: a bright square or a bright disk at a random place on a dark noisy background."""

    kind = "toy-shapes"

    def __init__(self, images: int = 160, size: int = 16, seed: int = 0, unlabelled_every: int = 0) -> None:
        self.n, self.size, self.seed, self.unlabelled_every = images, size, seed, unlabelled_every

    def __len__(self) -> int:
        return self.n

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def concepts(self):
        return []

    @property
    def class_names(self) -> list[str]:
        return ["square", "disk"]

    def digest(self) -> str:
        return f"toy-{self.n}-{self.size}-{self.seed}"

    def load(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s]
        images = np.empty((len(indices), 3, s, s), np.uint8)
        labels = indices % 2
        for row, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, int(index)])
            r = rng.uniform(s / 6, s / 4)
            cy, cx = rng.uniform(r, s - r, size=2)
            if labels[row] == 0:
                mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            colour = rng.integers(120, 256, size=3)
            image = rng.integers(0, 60, size=(3, s, s))
            image[:, mask] = colour[:, None]
            images[row] = image
        class_label = labels.astype(np.int64)
        if self.unlabelled_every:
            class_label[indices % self.unlabelled_every == 0] = -1
        return Batch(index=indices, images=images, class_label=class_label)


TINY_SPEC = ModelSpec("builtin:cnn", {"depth": 2, "width": 4})
# Tiny models gain nothing from intra-op threads, and on a loaded machine spinning worker threads slow them
# down many times over; only the tests about thread counts use more than one.
FAST = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment_shift=1)


def _weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def toy() -> SquaresAndDisks:
    return SquaresAndDisks()


@pytest.fixture(scope="module")
def seed0_run(toy):
    return train_model(TINY_SPEC, toy, seed=0, config=FAST, num_threads=1)


def test_same_seed_gives_bit_identical_weights(toy):
    first, history_a = train_model(TINY_SPEC, toy, seed=3, config=FAST, num_threads=1)
    second, history_b = train_model(TINY_SPEC, toy, seed=3, config=FAST, num_threads=1)
    assert _weights_equal(first, second)
    pd.testing.assert_frame_equal(history_a.drop(columns="seconds"), history_b.drop(columns="seconds"))


def test_different_seeds_give_different_weights(toy, seed0_run):
    other, _ = train_model(TINY_SPEC, toy, seed=1, config=FAST, num_threads=1)
    assert not _weights_equal(seed0_run[0], other)
    assert state_dict_digest(seed0_run[0]) != state_dict_digest(other)


def test_training_leaves_global_torch_state_alone(toy):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    train_model(TINY_SPEC, toy, seed=0, config=TrainConfig(epochs=1, batch_size=32), num_threads=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_history_has_one_row_per_epoch(seed0_run):
    _, history = seed0_run
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["epoch"].tolist() == [1, 2]
    assert history[["train_acc", "val_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (history["seconds"] > 0).all() and np.isfinite(history.to_numpy(dtype=float)).all()


def test_learns_a_separable_task():
    data = SquaresAndDisks(images=300, size=16, seed=5)
    spec = ModelSpec("builtin:cnn", {"depth": 2, "width": 8})
    config = TrainConfig(epochs=8, batch_size=32, lr=0.05, augment_shift=0)
    _, history = train_model(spec, data, seed=0, config=config, num_threads=1)
    assert history["val_acc"].iloc[-1] >= 0.9
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_trained_state_dict_loads_into_a_fresh_model(toy, seed0_run):
    state, _ = seed0_run
    model = build_model(TINY_SPEC, seed=99, num_classes=2, state_dict=state)
    x = torch.from_numpy(toy.load(np.arange(8)).images)
    reference = build_model(TINY_SPEC, seed=0, num_classes=2, state_dict=state)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))
    assert state_dict_digest(model.net.state_dict()) == state_dict_digest(state)


def test_unlabelled_items_are_skipped(seed0_run):
    data = SquaresAndDisks(unlabelled_every=3)
    state, history = train_model(TINY_SPEC, data, seed=0, config=FAST, num_threads=1)
    assert not _weights_equal(state, seed0_run[0])
    assert np.isfinite(history["val_loss"]).all()


def test_checkpoint_round_trip_keeps_digest(tmp_path, seed0_run):
    state, _ = seed0_run
    path = save_checkpoint(state, tmp_path / "model.pt")
    loaded = load_checkpoint(path)
    assert _weights_equal(loaded, state)
    assert state_dict_digest(loaded) == state_dict_digest(state)


def test_digest_sees_values_names_dtypes_and_shapes():
    base = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.zeros(2, dtype=torch.int64)}
    digest = state_dict_digest(base)
    variants = [
        {**base, "a": base["a"].clone().index_fill_(1, torch.tensor([2]), 7.0)},
        {"a2": base["a"], "b": base["b"]},
        {**base, "a": base["a"].to(torch.float64)},
        {**base, "a": base["a"].view(3, 2)},
    ]
    assert len({digest, *map(state_dict_digest, variants)}) == 5
    # Layout does not matter, content does: a transposed-then-contiguous copy of the same values agrees.
    strided = {**base, "a": base["a"].t().contiguous().t()}
    assert not strided["a"].is_contiguous()
    assert state_dict_digest(strided) == digest


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"batch_size": 1}, "batch_size"),
        ({"learning_rate": 0.1}, "unknown training setting"),
    ],
)
def test_bad_train_config_names_the_setting(params, fragment):
    with pytest.raises(StageInputError, match=fragment):
        TrainConfig.from_dict(params)


def test_dataset_without_classes_is_rejected():
    class NoClasses(SquaresAndDisks):
        @property
        def class_names(self) -> list[str]:
            return []

    with pytest.raises(StageInputError, match="class"):
        train_model(TINY_SPEC, NoClasses(), seed=0, config=FAST, num_threads=1)


def test_adam_and_constant_schedule_run(toy):
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, optimizer="adam", schedule="constant", augment_flip=False)
    state, history = train_model(TINY_SPEC, toy, seed=0, config=config, num_threads=1)
    assert history["lr"].iloc[0] == pytest.approx(1e-3)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def _synthetic_world(**params):
    datasets = pytest.importorskip("repdissect.datasets")
    if "synthetic" not in datasets.list_datasets():
        pytest.skip("the synthetic world is not registered")
    return datasets.create_dataset("synthetic", **params)


def test_default_cnn_is_bit_reproducible_with_two_threads():
    """The real model size, so that the intra-op parallel kernels are the ones exercised."""
    world = _synthetic_world(images=80, size=32, seed=0)
    config = TrainConfig(epochs=1, batch_size=16)
    first, _ = train_model(ModelSpec(), world, seed=0, config=config, num_threads=2)
    second, _ = train_model(ModelSpec(), world, seed=0, config=config, num_threads=2)
    assert _weights_equal(first, second)


@pytest.mark.slow
def test_demo_training_reaches_ninety_percent():
    """Acceptance: the default CNN and TrainConfig on the default 4000-image world (minutes on a CPU)."""
    world = _synthetic_world(images=4000, size=64, seed=0)
    _, history = train_model(ModelSpec(), world, seed=0)
    assert history["val_acc"].iloc[-1] >= 0.9
