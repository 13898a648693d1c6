"""The label-trained recognition heads' benchmark on small synthetic inputs: its class split
keeps evaluation classes out of training, its views, and what a head learns from the
training classes carries over to classes it never saw."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# pytest puts tests/ on sys.path, not the checkout root that holds benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import recognition_head
from benchmarks.recognition_features import Features, views
from benchmarks.recognition_head import (
    TRAINING_CLASSES,
    HeadConfig,
    apply,
    class_split,
    lda,
    measure_set,
    train_head,
    unit,
)


def test_the_class_split_is_seeded_and_keeps_evaluation_classes_out_of_training() -> None:
    classes = [f"class{i:02d}" for i in range(99)]
    training, tuning, held_out = class_split(classes, seed=0)
    assert len(training) == TRAINING_CLASSES
    assert len(tuning) + len(held_out) == 99 - TRAINING_CLASSES
    assert not set(training) & (set(tuning) | set(held_out))
    assert not set(tuning) & set(held_out)
    assert class_split(classes, seed=0) == (training, tuning, held_out)
    assert class_split(classes, seed=1)[0] != training


def test_views_are_the_photo_its_mirror_image_then_seeded_crops() -> None:
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    made = views(image, 4, np.random.default_rng(0))
    assert len(made) == 4
    assert made[0] is image
    assert np.array_equal(np.asarray(made[1]), np.asarray(image)[:, ::-1])
    for crop in made[2:]:
        assert crop.size[0] <= 40 and crop.size[1] <= 30
    again = views(image, 4, np.random.default_rng(0))
    assert [v.size for v in again] == [v.size for v in made]


def synthetic(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Features whose class lives in 8 dimensions and whose 56 others carry a strong
    nuisance (lighting, background) shared by every class."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, 8)) * 1.0
    rows, labels = [], []
    for c in range(n_classes):
        signal = centres[c] + 0.3 * rng.standard_normal((per_class, 8))
        nuisance = 2.0 * rng.standard_normal((per_class, 56))
        rows.append(np.concatenate([signal, nuisance], axis=1))
        labels += [f"s{seed}c{c}"] * per_class
    return np.concatenate(rows).astype(np.float32), labels


@pytest.fixture
def one_thread() -> Iterator[None]:
    """A tiny head gains nothing from threads, which wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_a_head_trained_on_some_classes_recognises_others_better_than_raw_features() -> None:
    x_train, y_train = synthetic(20, 30, seed=0)
    x_eval, y_eval = synthetic(16, 12, seed=1)  # other classes: none was trained on
    paths = [f"/eval/{i}.jpg" for i in range(len(y_eval))]
    raw = measure_set(unit(x_eval), paths, y_eval, unknown=6)
    config = HeadConfig("test", dim=16, epochs=40, lr=1e-2)
    head = train_head(x_train, y_train, config, seed=0)
    learnt = measure_set(apply(head, x_eval), paths, y_eval, unknown=6)
    closed_form = measure_set(lda(x_train, y_train, 8)(x_eval), paths, y_eval, unknown=6)
    assert learnt["top1"] > raw["top1"] + 0.2
    assert learnt["auroc"] > raw["auroc"]
    assert closed_form["top1"] > raw["top1"] + 0.2


def test_a_correction_head_starts_as_its_input() -> None:
    x, y = synthetic(4, 5, seed=0)
    config = HeadConfig("test", dim=64, hidden=8, residual=True, epochs=0)
    head = train_head(x, y, config, seed=0)
    assert np.allclose(apply(head, x), unit(x), atol=1e-6)


def test_without_the_photos_the_benchmark_says_it_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(recognition_head, "CALTECH", tmp_path / "absent")
    report = recognition_head.measure(None, 0, ())
    assert not report.figures and "skipped" in report.notes[0]


def test_feature_rows_keep_paths_labels_and_views_together() -> None:
    features = Features(
        ["a", "a", "b"],
        ["x", "x", "y"],
        np.array([0, 1, 0], dtype=np.int8),
        {"descriptor": np.eye(3, dtype=np.float32)},
    )
    picked = features.rows(np.array([False, True, True]))
    assert picked.paths == ["a", "b"] and picked.labels == ["x", "y"]
    assert picked.view.tolist() == [1, 0]
    assert np.array_equal(picked.arrays["descriptor"], np.eye(3, dtype=np.float32)[1:])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:using RANDOM weights")
def test_features_are_made_once_and_read_back_from_the_cache(tmp_path: Path) -> None:
    from benchmarks.recognition_features import cached
    from ghostmatch.model.weights import load_descriptor

    model = load_descriptor("random", input_size=64)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    items = [("a.jpg", "x"), ("b.jpg", "y")]
    made = cached(tmp_path / "cache", "t", model, tmp_path, items, 3, seed=0)
    assert made.paths == ["a.jpg"] * 3 + ["b.jpg"] * 3 and made.view.tolist() == [0, 1, 2] * 2
    assert made.arrays["descriptor"].shape == (6, 960) and made.arrays["gem112"].shape == (6, 112)
    (tmp_path / "a.jpg").unlink()  # read back, not made again
    again = cached(tmp_path / "cache", "t", model, tmp_path, items, 3, seed=0)
    assert again.paths == made.paths and again.labels == made.labels
    for kind, values in made.arrays.items():
        assert np.array_equal(again.arrays[kind], values)
