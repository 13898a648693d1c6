"""Labels in the catalog and recognition by the nearest labelled photos: the vote, the
leave-one-out threshold, labels that follow a photo's content, and the open set, on
synthetic vectors written straight into a real catalog and on real photos with the random
model."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ghostmatch
import ghostmatch.store.catalog as catalog_module
from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.recognition import (
    _cut_rejecting,
    auroc,
    evaluate_recognition,
    evaluate_vectors,
    split,
)
from ghostmatch.library import Library
from ghostmatch.recognition.calibration import choose_threshold
from ghostmatch.recognition.labels import UNKNOWN, read_label_csv
from ghostmatch.recognition.recognizer import CALIBRATION_META, LabelledSet
from ghostmatch.recognition.vote import WEIGHT_POWER, label_scores
from ghostmatch.store.catalog import Catalog, NewImage

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]

DIM = 16


# ---------------------------------------------------------------------------- the vote


def test_a_close_neighbour_outvotes_loose_ones() -> None:
    ranked = label_scores([(0,), (1,), (1,)], np.array([0.9, 0.5, 0.5]))
    assert [label for label, _ in ranked] == [0, 1]
    assert ranked[0][1] == pytest.approx((0.9**WEIGHT_POWER / 3) ** (1 / WEIGHT_POWER))
    assert ranked[1][1] == pytest.approx((2 * 0.5**WEIGHT_POWER / 3) ** (1 / WEIGHT_POWER))


def test_a_photo_with_several_labels_votes_for_each() -> None:
    ranked = dict(label_scores([(0, 2), (1,)], np.array([0.8, 0.8])))
    assert ranked[0] == pytest.approx(ranked[2]) == pytest.approx(ranked[1])


def test_agreeing_close_neighbours_score_higher_than_loose_disagreeing_ones() -> None:
    [(_, agree), *_] = label_scores([(0,)] * 5, np.full(5, 0.8))
    [(_, loose), *_] = label_scores([(0,), (1,), (2,), (3,), (4,)], np.full(5, 0.4))
    assert agree == pytest.approx(0.8)  # all agree: the cosine itself
    assert loose == pytest.approx(0.4 / 5 ** (1 / WEIGHT_POWER))


def test_fewer_labelled_photos_than_asked_for_are_less_evidence() -> None:
    [(_, two_of_two)] = label_scores([(0,), (0,)], np.full(2, 0.9))
    [(_, two_of_ten)] = label_scores([(0,), (0,)], np.full(2, 0.9), k=10)
    assert two_of_two == pytest.approx(0.9)
    assert two_of_ten == pytest.approx(0.9 / 5 ** (1 / WEIGHT_POWER))


def test_negative_cosines_carry_no_weight() -> None:
    assert label_scores([(0,), (1,)], np.array([-0.2, -0.5])) == [(0, 0.0), (1, 0.0)]


# ---------------------------------------------------------------------------- the threshold


def test_the_threshold_is_the_lowest_cut_that_meets_the_precision() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, True, False, True, False])
    threshold, precision, coverage, met = choose_threshold(confidence, correct, 0.8)
    # Accepting down to 0.5 gives 4 of 5 right; down to 0.4, 4 of 6.
    assert (threshold, precision, coverage, met) == (0.5, 0.8, 5 / 6, True)
    assert choose_threshold(confidence, correct, 1.0)[:2] == (0.7, 1.0)


def test_equal_confidences_are_accepted_or_rejected_together() -> None:
    confidence = np.array([0.9, 0.5, 0.5])
    correct = np.array([True, True, False])
    threshold, precision, _, _ = choose_threshold(confidence, correct, 0.9)
    assert (threshold, precision) == (0.9, 1.0)


def test_an_unreachable_precision_gives_the_most_precise_cut_and_says_so() -> None:
    threshold, precision, _, met = choose_threshold(
        np.array([0.9, 0.8, 0.7]), np.array([False, True, False]), 0.99
    )
    assert (threshold, precision, met) == (0.8, 0.5, False)


# ---------------------------------------------------------------------------- synthetic index


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def image(path: Path, vector: np.ndarray, digest: str) -> NewImage:
    return NewImage(path, 100, 1, digest, 8, 8, "JPEG", vector)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[tuple[Library, np.ndarray]]:
    """An index of 3 tight clusters of 12 synthetic vectors each (files that do not exist
    on disk: recognition reads only the catalog), plus the cluster centres."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((3, DIM)))
    lib = ghostmatch.open(tmp_path / "index")
    rows = [
        image(
            tmp_path / f"c{c}" / f"{i}.jpg",
            unit(centres[c] + 0.15 * rng.standard_normal(DIM)),
            f"h{c}-{i}",
        )
        for c in range(3)
        for i in range(12)
    ]
    with lib.catalog.transaction() as tx:
        tx.insert_images(rows)
    yield lib, centres
    lib.close()


def labels_by_folder(lib: Library) -> dict[Path, str]:
    return {p: p.parent.name for p in lib.catalog.all_stat()}


def test_labels_are_given_by_content_and_reported_for_unknown_paths(
    clusters: tuple[Library, np.ndarray], tmp_path: Path
) -> None:
    lib, _ = clusters
    first = tmp_path / "c0" / "0.jpg"
    report = lib.set_labels({first: ["boat", "red"], tmp_path / "nowhere.jpg": "boat"})
    assert (report.photos, report.added, report.not_indexed) == (1, 2, [tmp_path / "nowhere.jpg"])
    assert lib.labels([first]) == {first: ["boat", "red"]}
    assert lib.set_labels({first: "boat"}).added == 0  # already carried
    replaced = lib.set_labels({first: "ship"}, replace=True)
    assert (replaced.added, replaced.removed) == (1, 2)
    assert lib.labels() == {first: ["ship"]}
    assert lib.info()["labels"] == {"ship": {"photos": 1, "indexed": 1}}


def test_unknown_and_empty_labels_are_refused(clusters: tuple[Library, np.ndarray]) -> None:
    lib, _ = clusters
    path = next(iter(lib.catalog.all_stat()))
    for bad in (UNKNOWN, "  ", ""):
        with pytest.raises(GhostmatchError):
            lib.set_labels({path: bad})
    assert lib.labels() == {}


def test_removing_labels_by_photo_folder_label_or_all(
    clusters: tuple[Library, np.ndarray], tmp_path: Path
) -> None:
    lib, _ = clusters
    lib.set_labels(labels_by_folder(lib))
    lib.set_labels({tmp_path / "c1" / "0.jpg": "extra"})
    assert lib.remove_labels([tmp_path / "c0" / "0.jpg"]) == 1
    assert lib.remove_labels([tmp_path / "c1"], label="extra") == 1
    assert lib.remove_labels(label="c2") == 12
    counts = lib.info()["labels"]
    assert counts == {"c0": {"photos": 11, "indexed": 11}, "c1": {"photos": 12, "indexed": 12}}
    assert lib.remove_labels() == 23
    assert lib.info()["labels"] == {}


def test_a_query_near_a_cluster_gets_its_label_and_one_far_from_all_is_unknown(
    clusters: tuple[Library, np.ndarray],
) -> None:
    lib, centres = clusters
    lib.set_labels(labels_by_folder(lib))
    near = lib.recognizer.recognize_vector(centres[1], k=5)
    assert near.label == near.best == "c1"
    assert near.confidence >= near.threshold
    assert [n.labels for n in near.neighbours] == [("c1",)] * 5
    assert [n.score for n in near.neighbours] == sorted(
        (n.score for n in near.neighbours), reverse=True
    )
    # Orthogonal to every centre: the neighbours are loose and split between the clusters.
    basis = np.linalg.svd(centres)[2]
    far = lib.recognizer.recognize_vector(basis[-1], k=5)
    assert far.label == UNKNOWN
    assert far.best is not None and far.confidence < far.threshold
    data = far.to_dict()
    assert data["label"] == UNKNOWN and set(data) >= {"confidence", "alternatives", "neighbours"}
    assert all({"path", "label", "score"} <= set(n) for n in data["neighbours"])


def test_the_query_s_own_content_never_votes(
    clusters: tuple[Library, np.ndarray], tmp_path: Path
) -> None:
    lib, _ = clusters
    lib.set_labels(labels_by_folder(lib))
    own = lib.catalog.records_by_path([tmp_path / "c0" / "0.jpg"])[tmp_path / "c0" / "0.jpg"]
    _, [vector] = lib.catalog.vectors([own.id])
    with_itself = lib.recognizer.recognize_vector(vector, k=3)
    assert with_itself.neighbours[0].id == own.id
    without = lib.recognizer.recognize_vector(vector, [own.content_hash], k=3)
    assert own.id not in [n.id for n in without.neighbours]
    assert len(without.neighbours) == 3


def test_the_labelled_search_is_exact(clusters: tuple[Library, np.ndarray]) -> None:
    lib, _ = clusters
    lib.set_labels(labels_by_folder(lib))
    labelled = lib.recognizer.labelled_set()
    queries = unit(np.random.default_rng(5).standard_normal((7, DIM)))
    exclude = [[0, 3], [], [35], [], [1], [2], [4, 5, 6]]
    found, scores = labelled.nearest(queries, 6, exclude)
    brute = queries @ labelled.vectors.T
    for q, (rows, sims) in enumerate(zip(found, scores, strict=True)):
        order = [int(r) for r in np.argsort(-brute[q], kind="stable") if r not in exclude[q]][:6]
        assert rows.tolist() == order
        np.testing.assert_allclose(sims, brute[q][order], atol=1e-4)


def test_the_threshold_is_calibrated_stored_and_renewed_when_labels_change(
    clusters: tuple[Library, np.ndarray], tmp_path: Path
) -> None:
    lib, _ = clusters
    lib.set_labels(labels_by_folder(lib))
    stored = lib.catalog.get_meta(CALIBRATION_META)
    assert stored is not None
    assert stored["n_labelled"] == 36 and stored["n_queries"] == 36
    assert stored["precision"] >= stored["target_precision"] and stored["met"]
    lib.remove_labels([tmp_path / "c2"])
    renewed = lib.catalog.get_meta(CALIBRATION_META)
    assert renewed["n_labelled"] == 24 and renewed["fingerprint"] != stored["fingerprint"]
    # On demand, to another precision; later changes keep that target.
    assert lib.calibrate_recognition(0.5).target_precision == 0.5
    lib.set_labels({tmp_path / "c2" / "0.jpg": "c2"})
    assert lib.catalog.get_meta(CALIBRATION_META)["target_precision"] == 0.5


def test_a_fresh_open_uses_the_stored_threshold(
    clusters: tuple[Library, np.ndarray], tmp_path: Path
) -> None:
    lib, centres = clusters
    lib.set_labels(labels_by_folder(lib))
    lib.catalog.set_meta(
        CALIBRATION_META, {**lib.catalog.get_meta(CALIBRATION_META), "threshold": 0.999}
    )
    with ghostmatch.open(lib.path) as fresh:
        answer = fresh.recognizer.recognize_vector(centres[0])  # the stored k
        assert answer.threshold == 0.999 and answer.label == UNKNOWN and answer.best == "c0"
        # Another k is another vote: calibrated afresh for it.
        assert fresh.recognizer.recognize_vector(centres[0], k=5).threshold != 0.999


def test_recognition_without_labels_says_what_to_do(clusters: tuple[Library, np.ndarray]) -> None:
    lib, centres = clusters
    with pytest.raises(GhostmatchError, match="set_labels"):
        lib.recognizer.recognize_vector(centres[0])


def test_a_version_2_catalog_gains_the_labels_table(tmp_path: Path) -> None:
    Catalog.for_directory(tmp_path).close()
    with sqlite3.connect(tmp_path / "catalog.db") as raw:
        raw.execute("DELETE FROM schema_version WHERE version > 2")
        raw.execute("DROP TABLE labels")
    raw.close()
    with Catalog.for_directory(tmp_path) as catalog:
        assert catalog.schema_version() == catalog_module.MIGRATIONS[-1][0] >= 3
        with catalog.transaction() as tx:
            assert tx.add_labels([("abc", "cat")]) == 1
        assert catalog.label_counts() == {"cat": (1, 0)}


# ---------------------------------------------------------------------------- real photos


@pytest.fixture
def classes(photos: Path, tmp_path: Path) -> Path:
    """Photos in class folders: two of cats, three of space, two of other things."""
    root = tmp_path / "classes"
    for cls, names in {
        "cats": ("chelsea.jpg", "cat.jpg"),
        "space": ("astronaut.jpg", "rocket.jpg", "hubble_deep_field.jpg"),
        "things": ("coffee.jpg", "camera.png"),
    }.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            shutil.copy2(photos / name, root / cls / name)
    (root / "loose.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    return root


def test_labels_follow_a_photo_through_a_move_and_a_re_index(classes: Path, tmp_path: Path) -> None:
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        lib.index([classes], batch_size=8)
        report = lib.set_labels(classes)
        # The photo directly in the folder has no class.
        assert report.photos == 7 and report.not_indexed == []
        moved = classes / "elsewhere" / "renamed.jpg"
        moved.parent.mkdir()
        (classes / "cats" / "cat.jpg").rename(moved)
        lib.index([classes], batch_size=8)
        assert lib.labels([moved]) == {moved: ["cats"]}
        # A byte-identical copy carries its original's labels: loose.jpg is coffee.jpg.
        assert lib.labels([classes / "loose.jpg"]) == {classes / "loose.jpg": ["things"]}


def test_recognising_an_indexed_photo_by_path_leaves_it_and_its_copies_out(
    classes: Path, tmp_path: Path
) -> None:
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        lib.index([classes], batch_size=8)
        lib.set_labels(classes)
        coffee = classes / "things" / "coffee.jpg"
        answer = lib.recognize(coffee, k=3)
        voted = {n.path for n in answer.neighbours}
        assert coffee not in voted and classes / "loose.jpg" not in voted
        assert len(answer.neighbours) == 3
        # A copy that is not indexed is the same photo too.
        outside = tmp_path / "outside.jpg"
        shutil.copy2(coffee, outside)
        assert coffee not in {n.path for n in lib.recognize(outside, k=3).neighbours}


def test_several_photos_at_once_are_each_one_s_answer_with_one_model_call(
    classes: Path, tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        lib.index([classes], batch_size=8)
        lib.set_labels(classes)
        outside = tmp_path / "outside.jpg"
        shutil.copy2(photos / "rocket.jpg", outside)
        with Image.open(photos / "astronaut.jpg") as opened:
            new = opened.convert("RGB").resize((200, 150))
        asked = [classes / "things" / "coffee.jpg", outside, new, classes / "loose.jpg"]
        one_by_one = [lib.recognize(x, k=3) for x in asked]
        model_calls: list[int] = []
        embed = lib.model.embed

        def counted(images):  # type: ignore[no-untyped-def]
            model_calls.append(len(images))
            return embed(images)

        monkeypatch.setattr(lib.model, "embed", counted)
        together = lib.recognize_many(asked, k=3)
    # The two photos that are not indexed, embedded in one call; the others' stored
    # vectors used, and every answer (own content left out) the same as alone.
    assert model_calls == [2]
    for alone, batched in zip(one_by_one, together, strict=True):
        assert (batched.label, batched.best) == (alone.label, alone.best)
        assert [n.id for n in batched.neighbours] == [n.id for n in alone.neighbours]
        # A batch may round differently from one image in the network's last digits.
        assert batched.confidence == pytest.approx(alone.confidence, abs=1e-5)


def test_folder_labels_need_indexed_photos_in_sub_folders(classes: Path, tmp_path: Path) -> None:
    with (
        ghostmatch.open(tmp_path / "index", weights="random") as lib,
        pytest.raises(GhostmatchError, match="index the folder first"),
    ):
        lib.set_labels(classes)


# ---------------------------------------------------------------------------- label files


def test_a_label_csv_takes_relative_and_absolute_paths_and_several_labels(tmp_path: Path) -> None:
    file = tmp_path / "labels.csv"
    file.write_text(f"path,label\na.jpg,cat\na.jpg,pet\n{tmp_path / 'b.jpg'},dog\n\n")
    assert read_label_csv(file) == {tmp_path / "a.jpg": ["cat", "pet"], tmp_path / "b.jpg": ["dog"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg,cat\n", "header"),
        ("path,label\na.jpg\n", "line 2"),
        ("path,label\na.jpg,unknown\n", "line 2"),
        ("path,label\n", "no rows"),
    ],
)
def test_a_bad_label_csv_says_where(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "labels.csv"
    file.write_text(text)
    with pytest.raises(GhostmatchError, match=message):
        read_label_csv(file)


# ---------------------------------------------------------------------------- evaluation


def test_the_split_holds_classes_out_whole_and_halves_the_others() -> None:
    labels = {Path(f"/p/{c}/{i}.jpg"): c for c in "abcdef" for i in range(5)}
    labelled, held, unknown = split(labels, 2, seed=3)
    assert len({labels[p] for p in unknown}) == 2
    assert not {labels[p] for p in unknown} & {labels[p] for p in labelled | held}
    for c in {labels[p] for p in labelled}:
        assert sum(labels[p] == c for p in labelled) == 2
        assert sum(labels[p] == c for p in held) == 3
    assert split(labels, 2, seed=3) == (labelled, held, unknown)


def test_other_descriptors_of_the_indexed_photos_are_measured_as_the_index_s_own(
    clusters: tuple[Library, np.ndarray],
) -> None:
    lib, _ = clusters
    labels = labels_by_folder(lib)
    records = lib.catalog.records_by_path(labels)
    _, vectors = lib.catalog.vectors([records[p].id for p in labels])
    hashes = [records[p].content_hash for p in labels]
    own = evaluate_recognition(lib, labels, unknown_classes=1, k=5, seed=2)
    given = evaluate_vectors(labels, vectors, hashes, unknown_classes=1, k=5, seed=2)
    assert given.to_dict() | {"calibration": None} == own.to_dict() | {"calibration": None}
    assert given.top1 == 1.0 and given.auroc > 0.9
    # The same photos with random descriptors: nothing to recognise them by.
    noise = unit(np.random.default_rng(1).standard_normal(vectors.shape))
    blind = evaluate_vectors(labels, noise, hashes, unknown_classes=1, k=5, seed=2)
    assert blind.known_classes == given.known_classes and blind.top1 < 0.9


def test_auroc_counts_ties_as_half() -> None:
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5


def test_the_95_percent_cut_rejects_at_least_that_share_of_unknowns() -> None:
    unknown = np.linspace(0.0, 1.0, 40)
    cut = _cut_rejecting(unknown, 0.95)
    assert (unknown >= cut).sum() == 2  # 5% of 40
    assert (np.full(10, 0.3) >= _cut_rejecting(np.full(10, 0.3), 0.95)).sum() == 0


def test_labelled_set_fingerprint_names_the_labels_and_model() -> None:
    rows = [(1, "h1", "a"), (2, "h2", "b")]
    vectors = unit(np.eye(2, DIM))
    one = LabelledSet(rows, np.array([1, 2]), vectors, "m")
    assert one.fingerprint == LabelledSet(rows[::-1], np.array([1, 2]), vectors, "m").fingerprint
    assert one.fingerprint != LabelledSet(rows, np.array([1, 2]), vectors, "other").fingerprint
    assert (
        one.fingerprint
        != LabelledSet([(1, "h1", "a")], np.array([1]), vectors[:1], "m").fingerprint
    )


def test_calibration_also_asks_as_if_each_photo_s_labels_were_unknown(
    clusters: tuple[Library, np.ndarray],
) -> None:
    lib, _ = clusters
    lib.set_labels(labels_by_folder(lib))
    labelled = lib.recognizer.labelled_set()
    rows = np.arange(len(labelled))
    confidence = labelled.answer_without_labels(rows, 5)
    sims = labelled.vectors @ labelled.vectors.T
    for row in rows.tolist():
        others = [
            r for r in rows.tolist() if not set(labelled.labels[r]) & set(labelled.labels[row])
        ]
        top = sorted(others, key=lambda r: -sims[row, r])[:5]
        [(_, expected), *_] = labelled.vote(np.array(top), sims[row, top], 5)
        assert confidence[row] == pytest.approx(expected, abs=1e-5)
    # Tight clusters: the threshold answers every known photo and few posing as unknown,
    # and the precision counts those as wrong answers.
    calibration = lib.recognizer.calibration()
    assert calibration.coverage == 1.0 and calibration.unknown_accepted <= 0.05
    accepted_unknown = round(calibration.unknown_accepted * 36)
    assert calibration.precision == pytest.approx(36 / (36 + accepted_unknown))
