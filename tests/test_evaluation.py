"""Evaluation on real (tiny) indexes: the numbers agree with ``ghostmatch.eval.metrics`` computed
directly from the stored vectors, calibration picks and stores the expected threshold, and
the commands run end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from skimage import data
from typer.testing import CliRunner

import ghostmatch
from ghostmatch.cli import eval_cmd
from ghostmatch.dupes.groups import (
    DEFAULT_NORMALISED_THRESHOLD,
    DuplicateGroup,
    DuplicateMember,
    threshold_of,
)
from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.copies import make_copies, transform_of
from ghostmatch.eval.evaluation import (
    DEFAULT_DUPE_THRESHOLD,
    DUPE_THRESHOLD_META,
    LabelledPair,
    calibrate,
    evaluate_captures,
    evaluate_duplicates,
    evaluate_groups,
    evaluate_retrieval,
    labels_from_folders,
    read_labels_csv,
    read_pairs_csv,
    read_truth_any,
    wilson_lower_bound,
)
from ghostmatch.eval.metrics import average_precision, pick_threshold, retrieval_metrics

CLASSES = {
    "space": ("astronaut", "rocket", "hubble_deep_field"),
    "texture": ("brick", "grass", "gravel"),
    "paper": ("page", "text", "coins"),
}
TRANSFORMS = ("flip", "crop-80", "gray", "text")


def _photo(name: str, path: Path) -> None:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((256, 256))
    image.save(path, quality=90)


def _index(folder: Path, index: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using RANDOM weights"
        with ghostmatch.open(index, weights="random") as lib:
            report = lib.index([folder])
    assert not report.failed
    return index


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine photos in three class folders, and one loose photo that has no class."""
    folder = tmp_path_factory.mktemp("classes")
    for label, names in CLASSES.items():
        (folder / label).mkdir()
        for name in names:
            _photo(name, folder / label / f"{name}.jpg")
    _photo("coffee", folder / "loose.jpg")
    return folder


@pytest.fixture(scope="module")
def classes_index(classes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _index(classes, tmp_path_factory.mktemp("classes-index") / "index")


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A make-copies set: three originals, four edited copies of each, and truth.json."""
    sources = tmp_path_factory.mktemp("sources")
    for name in ("astronaut", "coffee", "chelsea"):
        _photo(name, sources / f"{name}.jpg")
    out = tmp_path_factory.mktemp("copies") / "set"
    make_copies(sorted(sources.iterdir()), out, seed=0, transforms=TRANSFORMS)
    return out


@pytest.fixture(scope="module")
def copies_index(copies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _index(copies, tmp_path_factory.mktemp("copies-index") / "index")


def _cli() -> typer.Typer:
    """The commands on an app of their own, as ``cli/app.py`` registers them."""
    app = typer.Typer()
    eval_cmd.register(app)
    return app


def _run(*args: str) -> dict:
    result = CliRunner().invoke(_cli(), list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def _stored(index: Path) -> tuple[list[Path], np.ndarray]:
    with ghostmatch.open(index, create=False) as lib:
        ids, vectors = lib.catalog.vectors()
        paths = {r.id: r.path for r in lib.catalog.get(ids.tolist())}
    return [paths[i] for i in ids.tolist()], vectors


def _pair_score(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.float32(np.dot(a.astype(np.float64), b.astype(np.float64))))


# ---------------------------------------------------------------------------- retrieval


def test_retrieval_cli_matches_metrics_on_stored_vectors(classes: Path, classes_index: Path):
    got = _run("eval", "retrieval", str(classes), "--index", str(classes_index), "--json")

    paths, vectors = _stored(classes_index)
    labelled = [(p, v) for p, v in zip(paths, vectors, strict=True) if p.parent != classes]
    x = np.stack([v for _, v in labelled])
    expected = retrieval_metrics(x @ x.T, np.array([p.parent.name for p, _ in labelled]))
    assert got["images"] == 9 and got["queries"] == 9 and got["unindexed"] == 0
    assert got["depth"] == 8 and got["knn_k"] == 10
    for key in ("map", "recall_at_1", "recall_at_5", "recall_at_10", "knn_top1"):
        assert 0.0 <= got[key] <= 1.0
        assert got[key] == pytest.approx(getattr(expected, key), abs=1e-6)
    assert set(got["per_class"]) == set(CLASSES)
    for name, row in got["per_class"].items():
        assert row["n_items"] == 3
        assert row["map"] == pytest.approx(expected.per_class[name], abs=1e-6)
    # Every class has 3 of the 9 items, so the overall rates are the class means.
    for key in ("recall_at_1", "recall_at_5", "knn_top1"):
        mean = np.mean([row[key] for row in got["per_class"].values()])
        assert got[key] == pytest.approx(mean, abs=1e-6)
    # With 9 items, the top 10 holds every other item: the class is always found.
    assert got["recall_at_10"] == 1.0


def test_retrieval_table_output(classes: Path, classes_index: Path):
    result = CliRunner().invoke(
        _cli(), ["eval", "retrieval", str(classes), "--index", str(classes_index), "-k", "3"]
    )
    assert result.exit_code == 0, result.output
    for text in ("mAP", "3-NN top-1", "space", "texture", "paper", "all"):
        assert text in result.stdout


def test_retrieval_labels_csv_and_truncated_ranking(classes: Path, classes_index: Path, tmp_path):
    csv_file = tmp_path / "labels.csv"
    rows = ["path,label"] + [
        f"{os.path.relpath(classes / label / f'{name}.jpg', tmp_path)},{label}"
        for label, names in CLASSES.items()
        for name in names
    ]
    csv_file.write_text("\n".join(rows) + "\n")
    labels = read_labels_csv(csv_file)
    assert labels == labels_from_folders(classes)
    with ghostmatch.open(classes_index, create=False) as lib:
        full = evaluate_retrieval(lib, labels)
        short = evaluate_retrieval(lib, labels, depth=2)
        missing = dict(labels)
        missing[tmp_path / "not-indexed.jpg"] = "space"
        assert evaluate_retrieval(lib, missing).n_unindexed == 1
    assert short.depth == 2
    # The first hits are the same; same-class items past the cut count as missed.
    assert short.metrics.recall_at_1 == full.metrics.recall_at_1
    assert short.metrics.map <= full.metrics.map + 1e-12


# ---------------------------------------------------------------------------- duplicates


def test_dupes_cli_reports_pairs_and_transforms(copies: Path, copies_index: Path, tmp_path):
    plot = tmp_path / "pr.png"
    truth = copies / "truth.json"
    got = _run(
        "eval", "dupes", str(copies), "--truth", str(truth), "--index", str(copies_index),
        "--plot", str(plot), "--json",
    )  # fmt: skip
    assert got["images"] == 15 and got["groups"] == 3 and got["unindexed"] == 0
    assert got["positive_pairs"] == 3 * math.comb(5, 2)
    assert got["threshold"] == DEFAULT_DUPE_THRESHOLD and got["threshold_source"] == "default"
    assert set(got["per_transform"]) == set(TRANSFORMS)
    for row in got["per_transform"].values():
        assert row["n_pairs"] == 3 and 0 <= row["n_found"] <= 3
    for key in ("micro_ap", "recall_at_p99", "recall_at_p90", "recall"):
        assert 0.0 <= got[key] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 15 images and 20 neighbours each: every pair is a candidate, scored as dupes scores.
    groups = read_truth_any(truth)
    group_of = {p.resolve(): g for g, members in enumerate(groups) for p in members}
    paths, vectors = _stored(copies_index)
    scores, same = [], []
    for (pa, va), (pb, vb) in itertools.combinations(zip(paths, vectors, strict=True), 2):
        scores.append(_pair_score(va, vb))
        same.append(group_of[pa.resolve()] == group_of[pb.resolve()])
    assert got["candidate_pairs"] == math.comb(15, 2)
    assert got["micro_ap"] == pytest.approx(average_precision(scores, same), abs=1e-6)
    accepted = np.array(scores) >= DEFAULT_DUPE_THRESHOLD
    assert got["recall"] == pytest.approx((accepted & same).sum() / 30, abs=1e-6)


def test_dupes_missed_candidates_count_against_recall(copies: Path, copies_index: Path):
    groups = read_truth_any(copies / "truth.json")
    with ghostmatch.open(copies_index, create=False) as lib:
        result = evaluate_duplicates(lib, groups, threshold=0.5, k=2)
    pairs = result.pairs
    assert pairs.n_positive == 30 and pairs.n_positive_retrieved <= 15 * 2
    assert pairs.n_pairs <= 15 * 2
    assert result.curve.recall.max() <= pairs.n_positive_retrieved / 30 + 1e-12
    assert result.per_transform["flip"].n_pairs == 3


def test_truth_csv_reads_like_truth_json(copies: Path, tmp_path):
    groups = read_truth_any(copies / "truth.json")
    csv_file = tmp_path / "truth.csv"
    lines = ["group_id,path"] + [f"g{g},{p}" for g, members in enumerate(groups) for p in members]
    csv_file.write_text("\n".join(lines) + "\n")
    assert read_truth_any(csv_file) == [[Path(os.path.abspath(p)) for p in g] for g in groups]
    assert {transform_of(p) for g in groups for p in g} == {None, *TRANSFORMS}


# ---------------------------------------------------------------------------- calibration


def test_calibrate_picks_the_expected_threshold_and_stores_it(
    classes: Path, classes_index: Path, tmp_path
):
    index = tmp_path / "index"
    shutil.copytree(classes_index, index)
    with ghostmatch.open(index, create=False) as lib:
        lib.catalog.set_meta(DUPE_THRESHOLD_META, {"min_inliers": 30})
    paths, vectors = _stored(index)
    labelled = [(p, v) for p, v in zip(paths, vectors, strict=True) if p.parent != classes]
    pairs = itertools.combinations(labelled, 2)
    scored = sorted(
        ((_pair_score(va, vb), pa, pb) for (pa, va), (pb, vb) in pairs), key=lambda t: -t[0]
    )
    assert len({s for s, _, _ in scored}) == len(scored) == 36
    # Precision of the top i: 1, 1/2, 2/3, 3/4, 4/5, 5/6, 6/7, 7/8, 7/9, 7/10, ...: the
    # lowest threshold with precision >= 0.8 is the 8th score.
    same = [i == 0 or 2 <= i <= 7 for i in range(len(scored))]
    rows = ["# judged by hand", "path_a,path_b,label", ""] + [
        f"{os.path.relpath(a, tmp_path)},{b},{'same' if s else 'different'}"
        for (_, a, b), s in zip(scored, same, strict=True)
    ]
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("\n".join(rows) + "\n")

    command = ["calibrate", "--pairs", str(pairs_csv), "--precision", "0.8", "--index", str(index)]
    got = _run(*command, "--json")
    assert got["threshold"] == pytest.approx(scored[7][0], abs=1e-6)
    assert (got["support"], got["same_at_or_above"]) == (8, 7)
    assert (got["n_same"], got["n_different"]) == (7, 29)
    assert got["precision"] == pytest.approx(7 / 8) and got["recall"] == 1.0
    assert got["precision_lower_bound"] == pytest.approx(wilson_lower_bound(7, 8))
    with ghostmatch.open(index, create=False) as lib:
        stored = lib.catalog.get_meta(DUPE_THRESHOLD_META)
        assert lib.duplicate_threshold() == got["threshold"]
    assert stored["threshold"] == got["threshold"] and stored["precision"] == 0.8
    assert stored["support"] == 8 and stored["min_inliers"] == 30

    text = CliRunner().invoke(_cli(), command)
    assert text.exit_code == 0, text.output
    assert "chosen from 36 labelled pairs (7 same, 29 different)" in text.stdout
    assert "95% lower bound" in text.stdout


@pytest.mark.filterwarnings("ignore:using RANDOM weights")
def test_calibrate_names_the_line_of_an_unreadable_image(classes_index: Path, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    good = next(p for p in _stored(classes_index)[0])
    pairs = [LabelledPair(good, good, True, 1), LabelledPair(good, broken, False, 2)]
    # The eager runtime: no ONNX export just to find that the file is not an image.
    lib = ghostmatch.open(classes_index, create=False, runtime="eager")
    with lib, pytest.raises(GhostmatchError) as e:
        calibrate(lib, pairs, 0.9, store=False)
    assert str(e.value).startswith("line 2: cannot read")


def test_calibrate_refuses_an_impossible_precision_before_reading_any_image(
    classes_index: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone.jpg"
    pairs = [LabelledPair(gone, gone, True, 1)]
    with ghostmatch.open(classes_index, create=False) as lib:
        for precision in (0.0, 1.5):
            with pytest.raises(GhostmatchError, match=r"precision must be in \(0, 1\]"):
                calibrate(lib, pairs, precision, store=False)


def test_wilson_lower_bound():
    z = 1.6448536269514722
    assert wilson_lower_bound(12, 12) == pytest.approx(12 / (12 + z * z))
    assert wilson_lower_bound(0, 5) == 0.0 and wilson_lower_bound(0, 0) == 0.0
    # The bound is the p whose one-sided z-test just accepts the observed rate.
    for hits, n in ((7, 8), (21, 37), (90, 100)):
        p = wilson_lower_bound(hits, n)
        assert hits / n - p == pytest.approx(z * math.sqrt(p * (1 - p) / n))
    assert wilson_lower_bound(99, 100, 0.99) < wilson_lower_bound(99, 100, 0.9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg,a.jpg,same\na.jpg,same\n", "line 2: expected 3 comma-separated fields"),
        ("a.jpg,a.jpg,maybe\n", "line 1: the third field must be `same` or `different`"),
        ("a.jpg,a.jpg,same\n\na.jpg,gone.jpg,different\n", "line 3: "),
        ("a.jpg,,same\n", "line 1: the path is empty"),
        ("", "has no rows"),
    ],
)
def test_bad_pairs_csv_names_the_line(tmp_path, text: str, message: str):
    (tmp_path / "a.jpg").write_bytes(b"x")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(text)
    with pytest.raises(GhostmatchError, match=message.replace("(", r"\(")):
        read_pairs_csv(csv_file)


def test_unreadable_csv_files(tmp_path):
    with pytest.raises(GhostmatchError, match="cannot read"):
        read_labels_csv(tmp_path / "absent.csv")
    binary = tmp_path / "labels.csv"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GhostmatchError, match="not UTF-8"):
        read_labels_csv(binary)
    with pytest.raises(GhostmatchError, match="make one with"):
        read_truth_any(tmp_path / "truth.json")


# ---------------------------------------------------------------------------- real command


def test_real_command_end_to_end(classes: Path, classes_index: Path, tmp_path):
    command = [sys.executable, "-m", "ghostmatch.cli.app"]
    done = subprocess.run(
        [*command, "eval", "retrieval", str(classes), "--index", str(classes_index), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with ghostmatch.open(classes_index, create=False) as lib:
        expected = evaluate_retrieval(lib, labels_from_folders(classes)).to_dict()
    assert json.loads(done.stdout) == expected

    bad = tmp_path / "pairs.csv"
    bad.write_text("path_a,path_b,label\nx.jpg,y.jpg\n")
    done = subprocess.run(
        [*command, "calibrate", "--pairs", str(bad), "--index", str(classes_index)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and "line 2" in done.stderr


def _command(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "ghostmatch.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_normalised_scores_through_the_commands(
    copies: Path, tmp_path: Path, shared_model_cache: None
) -> None:
    """The bundled model carries a score background: `eval dupes` and `calibrate` score
    pairs as cosine less both offsets, and use the card's threshold until calibrated."""
    index, truth = tmp_path / "index", copies / "truth.json"
    where = ("--index", str(index))
    got = _command(
        "eval", "dupes", str(copies), "--truth", str(truth), *where, "--weights", "bundled",
        "--finder", "--json",
    )  # fmt: skip
    groups = read_truth_any(truth)
    with ghostmatch.open(index, create=False) as lib:
        assert lib.normalised_scores
        card_threshold = float(lib.card.extra["dupe_threshold"])
        ids, vectors = lib.catalog.vectors()
        paths = {r.id: r.path for r in lib.catalog.get(ids.tolist())}
        offsets = lib.score_offsets(vectors)
        finder = evaluate_groups(lib.find_duplicates(), groups)
    assert offsets is not None
    group_of = {p.resolve(): g for g, members in enumerate(groups) for p in members}
    rows = list(zip([paths[i] for i in ids.tolist()], vectors, offsets, strict=True))
    scores, cosines, same, labelled = [], [], [], []
    for (pa, va, oa), (pb, vb, ob) in itertools.combinations(rows, 2):
        cosine = float(np.dot(va.astype(np.float64), vb.astype(np.float64)))
        scores.append(float(np.float32(cosine - oa - ob)))
        cosines.append(cosine)
        same.append(group_of[pa.resolve()] == group_of[pb.resolve()])
        labelled.append(f"{pa},{pb},{'same' if same[-1] else 'different'}")
    assert got["threshold_source"] == "model card"
    assert got["threshold"] == pytest.approx(card_threshold)
    assert got["candidate_pairs"] == math.comb(15, 2)
    assert got["micro_ap"] == pytest.approx(average_precision(scores, same), abs=1e-6)
    accepted = np.array(scores) >= card_threshold
    hits = int((accepted & np.array(same)).sum())
    # Plain cosines accept other pairs at this threshold, so the checks tell the two apart.
    assert (np.array(cosines) >= card_threshold).sum() != accepted.sum()
    assert got["recall"] == pytest.approx(hits / 30, abs=1e-6)
    assert got["precision"] == pytest.approx(hits / max(1, int(accepted.sum())), abs=1e-6)
    assert got["finder"] == {**finder.to_dict(), "verify": True}

    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("\n".join(labelled) + "\n")
    chosen = _command(
        "calibrate", "--pairs", str(pairs_csv), "--precision", "0.9", *where, "--json"
    )
    expected = pick_threshold(scores, same, 0.9)
    assert chosen["threshold"] == pytest.approx(expected.threshold, abs=1e-6)
    assert (chosen["support"], chosen["n_same"]) == (expected.support, 30)
    again = _command("eval", "dupes", str(copies), "--truth", str(truth), *where, "--json")
    assert again["threshold_source"] == "calibrated"
    assert again["threshold"] == pytest.approx(chosen["threshold"], abs=1e-6)
    with ghostmatch.open(index, create=False) as lib:
        assert lib.duplicate_threshold() == chosen["threshold"]


def test_eval_dupes_no_verify_needs_finder(copies: Path, copies_index: Path) -> None:
    truth = str(copies / "truth.json")
    args = ["eval", "dupes", str(copies), "--truth", truth, "--index", str(copies_index)]
    result = CliRunner().invoke(_cli(), [*args, "--no-verify"])
    assert result.exit_code != 0 and isinstance(result.exception, GhostmatchError)
    assert "--finder" in str(result.exception)


def test_threshold_order_calibrated_then_card_then_default() -> None:
    card = {"dupe_threshold": 0.3}
    assert threshold_of({"threshold": 0.5, "min_inliers": 9}, card, True) == (0.5, "calibrated")
    assert threshold_of({"min_inliers": 9}, card, True) == (0.3, "model card")
    assert threshold_of(None, {}, False) == (DEFAULT_DUPE_THRESHOLD, "default")
    assert threshold_of(None, None, True) == (DEFAULT_NORMALISED_THRESHOLD, "default")


def test_finder_groups_are_scored_by_pairs_and_copies(tmp_path: Path) -> None:
    def member(name: str) -> DuplicateMember:
        return DuplicateMember(tmp_path / name, 0.5, "near", 1, 1, 1, 0)

    truth = [
        [tmp_path / "a.jpg", tmp_path / "a__flip.jpg", tmp_path / "a__gray.jpg"],
        [tmp_path / "b.jpg", tmp_path / "b__flip.jpg"],
    ]
    groups = [
        DuplicateGroup(keep=member("a.jpg"), members=[member("a__flip.jpg"), member("c.jpg")]),
        DuplicateGroup(keep=member("b__flip.jpg"), members=[member("b.jpg")]),
    ]
    got = evaluate_groups(groups, truth)
    assert got.precision == 2 / 3 and got.reported_pairs == 3
    assert got.recall == 2 / 3  # a__gray was missed
    assert got.per_transform == {"flip": 1.0, "gray": 0.0}
    assert evaluate_groups([], truth).precision == 1.0


def test_finder_pairs_are_sorted_into_copies_other_shots_and_unrelated(tmp_path: Path) -> None:
    def member(name: str, score: float = 0.5, tier: str = "edited") -> DuplicateMember:
        return DuplicateMember(tmp_path / name, score, tier, 1, 1, 1, 0)

    # Object x was shot three times: x1 is the source of copies, x2 and x3 other shots.
    truth = [[tmp_path / "x1.jpg", tmp_path / "x1__flip.jpg", tmp_path / "x1__gray.jpg"]]
    scenes = {tmp_path / name: "x" for name in ("x1.jpg", "x1__flip.jpg", "x1__gray.jpg")}
    scenes |= {tmp_path / "x2.jpg": "x", tmp_path / "x3.jpg": "x"}
    groups = [
        DuplicateGroup(
            keep=member("x1.jpg"),
            members=[member("x1__flip.jpg"), member("x2.jpg", 0.55, "near"), member("u.png")],
        ),
        DuplicateGroup(keep=member("x3.jpg"), members=[member("x1__gray.jpg", 0.52)]),
    ]
    got = evaluate_captures(groups, truth, scenes)
    assert (got.reported_pairs, got.copies, got.other_shots, got.unrelated) == (4, 1, 2, 1)
    assert got.precision == 1 / 4 and got.other_shot_share == 2 / 4
    assert got.other_shot_tiers == {"edited": 1, "near": 1}
    assert got.other_shot_scores == (0.52, 0.55)
    # Three captures of x (x1 with its copies, x2, x3): each was grouped with another.
    assert (got.captures, got.captures_grouped) == (3, 3)
    alone = evaluate_captures(groups[:1], truth, scenes)
    assert (alone.captures, alone.captures_grouped) == (3, 2)
    nothing = evaluate_captures([], truth, scenes)
    assert nothing.precision == 1.0 and nothing.captures_grouped == 0
    assert nothing.other_shot_scores is None
