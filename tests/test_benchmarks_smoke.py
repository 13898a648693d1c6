"""The benchmark suite's pieces on tiny inputs: each runs, and its report is sound."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

# pytest puts tests/ on sys.path, not the checkout root that holds benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import allpairs, ann, descriptor, fresh, indexing, quality, query
from benchmarks import data as bench_data
from benchmarks.__main__ import BENCHMARKS
from benchmarks.data import Photo, make_large_jpegs
from benchmarks.index_open import main as index_open_main
from benchmarks.report import ORDER, Figure, Report, run_and_save, save, write_summary
from benchmarks.settings import Settings
from ghostmatch import Library


@pytest.fixture(autouse=True)
def _one_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """One cache for the module, so the ONNX model is exported once, not per test."""
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))
    warnings.filterwarnings("ignore", message="using RANDOM weights")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from threads, and on a busy machine threads that wait for
    each other at every layer make these tests several times slower."""
    import faiss
    import torch

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def finite_figures(report: Report) -> list[Figure]:
    assert report.figures, report.notes
    for figure in report.figures:
        assert math.isfinite(figure.value) and math.isfinite(figure.baseline_value), figure
    return report.figures


def test_descriptor_runtimes_agree_with_eager(tmp_path: Path) -> None:
    report = descriptor.measure(rounds=1, out=tmp_path, batch=2)
    figures = {f.name: f for f in finite_figures(report)}
    assert figures["torch agreement: min cosine per image"].met
    assert figures["onnx agreement: min cosine per image"].met
    assert (tmp_path / "descriptor.png").stat().st_size > 0


def test_index_folder_counts_every_photo(tmp_path: Path) -> None:
    make_large_jpegs(tmp_path / "photos", 3, size=(400, 300))
    run = indexing.index_folder(tmp_path / "photos", tmp_path / "index", "random", naive=2)
    assert run.images == 3 and not run.failed
    assert run.rss_peak >= run.rss_before > 0
    assert run.naive_images_per_s is not None and run.naive_images_per_s > 0
    report = Report("index", quick=True)
    indexing.describe(report, {"small": run}, "random")
    assert len(finite_figures(report)) == 4


def test_fresh_rounds_time_index_and_dupes_each_in_its_own_process(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_large_jpegs(photos, 3, size=(400, 300))
    Image.open(next(photos.iterdir())).save(photos / "copy.png")
    with Library(tmp_path / "index", weights="random", device="cpu") as lib:
        lib.index([photos])
    vectors = (tmp_path / "index" / "vectors.faiss").read_bytes()
    timed = fresh.alternate(photos, tmp_path / "index", tmp_path / "timed", "random", 2)
    for seconds in (timed.wall, timed.cpu):
        assert [len(seconds[kind]) for kind in ("index", "dupes")] == [2, 2]
        assert min(seconds["index"] + seconds["dupes"]) > 0
    medians = timed.timings()
    assert medians["dupes_s"] == sum(timed.wall["dupes"]) / 2
    assert timed.runs()["index_cpu_s"] == timed.cpu["index"]
    # The timed index is made anew each round and removed; the searched one is untouched.
    assert not (tmp_path / "timed").exists()
    assert (tmp_path / "index" / "vectors.faiss").read_bytes() == vectors
    with pytest.raises(RuntimeError, match="timed index failed"):
        fresh.alternate(tmp_path / "none", tmp_path / "index", tmp_path / "timed", "random", 1)


def test_query_finds_the_same_neighbours_as_numpy(tmp_path: Path) -> None:
    report = query.measure(tmp_path, "random", n_vectors=500, n_queries=2, quick=True)
    finite_figures(report)
    assert report.details["faiss_top10_equals_numpy"] == 1.0


def test_ann_recall_is_against_exact_search() -> None:
    from ghostmatch.indexes.vector_index import build_index

    x = np.random.default_rng(0).standard_normal((2100, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base, queries = x[:2000], x[2000:]
    assert ann.factories(2000, 16) == ["Flat", "IVF128,Flat", "HNSW32"]
    # The 10 best base rows of each query, by numpy, and what the IVF index finds.
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    ivf = build_index(np.arange(2000, dtype=np.int64), base, "IVF128,Flat", device="cpu")
    _, found = ivf.search(queries, 10)
    expected = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert expected < 1.0  # it misses some here, so a recall of 1.0 would be wrong
    # The approximate index listed first must not become the reference.
    results = ann.measure(base, queries, ["IVF128,Flat", "Flat", "HNSW32"])
    assert [r.factory for r in results] == ["IVF128,Flat", "Flat", "HNSW32"]
    assert results[0].recall_at_10 == pytest.approx(expected)
    assert results[1].recall_at_10 == 1.0
    assert 0.9 <= results[2].recall_at_10 <= 1.0


def test_allpairs_exact_path_equals_brute_force() -> None:
    report = allpairs.measure(2000, 16)
    finite_figures(report)
    assert report.details["exact"]["identical"]


def test_quality_scores_copies_above_distractors(tmp_path: Path) -> None:
    photos = []
    for name, label in (("astronaut", "a"), ("coffee", "b"), ("chelsea", "a"), ("rocket", "b")):
        path = tmp_path / "photos" / label / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=90)
        photos.append(Photo(path, label))
    report = Report("quality", quick=True)
    quality.evaluate(report, photos[:2], photos[2:], tmp_path / "work", "random", tmp_path)
    figures = {f.name: f.value for f in finite_figures(report)}
    assert report.details["near_duplicates"]["model"]["n_positive"] == 2 * 14 * 13 // 2
    assert report.details["class_retrieval_photos"] == 4
    assert (tmp_path / "quality_pr.png").exists()

    # The figures are what a user gets from `ghostmatch eval dupes` on the same set.
    at_p99 = report.details["thresholds_at_p99"]["model"]
    work = tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable, "-m", "ghostmatch.cli.app", "eval", "dupes", str(work / "set"),
            "--truth", str(work / "set" / "truth.json"), "--index", str(work / "index"),
            "--threshold", repr(at_p99), "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    assert cli["positive_pairs"] == 2 * 14 * 13 // 2
    assert cli["micro_ap"] == pytest.approx(figures["near-duplicates: micro-AP"], abs=1e-6)
    for level in ("0.99", "0.90"):
        key = f"recall_at_p{level[2:]}"
        value = figures[f"near-duplicates: recall @ precision {level}"]
        assert cli[key] == pytest.approx(value, abs=1e-6)
    for name, row in cli["per_transform"].items():
        assert row["recall"] == pytest.approx(figures[f"recall @ p99 threshold: {name}"], abs=1e-6)
    assert len(cli["per_transform"]) == 13


def test_dupes_stages_measures_stage_one_as_eval_dupes(tmp_path: Path) -> None:
    from benchmarks import dupes_stages
    from ghostmatch.eval.copies import read_truth
    from ghostmatch.eval.evaluation import duplicate_candidates, evaluate_duplicates
    from ghostmatch.library import Library

    photos = []
    for name in ("astronaut", "coffee", "chelsea"):
        path = tmp_path / "photos" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=90)
        photos.append(Photo(path, name))
    copies, truth = bench_data.copy_set(photos[:2], photos[2:], tmp_path / "work", 0)
    report = Report("dupes_stages", quick=True)
    with Library(tmp_path / "work" / "index", weights="random", device="cpu") as lib:
        lib.index([copies])
        candidates = duplicate_candidates(lib, read_truth(truth))
        exact = np.zeros(len(candidates.scores), bool)
        dupes_stages.evaluate(report, lib, candidates, exact, tmp_path)
        expected = evaluate_duplicates(lib, read_truth(truth), under=copies)
    figures = {f.name: f for f in finite_figures(report)}
    stage1 = report.details["stage1"]
    assert stage1["n_positive"] == 2 * 14 * 13 // 2
    assert stage1["micro_ap"] == expected.pairs.micro_ap
    assert figures["micro-AP, stage 2"].baseline_value == expected.pairs.micro_ap
    by_transform = {name: t.recall for name, t in expected.per_transform.items()}
    assert report.details["per_transform_stage1"] == by_transform
    assert report.details["verified_pairs"] > 0
    assert (tmp_path / "dupes_stages_pr.png").exists()


def test_quality_without_shared_data_says_it_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_data, "CALTECH", tmp_path / "absent")
    report = quality.run(Settings(quick=True, out=tmp_path))
    assert not report.figures
    assert "skipped" in report.notes[0]


def test_summary_lists_reports_and_skips_foreign_json(tmp_path: Path) -> None:
    report = Report("descriptor", quick=True, command="python -m benchmarks --only descriptor")
    report.add(Figure("onnx", 25.0, "img/s", "eager", 10.0, target=">= 1.8x", met=True))
    save(report, tmp_path)
    (tmp_path / "allpairs.json").write_text(json.dumps({"params": {}}))
    text = write_summary(tmp_path, ["descriptor", "allpairs"]).read_text()
    assert "| onnx | 25.0 img/s | eager | 10.0 img/s | 2.5x | >= 1.8x: met |" in text
    assert "## allpairs" not in text


def test_a_benchmark_run_on_its_own_refreshes_the_summary(tmp_path: Path) -> None:
    (tmp_path / "summary.md").write_text("stale")

    def measure() -> Report:
        report = Report("turns", quick=True)
        report.add(Figure("found at 90", 0.96, "", "upright", 1.0))
        return report

    run_and_save("turns", ["--quick"], tmp_path, measure)
    text = (tmp_path / "summary.md").read_text()
    assert "## turns (quick" in text and "`python -m benchmarks.turns --quick`" in text


def test_the_summary_follows_the_benchmarks_the_main_command_runs() -> None:
    assert list(ORDER) == list(BENCHMARKS)


def test_caltech_test_leaves_out_the_second_photo_of_each_known_duplicate(
    tmp_path: Path,
) -> None:
    pairs = bench_data.known_duplicates()
    assert len(pairs) >= 20
    root = tmp_path / "caltech101"
    listed = [p for pair in pairs for p in pair] + ["cat/image_0001.jpg"]
    (root / "test.txt").parent.mkdir()
    (root / "test.txt").write_text("\n".join(listed) + "\n")
    kept = {str(p.path.relative_to(root)) for p in bench_data.caltech_test(root) or []}
    assert kept == {first for first, _ in pairs} | {"cat/image_0001.jpg"}
    everything = bench_data.caltech_test(root, distinct=False) or []
    assert len(everything) == len(listed)


def test_heldout_photos_are_in_no_tuning_set() -> None:
    from benchmarks import dupes_stages, heldout

    photos = [Photo(Path(f"/data/c{i % 9}/image_{i:04d}.jpg"), f"c{i % 9}") for i in range(2735)]
    tuned_sources, tuned_distractors = dupes_stages.choose(photos, quick=False)
    tuned = {p.path for p in (*tuned_sources, *tuned_distractors)}
    assert len(tuned) == dupes_stages.SOURCES + dupes_stages.DISTRACTORS
    trained = {photos[3].path, photos[-1].path}
    for quick in (False, True):
        sources, distractors = heldout.split(photos, quick, trained)
        held = [p.path for p in (*sources, *distractors)]
        assert len(set(held)) == len(held)
        assert not set(held) & tuned and not set(held) & trained
        assert len(sources) == (heldout.SOURCES_QUICK if quick else heldout.SOURCES)
    # The full run uses every photo left, not a sample of them.
    sources, distractors = heldout.split(photos, False, trained)
    assert {p.path for p in (*sources, *distractors)} == {p.path for p in photos} - tuned - trained


def test_heldout_split_of_the_real_test_photos() -> None:
    from benchmarks import heldout

    photos = bench_data.caltech_test()
    if photos is None:
        pytest.skip("no caltech101 photos beside the checkout")
    trained = heldout.trained_photos(bench_data.CALTECH)
    assert trained and not trained & {p.path for p in photos}
    sources, distractors = heldout.split(photos, False, trained)
    assert len(sources) == heldout.SOURCES
    assert len(sources) + len(distractors) == len(photos) - len(heldout.tuning_photos(photos))


def test_shipped_rule_search_and_its_threshold_alone_baseline() -> None:
    from benchmarks.dupes_stages import best_rule, best_threshold

    # Scores high to low; the 0.7 and 0.6 pairs are true only with enough inliers seen.
    scores = np.array([0.95, 0.9, 0.85, 0.7, 0.7, 0.6, 0.6, 0.5])
    same = np.array([True, True, False, True, False, True, False, False])
    inliers = np.array([0, 0, 0, 40, 3, 50, 5, 2], float)
    exact = np.zeros(8, bool)
    alone = best_threshold(scores, same, exact, n_positive=5, precision=0.99)
    # Only the two top pairs keep precision 1 by score alone.
    assert alone == {"recall": 0.4, "precision": 1.0, "threshold": 0.9}
    # An exact pair is in whatever the threshold.
    exact[2] = True
    same[2] = True
    assert best_threshold(scores, same, exact, n_positive=5, precision=0.99)["recall"] == 0.6
    exact[2], same[2] = False, False
    rule = best_rule(scores, same, inliers, np.ones(8, bool), exact, n_positive=5, precision=0.99)
    # Inliers rescue the 0.7 and 0.6 true pairs and reject their look-alikes.
    assert rule["recall"] == 0.8 and rule["precision"] == 1.0
    assert rule["threshold"] > 0.85 and 6 <= rule["min_inliers"] <= 40


def test_a_benchmark_saves_its_figures_command_and_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--n", "2000", "--rounds", "1", "--out", str(tmp_path)]
    assert index_open_main(args) == 0
    saved = json.loads((tmp_path / "index_open.json").read_text())
    report = Report.from_dict(saved)
    assert report.command == "python -m benchmarks.index_open " + " ".join(args)
    assert report.environment["cpus"] and report.seconds > 0
    figures = finite_figures(report)
    printed = capsys.readouterr().out
    assert all(f.name in printed for f in figures) and "wrote " in printed
