"""The parts behind ``Library``, each on its own: the FAISS file kept in step with the
catalog, search over a tiny index, and the refusal of another model's weights."""

from __future__ import annotations

import ast
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import ghostmatch
from ghostmatch.dupes.finder import DuplicateFinder, check_threshold
from ghostmatch.dupes.groups import group_pairs
from ghostmatch.errors import GhostmatchError
from ghostmatch.model.binding import CARD_META, ModelBinding
from ghostmatch.model.card import ModelCard
from ghostmatch.search import Searcher, check_k
from ghostmatch.store.catalog import Catalog, NewImage
from ghostmatch.store.vectors import VectorStore, read_stamp

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_for(files: list[Path], vectors: np.ndarray) -> list[NewImage]:
    rows = []
    for file, vector in zip(files, vectors, strict=True):
        st = file.stat()
        rows.append(NewImage(file, st.st_size, st.st_mtime_ns, file.name, 64, 48, "JPEG", vector))
    return rows


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, Catalog, list[Path], np.ndarray]]:
    """An index folder whose catalog holds six small files' vectors (no FAISS file yet)."""
    index = tmp_path / "index"
    index.mkdir()
    files = []
    for i in range(6):
        file = tmp_path / "photos" / f"{i}.jpg"
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(bytes([i]) * (10 + i))
        files.append(file)
    vectors = unit_vectors(len(files))
    with Catalog.for_directory(index) as catalog:
        with catalog.transaction() as tx:
            tx.insert_images(rows_for(files, vectors))
        yield index, catalog, files, vectors


def test_vector_store_builds_saves_and_reloads_the_catalog_vectors(
    folder: tuple[Path, Catalog, list[Path], np.ndarray],
) -> None:
    path, catalog, _, vectors = folder
    store = VectorStore(path, catalog)
    index = store.index
    assert index is not None
    np.testing.assert_array_equal(index.ids(), catalog.ids())
    stamp = read_stamp(store.file)
    assert stamp is not None and stamp[:3] == (store.generation(), index.checksum, index.factory)
    assert store.saved_factory() == index.factory == "Flat"
    # A second store trusts the stamped file: same bytes, nothing rewritten.
    saved = store.file.read_bytes()
    again = VectorStore(path, catalog).index
    assert again is not None and again.checksum == index.checksum
    assert store.file.read_bytes() == saved
    scores, ids = again.search(vectors[:1], 1)
    assert ids[0, 0] == catalog.ids()[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(
    __import__("faiss").get_num_gpus() > 0, reason="faiss has a GPU here: it would use it"
)
def test_vector_store_for_a_cuda_model_searches_on_the_cpu_with_faiss_cpu(
    folder: tuple[Path, Catalog, list[Path], np.ndarray],
) -> None:
    # --device cuda names where the model runs; a faiss-cpu build (the default install)
    # beside a CUDA torch must still open and search the index.
    path, catalog, _, vectors = folder
    index = VectorStore(path, catalog, device="cuda").index
    assert index is not None and not index.on_gpu
    _, ids = index.search(vectors[:1], 1)
    assert ids[0, 0] == catalog.ids()[0]


def test_vector_store_catches_up_with_changes_once_applied(
    folder: tuple[Path, Catalog, list[Path], np.ndarray],
) -> None:
    path, catalog, _, _ = folder
    store = VectorStore(path, catalog)
    before = store.generation()
    doomed = [int(i) for i in catalog.ids()[:2]]
    with store.writing():
        store.delete(doomed)
        extra = path.parent / "photos" / "new.jpg"
        extra.write_bytes(b"new")
        with store.change() as change:
            change.added.extend(change.tx.insert_images(rows_for([extra], unit_vectors(1, 7))))
        store.apply()
    assert store.generation() == before + 2
    index = store.index
    assert index is not None
    np.testing.assert_array_equal(index.ids(), catalog.ids())
    assert not set(doomed) & set(index.ids().tolist())
    assert read_stamp(store.file)[:3] == (before + 2, index.checksum, index.factory)


def test_vector_store_repairs_a_stale_or_damaged_file(
    folder: tuple[Path, Catalog, list[Path], np.ndarray], tmp_path: Path
) -> None:
    path, catalog, _, _ = folder
    store = VectorStore(path, catalog)
    assert store.index is not None
    stamp_file = store.file.with_name(store.file.name + ".generation")
    shutil.copy(store.file, tmp_path / "old.faiss")
    shutil.copy(stamp_file, tmp_path / "old.generation")
    with store.writing():
        store.delete([int(catalog.ids()[0])])
        store.apply()
    # An older copy put back with its own (then valid) stamp is not trusted.
    shutil.copy(tmp_path / "old.faiss", store.file)
    shutil.copy(tmp_path / "old.generation", stamp_file)
    assert_opens_current(path, catalog)
    # Bytes changed in place under a current stamp: rebuilt as well.
    data = bytearray(store.file.read_bytes())
    data[-1] ^= 0xFF
    store.file.write_bytes(bytes(data))
    assert_opens_current(path, catalog)


def assert_opens_current(path: Path, catalog: Catalog) -> None:
    """A new store opens the catalog's vectors, saved under a stamp that says so."""
    store = VectorStore(path, catalog)
    index = store.index
    assert index is not None
    np.testing.assert_array_equal(index.ids(), catalog.ids())
    stamp = read_stamp(store.file)
    assert stamp is not None
    assert stamp[:3] == (store.generation(), index.checksum, index.factory)


def test_an_unchanged_index_file_is_trusted_and_a_changed_one_still_refused(
    folder: tuple[Path, Catalog, list[Path], np.ndarray], tmp_path: Path
) -> None:
    """Opens hash the file until its stamp records the file's state (inode, size, mtime,
    ctime: the stamp written in a later clock tick than the file), then trust that state
    without hashing; a file written in place (its mtime put back) or replaced by one of the
    same size and times is hashed again, and refused."""
    path, catalog, _, vectors = folder
    store = VectorStore(path, catalog)
    index = store.index
    assert index is not None
    while (stamp := read_stamp(store.file)) is not None and stamp.file is None:
        VectorStore(path, catalog).index  # noqa: B018  # each open records it when it can
    assert stamp is not None and stamp.file == index.identity
    trusted = VectorStore(path, catalog).index
    assert trusted is not None and trusted.identity == stamp.file
    assert trusted.checksum == stamp.checksum == index.checksum

    def refused() -> None:
        rebuilt = VectorStore(path, catalog).index
        assert rebuilt is not None
        np.testing.assert_array_equal(rebuilt.reconstruct(catalog.ids()), vectors)
        assert store.file.read_bytes() == saved  # rebuilt and saved again

    saved = store.file.read_bytes()
    damaged = bytearray(saved)
    damaged[len(damaged) // 2] ^= 0x40  # a stored float: the ids still match the catalog
    st = store.file.stat()
    store.file.write_bytes(bytes(damaged))
    os.utime(store.file, ns=(st.st_atime_ns, st.st_mtime_ns))
    refused()
    st = store.file.stat()
    other = path / "other.faiss"
    other.write_bytes(bytes(damaged))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, store.file)
    refused()


def test_searcher_ranks_a_tiny_index_by_cosine_without_the_query_itself(
    folder: tuple[Path, Catalog, list[Path], np.ndarray],
) -> None:
    path, catalog, files, vectors = folder
    catalog.set_meta(CARD_META, ModelCard("test", "0" * 64, dim=DIM).to_dict())
    # An indexed, unchanged file is searched with its stored vector: no model is loaded.
    searcher = Searcher(catalog, VectorStore(path, catalog), ModelBinding(path, catalog, None))
    matches = searcher.query(files[0], k=3)
    ids = catalog.ids()
    expected = np.argsort(-(vectors[1:] @ vectors[0]), kind="stable")[:3] + 1
    assert [m.id for m in matches] == [int(ids[i]) for i in expected]
    np.testing.assert_allclose(
        [m.score for m in matches], (vectors[expected] @ vectors[0]), atol=1e-5
    )
    assert [m.rank for m in matches] == [1, 2, 3]
    assert files[0] not in {m.path for m in matches}
    assert len(searcher.query(files[0], k=100)) == len(files) - 1
    cut = matches[1].score
    assert [m.id for m in searcher.query(files[0], k=3, min_score=cut)] == [
        m.id for m in matches[:2]
    ]


@pytest.mark.parametrize("k", [0, -1, True, 1.5, "3"])
def test_check_k_refuses_what_is_not_a_count(k: object) -> None:
    with pytest.raises(GhostmatchError):
        check_k(k)  # type: ignore[arg-type]


def test_model_binding_refuses_other_named_weights(tmp_path: Path) -> None:
    with Catalog.for_directory(tmp_path) as catalog:
        assert ModelBinding(tmp_path, catalog, "imagenet").card is None
        ModelBinding(tmp_path, catalog, "imagenet").check_request()  # nothing recorded yet
        catalog.set_meta(CARD_META, ModelCard("bundled", "0" * 64).to_dict())
        ModelBinding(tmp_path, catalog, "bundled").check_request()
        ModelBinding(tmp_path, catalog, None).check_request()
        with pytest.raises(GhostmatchError, match="built with weights 'bundled'"):
            ModelBinding(tmp_path, catalog, "imagenet").check_request()


def test_library_errors_name_parameters_not_command_line_flags(
    folder: tuple[Path, Catalog, list[Path], np.ndarray],
) -> None:
    path, catalog, files, _ = folder
    catalog.set_meta(CARD_META, ModelCard("test", "0" * 64, dim=DIM).to_dict())
    store, model = VectorStore(path, catalog), ModelBinding(path, catalog, None)
    searcher = Searcher(catalog, store, model)
    finder = DuplicateFinder(catalog, store, model, searcher)
    calls: list[Callable[[], object]] = [
        lambda: searcher.query(files[0], k=0),
        lambda: searcher.query(files[0], min_score=2.0),
        lambda: check_threshold(1.5),
        lambda: finder.find_duplicates(-7.0),
        lambda: finder.mark_not_duplicate(files[0], files[0]),
        lambda: group_pairs({}, [], "biggest"),
    ]
    for call in calls:
        with pytest.raises(GhostmatchError) as raised:
            call()
        assert "--" not in str(raised.value) and "-k" not in str(raised.value)


# A command-line flag: "--weights", "-k"; not a hyphenated word or a negative number.
FLAG = re.compile(r"(?<![\w-])--?[A-Za-z]")


def _message_texts(source: Path) -> list[tuple[int, str]]:
    """The string pieces of every exception built in ``source``, with their line numbers.

    Pieces are the literals (f-string parts included) inside the call, and module-level
    string constants the call names, such as a shared piece of advice.
    """
    tree = ast.parse(source.read_text(), filename=str(source))
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    texts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        # Exception types end in Error (GhostmatchError and its kinds, VectorIndexError) or
        # are the decoder's ImageRejected; errors.py builds its messages in __init__.
        if not (name.endswith("Error") or name == "ImageRejected" or source.name == "errors.py"):
            continue
        for part in [*node.args, *(keyword.value for keyword in node.keywords)]:
            inside_fstrings: set[int] = set()
            for inner in ast.walk(part):
                if isinstance(inner, ast.JoinedStr):
                    # Whole, with X for each value, so that f"{dim}-d" reads "X-d".
                    pieces = [
                        value.value if isinstance(value, ast.Constant) else "X"
                        for value in inner.values
                    ]
                    inside_fstrings.update(id(value) for value in inner.values)
                    texts.append((inner.lineno, "".join(map(str, pieces))))
                elif (
                    isinstance(inner, ast.Constant)
                    and isinstance(inner.value, str)
                    and id(inner) not in inside_fstrings
                ):
                    texts.append((inner.lineno, inner.value))
                elif isinstance(inner, ast.Name) and inner.id in constants:
                    texts.append((inner.lineno, constants[inner.id]))
    return texts


def test_no_library_error_message_names_a_command_line_flag() -> None:
    # Read from the source, so that a new message cannot slip in untested; the server is
    # a front end like the CLI and speaks in its own terms.
    package = Path(ghostmatch.__file__).parent
    found, flagged = 0, []
    for source in sorted(package.rglob("*.py")):
        if "serve" in source.relative_to(package).parts:
            continue
        for line, text in _message_texts(source):
            found += 1
            if FLAG.search(text):
                flagged.append(f"{source.relative_to(package)}:{line}: {text!r}")
    assert found > 100  # the walk reaches the messages at all
    assert not flagged, "\n".join(flagged)
