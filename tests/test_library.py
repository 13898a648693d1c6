"""The engine on real photos and the random model: incremental indexing, catalog and FAISS
kept in step (through Ctrl-C and lost index saves), every index type against exact
search, and queries by path, PIL image or array."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from corpus import UNREADABLE_NAME, make_bad_files
from PIL import Image, ImageOps

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.vector_index import VectorIndex
from ghostmatch.library import CARD_META, INDEX_FILE, WEIGHTS_META, IndexReport, Library
from ghostmatch.retrieval.refine import PLAIN
from ghostmatch.store.catalog import NewImage
from ghostmatch.store.locking import WriterLock

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]

DIM = 960  # the random model's descriptor size


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gallery(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos, a byte-for-byte copy of one, and transformed copies in ``variants/``."""
    folder = tmp_path_factory.mktemp("gallery")
    for file in sorted(photos.iterdir()):
        shutil.copy2(file, folder / file.name)
    (folder / "copies").mkdir()
    shutil.copy2(photos / "astronaut.jpg", folder / "copies" / "astronaut-copy.jpg")
    variants = folder / "variants"
    variants.mkdir()
    with Image.open(photos / "coffee.jpg") as coffee:
        coffee.resize((300, 200)).save(variants / "coffee-small.jpg", quality=85)
    with Image.open(photos / "rocket.jpg") as rocket:
        ImageOps.mirror(rocket).save(variants / "rocket-mirrored.jpg", quality=90)
    with Image.open(photos / "chelsea.jpg") as cat:
        cat.crop((40, 30, 400, 280)).save(variants / "chelsea-crop.png")
    return folder


@pytest.fixture(scope="session")
def library(gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    """The gallery indexed once; tests only read it (copy it with ``clone`` to change it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHOSTMATCH_OFFLINE", "1")
        mp.setenv("GHOSTMATCH_CACHE", str(tmp_path_factory.getbasetemp() / "model-cache"))
        lib = ghostmatch.open(tmp_path_factory.mktemp("gallery-index"), weights="random")
        report = lib.index([gallery], batch_size=4)
        assert report.added == len(image_files(gallery)) and not report.failed
    yield lib
    lib.close()


def clone(lib: Library, where: Path) -> Library:
    """An independent copy of an index folder, opened."""
    lib.catalog.close()  # folds the WAL into catalog.db; the catalog reconnects on next use
    shutil.copytree(lib.path, where)
    return ghostmatch.open(where)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))


def small_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct 64x64 noise JPEGs (cheap to write, all different vectors)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        file = folder / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(file, quality=80)
        files.append(file)
    return files


@pytest.fixture
def album(photos: Path, tmp_path: Path) -> Path:
    """A private folder of four photos that a test may change."""
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg", "camera.png"):
        shutil.copy2(photos / name, folder / name)
    return folder


@pytest.fixture
def album_index(album: Path, tmp_path: Path) -> Iterator[Library]:
    lib = ghostmatch.open(tmp_path / "index", weights="random")
    report = lib.index([album], batch_size=4)
    assert report.added == 4
    yield lib
    lib.close()


def assert_consistent(lib: Library) -> None:
    """Catalog and FAISS hold the same ids and vectors, in memory and as saved on disk."""
    ids, vectors = lib.catalog.vectors()
    paths = list(lib.catalog.all_stat())
    assert len(paths) == len(set(paths)) == len(ids)
    index = lib.vector_index
    if len(ids) == 0:
        assert index is None
        return
    assert index is not None
    np.testing.assert_array_equal(index.ids(), ids)
    np.testing.assert_allclose(index.reconstruct(ids), vectors, atol=1e-6)
    # The saved file is current: a fresh open loads it as it is instead of rebuilding it.
    file = lib.path / INDEX_FILE
    before = file.stat().st_mtime_ns
    with ghostmatch.open(lib.path) as fresh:
        assert fresh.vector_index is not None
        np.testing.assert_array_equal(fresh.vector_index.ids(), ids)
    assert file.stat().st_mtime_ns == before, "the saved index was stale and got rebuilt"


def record(lib: Library, path: Path):  # type: ignore[no-untyped-def]
    return lib.catalog.records_by_path([path])[path]


def stored_vector(lib: Library, path: Path) -> np.ndarray:
    found = lib.catalog.records_by_path([path])
    assert path in found, f"{path} is not in the catalog"
    _, vectors = lib.catalog.vectors([found[path].id])
    return vectors[0]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# ---------------------------------------------------------------------------- embedding


def test_embed_gives_unit_float32_rows_for_paths_images_and_arrays(
    library: Library, gallery: Path
) -> None:
    path = gallery / "camera.png"  # PNG: every route sees exactly the same pixels
    with Image.open(path) as image:
        pil = image.copy()
    gray = np.asarray(pil)
    out = library.embed([path, str(path), pil, gray, gray.astype(np.float32) / 255.0])
    assert out.shape == (5, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.min(out @ out[0]) > 0.9999
    other = library.embed([gallery / "rocket.jpg"])
    assert float(other[0] @ out[0]) < 0.999  # different photos differ


def test_embed_rejects_bad_input(library: Library, tmp_path: Path) -> None:
    text = tmp_path / "note.jpg"
    text.write_text("not a photo")
    with pytest.raises(GhostmatchError, match=r"note\.jpg"):
        library.embed([text])
    with pytest.raises(GhostmatchError, match="shape"):
        library.embed([np.zeros((3, 8, 8, 2), np.uint8)])


# ---------------------------------------------------------------------------- queries


def test_indexed_path_uses_its_stored_vector_and_never_matches_itself(
    library: Library, gallery: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = gallery / "astronaut.jpg"
    vector, own_id = library.query_vector(path)
    assert own_id == record(library, path).id
    np.testing.assert_array_equal(vector, stored_vector(library, path))
    total = library.catalog.count()
    matches = library.query(path, k=total, refine=PLAIN)
    assert len(matches) == total - 1
    assert path not in {m.path for m in matches}
    assert matches[0].path == gallery / "copies" / "astronaut-copy.jpg"
    assert matches[0].score > 0.9999
    assert [m.rank for m in matches] == list(range(1, total))
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True)
    # The same query by a relative path.
    monkeypatch.chdir(gallery)
    relative = library.query("astronaut.jpg", k=3, refine=PLAIN)
    assert [m.path for m in relative] == [m.path for m in matches[:3]]


def test_query_by_image_or_array_finds_the_file(library: Library, gallery: Path) -> None:
    path = gallery / "camera.png"
    with Image.open(path) as image:
        pil = image.copy()
    for query in (pil, np.asarray(pil), np.asarray(pil.convert("RGB"))):
        matches = library.query(query, k=3, refine=PLAIN)
        assert matches[0].path == path and matches[0].score > 0.9999
        assert (matches[0].width, matches[0].height) == pil.size
        assert matches[0].bytes == path.stat().st_size


def test_query_match_fields_describe_the_file(library: Library, gallery: Path) -> None:
    for match in library.query(gallery / "coffee.jpg", k=20):
        with Image.open(match.path) as image:
            assert (match.width, match.height) == image.size
        assert match.bytes == match.path.stat().st_size
        assert match.id == record(library, match.path).id


def test_query_under_a_folder_is_exact_over_that_folder(library: Library, gallery: Path) -> None:
    variants = gallery / "variants"
    query = gallery / "coffee.jpg"
    matches = library.query(query, k=2, under=variants, refine=PLAIN)
    ids = [i for i, p in library.catalog.paths_under(variants)]
    _, vectors = library.catalog.vectors(ids)
    exact = np.sort(vectors @ stored_vector(library, query))[::-1][:2]
    assert [m.path.parent for m in matches] == [variants, variants]
    np.testing.assert_allclose([m.score for m in matches], exact, atol=1e-5)
    # A query inside the folder does not find itself there either.
    inside = variants / "rocket-mirrored.jpg"
    assert inside not in {m.path for m in library.query(inside, k=10, under=variants)}


def test_min_score_keeps_only_matches_at_least_that_good(library: Library, gallery: Path) -> None:
    query = gallery / "rocket.jpg"
    everything = library.query(query, k=50)
    cut = everything[len(everything) // 2].score
    kept = library.query(query, k=50, min_score=cut)
    assert kept == [m for m in everything if m.score >= cut]
    assert 0 < len(kept) < len(everything)


@pytest.mark.parametrize("options", [{"k": 0}, {"min_score": 1.5}, {"min_score": -2.0}])
def test_bad_query_options_are_user_errors(library: Library, gallery: Path, options) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GhostmatchError):
        library.query(gallery / "rocket.jpg", **options)


def test_query_of_a_missing_file_is_a_user_error(library: Library, tmp_path: Path) -> None:
    with pytest.raises(GhostmatchError, match="does not exist"):
        library.query(tmp_path / "nothing.jpg")


def test_other_weights_for_an_existing_index_are_refused(library: Library) -> None:
    with pytest.raises(GhostmatchError, match="built with weights 'random'"):
        ghostmatch.open(library.path, weights="imagenet")
    with ghostmatch.open(library.path, weights="random") as same:  # naming the same is fine
        assert same.card == library.card


def test_vectors_of_another_model_are_never_mixed(library: Library, tmp_path: Path) -> None:
    """An index whose recorded model no longer matches what its weights load refuses to
    embed (as when the weights file it names was replaced)."""
    lib = clone(library, tmp_path / "index")
    try:
        assert lib.card is not None
        lib.catalog.set_meta(CARD_META, lib.card.with_changes(weights_sha256="1" * 64).to_dict())
        lib.catalog.set_meta(WEIGHTS_META, "random")
        with Image.open(next(iter(lib.catalog.all_stat()))) as image:
            picture = image.copy()
        with pytest.raises(GhostmatchError, match="no longer match"):
            lib.query(picture)
    finally:
        lib.close()


def test_a_copied_index_folder_opens_without_a_rebuild(library: Library, tmp_path: Path) -> None:
    lib = clone(library, tmp_path / "index")
    try:
        saved = (lib.path / INDEX_FILE).stat().st_mtime_ns
        assert lib.vector_index is not None
        assert (lib.path / INDEX_FILE).stat().st_mtime_ns == saved
        np.testing.assert_array_equal(lib.vector_index.ids(), lib.catalog.ids())
    finally:
        lib.close()


def test_opening_a_folder_that_is_no_index_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(GhostmatchError, match="no index"):
        ghostmatch.open(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GhostmatchError, match="no index"):
        ghostmatch.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------------------- index types


def test_every_index_type_answers_like_exact_search(library: Library, tmp_path: Path) -> None:
    lib = clone(library, tmp_path / "index")
    try:
        ids, base = lib.catalog.vectors()
        # 400 more vectors around the photos' (cosine ~0.45..0.99), so each query has
        # neighbours at well-spread scores and IVF has enough points to train its lists.
        rng = np.random.default_rng(7)
        rows = []
        for n in range(400):
            noise = rng.standard_normal(DIM).astype(np.float32) * rng.uniform(0.1, 2.0)
            v = base[n % len(base)] + noise / np.sqrt(DIM)
            v /= np.linalg.norm(v)
            rows.append(
                NewImage(tmp_path / "synthetic" / f"{n}.jpg", 1, 1, f"s{n}", 8, 8, "JPEG", v)
            )
        with lib.catalog.transaction() as tx:
            tx.insert_images(rows)
        photos = [p for p, (i, _, _) in lib.catalog.all_stat().items() if i in set(ids.tolist())]

        def answers() -> list[list[tuple[int, float]]]:
            return [
                [(m.id, m.score) for m in lib.query(p, k=10, refine=PLAIN)] for p in sorted(photos)
            ]

        assert lib.rebuild("Flat") == "Flat"
        exact = answers()
        for factory in ("HNSW32", "IVF8,Flat", "IVF4_HNSW32,Flat"):
            assert lib.rebuild(factory) == factory
            assert lib.vector_index is not None and lib.vector_index.factory == factory
            got = answers()
            for want, found in zip(exact, got, strict=True):
                assert [i for i, _ in found] == [i for i, _ in want], factory
                np.testing.assert_allclose([s for _, s in found], [s for _, s in want], atol=1e-4)
            assert_consistent(lib)
        # Changes after a rebuild keep the chosen type and stay in step with the catalog.
        gone = sorted(photos)[0]
        assert lib.remove([gone]) == 1
        assert_consistent(lib)
        assert gone not in {m.path for m in lib.query(sorted(photos)[1], k=50)}
    finally:
        lib.close()
    with ghostmatch.open(tmp_path / "index") as reopened:
        assert reopened.vector_index is not None
        assert reopened.vector_index.factory == "IVF4_HNSW32,Flat"


# ---------------------------------------------------------------------------- incremental
# Each model load costs seconds here, so each test below follows one index through steps.


def test_unchanged_touched_changed_and_broken_files(album_index: Library, album: Path) -> None:
    lib = album_index
    records = lib.catalog.get(lib.catalog.ids().tolist())

    # Nothing changed: nothing is read, nothing is written.
    report = lib.index([album])
    assert (report.unchanged, report.embedded, report.added, report.updated) == (4, 0, 0, 0)
    assert lib.catalog.get(lib.catalog.ids().tolist()) == records  # ids, stats, indexed_at
    assert_consistent(lib)

    # Touched (new mtime, same bytes): updated in place, same id, same vector.
    touched = album / "coffee.jpg"
    old, old_vector = record(lib, touched), stored_vector(lib, touched)
    bump_mtime(touched)
    report = lib.index([album])
    assert (report.updated, report.unchanged, report.embedded, report.added) == (1, 3, 1, 0)
    assert record(lib, touched).id == old.id
    assert record(lib, touched).mtime_ns == touched.stat().st_mtime_ns
    np.testing.assert_allclose(stored_vector(lib, touched), old_vector, atol=1e-5)
    assert_consistent(lib)

    # New content: a new vector under the same id, in the catalog and in FAISS.
    changed = album / "rocket.jpg"
    old, old_vector = record(lib, changed), stored_vector(lib, changed)
    with Image.open(changed) as image:
        ImageOps.flip(image).save(changed, quality=90)
    report = lib.index([album])
    assert (report.updated, report.embedded, report.added, report.removed) == (1, 1, 0, 0)
    new_vector = stored_vector(lib, changed)
    assert record(lib, changed).id == old.id
    assert record(lib, changed).content_hash != old.content_hash
    assert float(new_vector @ old_vector) < 0.9999
    np.testing.assert_allclose(new_vector, lib.embed([changed])[0], atol=1e-5)
    assert lib.vector_index is not None
    reconstructed = lib.vector_index.reconstruct(np.array([old.id]))[0]
    np.testing.assert_allclose(reconstructed, new_vector, atol=1e-6)
    assert_consistent(lib)

    # Broken (cut in half): it leaves the index and is listed as a failure.
    broken = album / "astronaut.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    report = lib.index([album])
    assert report.failed == Counter({"truncated": 1})
    assert broken not in lib.catalog.all_stat()
    assert [f.path for f in lib.catalog.failures()] == [broken]
    assert_consistent(lib)


def test_moved_deleted_and_new_files(album_index: Library, album: Path, photos: Path) -> None:
    lib = album_index

    # Moved into a new folder: same id and vector, nothing embedded, nothing removed.
    old_path = album / "coffee.jpg"
    old, vector = record(lib, old_path), stored_vector(lib, old_path)
    (album / "2024").mkdir()
    new_path = album / "2024" / "renamed.jpg"
    os.rename(old_path, new_path)
    report = lib.index([album])
    assert (report.moved, report.embedded, report.added, report.removed) == (1, 0, 0, 0)
    assert old_path not in lib.catalog.all_stat()
    assert record(lib, new_path).id == old.id
    np.testing.assert_array_equal(stored_vector(lib, new_path), vector)
    assert_consistent(lib)

    # Deleted: kept with prune=False and by add(), removed by a full run.
    gone = album / "astronaut.jpg"
    gone.unlink()
    report = lib.index([album], prune=False)
    assert report.removed == 0 and gone in lib.catalog.all_stat()
    extra = small_jpegs(album / "new", 1)[0]
    report = lib.add([extra])
    assert (report.added, report.removed) == (1, 0) and gone in lib.catalog.all_stat()
    report = lib.index([album])
    assert (report.removed, report.embedded) == (1, 0)
    assert gone not in lib.catalog.all_stat()
    assert_consistent(lib)

    # New, and also named on its own inside a named folder: added once.
    shutil.copy2(photos / "hubble_deep_field.jpg", album / "hubble.jpg")
    report = lib.index([album, album / "hubble.jpg", album])
    assert (report.added, report.embedded, report.unchanged) == (1, 1, 4)
    assert lib.query(album / "hubble.jpg", k=1)[0].path != album / "hubble.jpg"
    assert set(lib.catalog.all_stat()) == set(image_files(album))
    assert_consistent(lib)


def test_identical_files_when_originals_move(album_index: Library, album: Path) -> None:
    """Same content under several names: every move is found, nothing crashes."""
    lib = album_index
    original = album / "rocket.jpg"
    shutil.copy2(original, album / "rocket-twin.jpg")
    report = lib.index([album])
    assert (report.added, report.embedded) == (1, 1)
    twin_id = record(lib, album / "rocket-twin.jpg").id
    original_id = record(lib, original).id

    os.rename(original, album / "moved-rocket.jpg")  # its twin stays
    report = lib.index([album])
    assert (report.moved, report.embedded, report.removed) == (1, 0, 0)
    assert record(lib, album / "moved-rocket.jpg").id == original_id
    assert record(lib, album / "rocket-twin.jpg").id == twin_id

    # Moved again, and copied too: one copy takes the old id, the other is new.
    os.rename(album / "moved-rocket.jpg", album / "a.jpg")
    shutil.copy2(album / "a.jpg", album / "b.jpg")
    report = lib.index([album])
    assert (report.moved, report.added, report.embedded, report.removed) == (1, 1, 1, 0)
    assert original_id in {record(lib, album / n).id for n in ("a.jpg", "b.jpg")}

    # Both twins moved at once: each keeps an id of its own.
    os.rename(album / "rocket-twin.jpg", album / "c.jpg")
    os.rename(album / "a.jpg", album / "d.jpg")
    report = lib.index([album])
    assert (report.moved, report.embedded, report.removed) == (2, 0, 0)
    assert {record(lib, album / n).id for n in ("c.jpg", "d.jpg")} == {twin_id, original_id}
    assert set(lib.catalog.all_stat()) == set(image_files(album))
    assert_consistent(lib)


# ---------------------------------------------------------------------------- bad files


def test_bad_files_are_recorded_and_not_retried(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    expected = make_bad_files(folder)
    if os.access(folder / UNREADABLE_NAME, os.R_OK):
        expected[UNREADABLE_NAME] = "ok"  # running as root: chmod 000 does not stop reads
    shutil.copy2(photos / "coffee.jpg", folder / "coffee.jpg")
    expected["coffee.jpg"] = "ok"
    bad = {name: reason for name, reason in expected.items() if reason != "ok"}
    good = {name for name, reason in expected.items() if reason == "ok"}

    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        report = lib.index([folder], batch_size=4)
        assert report.failed == Counter(bad.values())
        assert {p.name: r for p, r, _ in report.failures} == bad
        assert report.added == len(good) == lib.catalog.count()
        assert {p.name for p in lib.catalog.all_stat()} == good
        assert {f.path.name: f.reason for f in lib.catalog.failures()} == bad
        assert lib.info()["failures"] == dict(Counter(bad.values()))
        assert_consistent(lib)

        again = lib.index([folder])
        assert again.embedded == 0 and again.added == 0
        assert again.unchanged == len(good)
        # Files the scan sees are skipped as known bad; one it cannot even stat (a broken
        # link) is reported again, without being read.
        assert again.known_bad + sum(again.failed.values()) == len(bad)
        assert again.known_bad >= len(bad) - 1
        assert {f.path.name: f.reason for f in lib.catalog.failures()} == bad

        # Fixed by the user: read again, indexed, and no longer listed as a failure.
        shutil.copy2(photos / "rocket.jpg", folder / "text.jpg")
        fixed = lib.index([folder])
        assert (fixed.added, fixed.embedded) == (1, 1)
        assert "text.jpg" not in {f.path.name for f in lib.catalog.failures()}
        assert_consistent(lib)


# ---------------------------------------------------------------------------- interruption


def test_ctrl_c_keeps_the_finished_work(tmp_path: Path) -> None:
    files = small_jpegs(tmp_path / "many", 24)

    def interrupt_at_14(stage: str, done: int, total: int | None) -> None:
        if stage == "indexed" and done == 14:
            raise KeyboardInterrupt

    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        report = lib.index([tmp_path / "many"], batch_size=4, progress=interrupt_at_14)
        assert report.interrupted
        # Three batches of 4 went through the model before the 14th file; they are kept.
        assert report.added == report.embedded == lib.catalog.count() == 12
        assert_consistent(lib)

        rest = lib.index([tmp_path / "many"], batch_size=4)
        assert not rest.interrupted
        assert (rest.unchanged, rest.added, rest.embedded) == (12, 12, 12)
        assert set(lib.catalog.all_stat()) == set(files)
        assert_consistent(lib)


# ---------------------------------------------------------------------------- crash repair


@pytest.fixture(scope="module")
def before_and_after(
    photos: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> tuple[Path, Path, Path]:
    """An index saved before and after ``changed.jpg`` got new content (so the same ids,
    one new vector); the two states' folders, and the changed file."""
    folder = tmp_path_factory.mktemp("crash-album")
    for name in ("astronaut.jpg", "coffee.jpg", "camera.png"):
        shutil.copy2(photos / name, folder / name)
    changed = folder / "changed.jpg"
    shutil.copy2(photos / "rocket.jpg", changed)
    root = tmp_path_factory.mktemp("crash-states")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHOSTMATCH_OFFLINE", "1")
        mp.setenv("GHOSTMATCH_CACHE", str(model_cache))
        with ghostmatch.open(root / "live", weights="random") as lib:
            lib.index([folder])
            lib.catalog.close()  # folds the WAL into catalog.db; it reconnects on next use
            shutil.copytree(root / "live", root / "before")
            with Image.open(photos / "rocket.jpg") as image:
                ImageOps.flip(image).save(changed, quality=90)
            report = lib.index([folder])
            assert (report.updated, report.added) == (1, 0)
    return root / "before", root / "live", changed


GENERATION = INDEX_FILE + ".generation"


@pytest.mark.parametrize(
    "scenario",
    [
        "old index and its generation",  # the crash: catalog committed, index not saved
        "old index alone",  # an older copy of the index file put back
        "generation deleted",
        "generation garbled",
        "generation of another commit",
        "index deleted",
        "index garbled",
        "index overwritten in place",  # same size, mtime put back
    ],
)
def test_opening_repairs_an_index_that_lags_the_catalog(
    before_and_after: tuple[Path, Path, Path], tmp_path: Path, scenario: str
) -> None:
    before, after, changed = before_and_after
    index_dir = tmp_path / "index"
    shutil.copytree(after, index_dir)
    if scenario == "old index and its generation":
        shutil.copy2(before / INDEX_FILE, index_dir / INDEX_FILE)
        shutil.copy2(before / GENERATION, index_dir / GENERATION)
    elif scenario == "old index alone":
        shutil.copy2(before / INDEX_FILE, index_dir / INDEX_FILE)
    elif scenario == "generation deleted":
        (index_dir / GENERATION).unlink()
    elif scenario == "generation garbled":
        (index_dir / GENERATION).write_text("not a number")
    elif scenario == "generation of another commit":
        (index_dir / GENERATION).write_text((before / GENERATION).read_text())
    elif scenario == "index deleted":
        (index_dir / INDEX_FILE).unlink()
    elif scenario == "index overwritten in place":
        file = index_dir / INDEX_FILE
        st = file.stat()
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\x7f" * 64  # floats of about 3.4e38
        file.write_bytes(bytes(raw))
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        (index_dir / INDEX_FILE).write_bytes(b"\x00" * 100)

    with ghostmatch.open(index_dir) as lib:
        ids, _ = lib.catalog.vectors()
        index = lib.vector_index
        assert index is not None
        np.testing.assert_array_equal(index.ids(), ids)
        changed_id = record(lib, changed).id
        np.testing.assert_allclose(
            index.reconstruct(np.array([changed_id]))[0], stored_vector(lib, changed), atol=1e-6
        )
        # The repaired index was saved: the next open takes it as it is.
        assert_consistent(lib)
    # The scenario really did leave a stale index behind (else this test proves nothing).
    with ghostmatch.open(before) as old:
        stale = VectorIndex.load(before / INDEX_FILE)
        old_vector = stale.reconstruct(np.array([changed_id]))[0]
        assert float(old_vector @ stored_vector(old, changed)) > 0.99999
    with ghostmatch.open(after) as new:
        assert float(old_vector @ stored_vector(new, changed)) < 0.9999


def test_a_query_never_trusts_an_index_file_overwritten_in_place(
    before_and_after: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, after, changed = before_and_after
    index_dir = tmp_path / "index"
    shutil.copytree(after, index_dir)
    file = index_dir / INDEX_FILE
    st = file.stat()
    raw = bytearray(file.read_bytes())
    # Every stored float from a quarter of the file on becomes about 3.4e38.
    raw[len(raw) // 4 : len(raw) - 64] = b"\x7f" * (len(raw) - 64 - len(raw) // 4)
    file.write_bytes(bytes(raw))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    with ghostmatch.open(index_dir) as lib:
        matches = lib.query(changed, k=10, refine=PLAIN)
        assert matches and all(-1.0 <= m.score <= 1.0 for m in matches)
        ids, vectors = lib.catalog.vectors()
        own_id = record(lib, changed).id
        own = vectors[list(ids).index(own_id)]
        scores = sorted(
            (float(v @ own) for i, v in zip(ids, vectors, strict=True) if i != own_id),
            reverse=True,
        )
        np.testing.assert_allclose([m.score for m in matches], scores[: len(matches)], atol=1e-5)


# ---------------------------------------------------------------------------- index file


def test_the_index_type_chosen_at_creation_survives_a_rebuild(photos: Path, tmp_path: Path) -> None:
    with ghostmatch.open(tmp_path / "index", weights="random", index_type="HNSW32") as lib:
        lib.index([photos], batch_size=4)
        assert lib.vector_index is not None and lib.vector_index.factory.startswith("HNSW32")
    (tmp_path / "index" / INDEX_FILE).unlink()  # lost; rebuilt from the catalog on open
    with ghostmatch.open(tmp_path / "index") as lib:
        assert lib.vector_index is not None
        assert lib.vector_index.factory.startswith("HNSW32")


def test_an_index_type_asked_of_an_existing_index_rebuilds_it(photos: Path, tmp_path: Path) -> None:
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        lib.index([photos], batch_size=4)
        assert lib.vector_index is not None and lib.vector_index.factory == "Flat"
    with ghostmatch.open(tmp_path / "index", index_type="HNSW32") as lib:
        report = lib.index([photos], batch_size=4)
        assert report.added == 0
        assert lib.vector_index is not None and lib.vector_index.factory.startswith("HNSW32")
    with ghostmatch.open(tmp_path / "index") as lib:  # and it stays that type
        assert lib.vector_index is not None and lib.vector_index.factory.startswith("HNSW32")


def test_checkpoints_write_the_catalog_and_the_index_file_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HNSW index cannot delete, so each removal rebuilds it: a run of many checkpoints
    that changes files must remove (and save) once, not at every checkpoint."""
    files = small_jpegs(tmp_path / "many", 24)
    with ghostmatch.open(tmp_path / "index", weights="random", index_type="HNSW32") as lib:
        lib.index([tmp_path / "many"], batch_size=4)
        for file in files[:16]:
            small_jpegs(tmp_path / "other", 1, seed=files.index(file) + 100)
            shutil.move(tmp_path / "other" / "0000.jpg", file)
        calls: Counter[str] = Counter()
        for name in ("remove", "save"):
            original = getattr(VectorIndex, name)

            def counted(self, *args, _name=name, _original=original):  # type: ignore[no-untyped-def]
                calls[_name] += 1
                return _original(self, *args)

            monkeypatch.setattr(VectorIndex, name, counted)
        monkeypatch.setattr("ghostmatch.ingest.indexer.CHECKPOINT_IMAGES", 4)
        report = lib.index([tmp_path / "many"], batch_size=4)
        assert report.updated == 16
        assert calls == Counter(remove=1, save=1)
        assert_consistent(lib)


def test_work_is_committed_every_few_seconds_as_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However few images a checkpoint's count would take, seconds of work are committed:
    with the time limit at 0 each finished image is in the catalog before the next."""
    small_jpegs(tmp_path / "many", 12)
    monkeypatch.setattr("ghostmatch.ingest.indexer.CHECKPOINT_IMAGES", 1000)
    monkeypatch.setattr("ghostmatch.ingest.indexer.CHECKPOINT_SECONDS", 0.0)
    seen: list[tuple[int, int]] = []
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:

        def look(stage: str, done: int, total: int | None) -> None:
            if stage == "indexed":
                seen.append((done, committed_images(lib.path)))

        lib.index([tmp_path / "many"], batch_size=4, progress=look)
        assert_consistent(lib)
    assert seen == [(n, n) for n in range(1, 13)]


def committed_images(index: Path) -> int:
    """Images committed so far, read the way another process would."""
    with sqlite3.connect(f"file:{index / 'catalog.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM images").fetchone()[0])


def test_the_saved_index_holds_what_its_stamp_says_with_two_writers(
    photos: Path, tmp_path: Path
) -> None:
    """One writer holds the index in memory while another rewrites X.jpg; the first then
    adds a folder. The file it saves must hold X's new vector, or be marked stale."""
    album = tmp_path / "album"
    album.mkdir()
    shutil.copy2(photos / "rocket.jpg", album / "X.jpg")
    shutil.copy2(photos / "coffee.jpg", album / "coffee.jpg")
    (tmp_path / "more").mkdir()
    shutil.copy2(photos / "astronaut.jpg", tmp_path / "more" / "astronaut.jpg")
    with ghostmatch.open(tmp_path / "index", weights="random") as first:
        first.index([album])
        assert first.vector_index is not None  # held in memory from here on
        with ghostmatch.open(tmp_path / "index") as second:
            with Image.open(photos / "chelsea.jpg") as cat:
                cat.save(album / "X.jpg", quality=90)
            assert second.index([album]).updated == 1
        assert first.index([tmp_path / "more"]).added == 1
        assert_consistent(first)
    shutil.copy2(album / "X.jpg", tmp_path / "copy-of-X.jpg")
    with ghostmatch.open(tmp_path / "index") as lib:
        assert lib.query(tmp_path / "copy-of-X.jpg", k=1)[0].path == album / "X.jpg"


# ---------------------------------------------------------------------------- one writer


def test_a_second_writer_waits_for_the_first_or_fails_fast(photos: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    held = WriterLock(index)
    index.mkdir()
    held.acquire()
    try:
        with ghostmatch.open(index, weights="random", wait=False) as lib:
            with pytest.raises(GhostmatchError, match="another ghostmatch process is writing"):
                lib.index([photos])
            assert lib.catalog.count() == 0
        waiting = threading.Event()
        messages: list[str] = []
        outcome: list[object] = []

        def writer() -> None:
            def on_wait(message: str) -> None:
                messages.append(message)
                waiting.set()

            try:
                with ghostmatch.open(index, weights="random", on_wait=on_wait) as lib:
                    outcome.append(lib.index([photos], batch_size=4))
            except BaseException as error:  # reported below
                outcome.append(error)
                waiting.set()

        thread = threading.Thread(target=writer)
        thread.start()
        assert waiting.wait(120)
        assert messages == ["another ghostmatch index is writing this index; waiting..."]
        assert not outcome  # still waiting for the lock held here
    finally:
        held.release()
    thread.join(300)
    (report,) = outcome
    assert isinstance(report, IndexReport) and report.added == len(image_files(photos))


def test_a_reader_repairs_in_memory_while_a_writer_holds_the_lock(
    before_and_after: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    before, after, changed = before_and_after
    index_dir = tmp_path / "index"
    shutil.copytree(after, index_dir)
    shutil.copy2(before / INDEX_FILE, index_dir / INDEX_FILE)  # stale
    stale = (index_dir / INDEX_FILE).read_bytes()
    held = WriterLock(index_dir)
    held.acquire()
    try:
        with ghostmatch.open(index_dir, create=False) as lib:
            index = lib.vector_index
            assert index is not None
            np.testing.assert_allclose(
                index.reconstruct(np.array([record(lib, changed).id]))[0],
                stored_vector(lib, changed),
                atol=1e-6,
            )
        # Not saved under another writer's feet.
        assert (index_dir / INDEX_FILE).read_bytes() == stale
    finally:
        held.release()
    with ghostmatch.open(index_dir, create=False) as lib:
        assert_consistent(lib)


def test_a_reader_that_cannot_save_the_repair_still_answers(
    before_and_after: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Saving a rebuilt index is a courtesy: when the file cannot be written (here a folder
    stands in its place), the query is answered from the index rebuilt in memory."""
    _, after, changed = before_and_after
    index_dir = tmp_path / "index"
    shutil.copytree(after, index_dir)
    (index_dir / INDEX_FILE).unlink()
    (index_dir / INDEX_FILE).mkdir()
    with ghostmatch.open(index_dir, create=False) as lib:
        matches = lib.query(changed, k=3)
        assert len(matches) == 3
    assert (index_dir / INDEX_FILE).is_dir()
    assert not [p for p in index_dir.iterdir() if p.name.endswith(".tmp")]
