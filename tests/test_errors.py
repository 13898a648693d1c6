"""What the user sees when the machine or the files are at fault: a full disk, a damaged
catalog, weights that are no model, files that failed once and can now be read.

Each is one line on stderr and exit code 2 from the command, and a ``GhostmatchError``
from the library; the full disk is real (a file size limit, as a full disk looks to the
process) and the damage is real bytes overwritten in a real catalog."""

from __future__ import annotations

import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_support import CLI, cli_env
from PIL import Image

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.store.catalog import CATALOG_FILE

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]

PAGE = 4096  # SQLite's page size


def run_cli(
    args: Sequence[object],
    model_cache: Path,
    preexec: Callable[[], None] | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(os.fspath, args)],  # type: ignore[arg-type]
        env=cli_env(model_cache, **env),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def file_size_limit(limit: int) -> Callable[[], None]:
    """A child's setup that makes every write past ``limit`` bytes of a file fail (EFBIG),
    as on a full disk; the signal that would otherwise kill it is ignored, as it is by
    default on a full disk."""

    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a user-fixable error: exit code 2, no traceback; warnings aside."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("warning: ")
    ]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def noise_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct small photos-to-be (seeded noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"noise-{seed}-{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- full disk


def test_a_full_disk_is_one_line_and_reading_commands_still_answer(
    tmp_path: Path, model_cache: Path
) -> None:
    gallery = tmp_path / "gallery"
    noise_images(gallery, 4)
    index = tmp_path / "index"
    first = run_cli(["index", gallery, "--index", index, "--weights", "random", "-q"], model_cache)
    assert first.returncode == 0, first.stderr
    noise_images(gallery, 40, seed=1)
    # Above the 32 KiB SQLite needs for a reader's shared memory, far below what forty
    # vectors (a 4 KiB page each at 960-d) add to the catalog.
    limit = file_size_limit(40_000)

    # One commit at the end, whatever the machine's load: a time checkpoint of a few images
    # would fit under the limit and leave more than the first four in the catalog.
    full = run_cli(
        ["index", gallery, "--index", index, "-q"],
        model_cache,
        limit,
        GHOSTMATCH_CHECKPOINT_SECONDS="100000",
    )
    line = error_line(full)
    assert "catalog" in line and "free" in line and "disk" in line, line

    info = run_cli(["info", "--index", index, "--json"], model_cache, limit)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images"] == 4
    query = run_cli(["query", gallery / "noise-0-00.png", "--index", index], model_cache, limit)
    assert query.returncode == 0, query.stderr
    # With room again, the run completes.
    again = run_cli(["index", gallery, "--index", index, "--json"], model_cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["added"] == 40


def test_an_index_file_that_cannot_be_saved_is_one_line(tmp_path: Path, model_cache: Path) -> None:
    gallery = tmp_path / "gallery"
    noise_images(gallery, 40)
    index = tmp_path / "index"
    first = run_cli(["index", gallery, "--index", index, "--weights", "random", "-q"], model_cache)
    assert first.returncode == 0, first.stderr
    noise_images(gallery, 1, seed=1)
    # The limit comes from what the run writes, measured on a copy of the index that has
    # room: just under the FAISS file of all 41 vectors, so that its save fails, while the
    # catalog's commit of one more image (a few pages in its log, however large a row
    # grows) fits far below the file of forty vectors.
    twin = tmp_path / "twin"
    shutil.copytree(index, twin)
    room = run_cli(["index", gallery, "--index", twin, "-q"], model_cache)
    assert room.returncode == 0, room.stderr
    saved = (twin / "vectors.faiss").stat().st_size
    limit = file_size_limit(saved - 1)
    result = run_cli(["index", gallery, "--index", index, "-q"], model_cache, limit)
    line = error_line(result)
    assert "File too large" in line and "free some disk space" in line, line
    for command in (["info"], ["query", gallery / "noise-1-00.png"]):
        # A reading command answers, or if it had to save the index again, says so in one
        # line too; never a traceback.
        done = run_cli([*command, "--index", index], model_cache, limit)
        if done.returncode != 0:
            error_line(done)
    # Nothing was lost: the catalog kept the new image, and with room again the index file
    # catches up with it, as large as the one saved with room from the start.
    again = run_cli(["info", "--index", index, "--json"], model_cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["images"] == 41
    assert json.loads(again.stdout)["index_bytes"] == saved


# ---------------------------------------------------------------------------- damage


def damage(catalog: Path) -> None:
    """Overwrite every page but the first (the schema) and the last with junk."""
    size = catalog.stat().st_size
    assert size > 3 * PAGE
    with catalog.open("r+b") as f:
        f.seek(PAGE)
        f.write(b"\x5a" * (size - 2 * PAGE))


def test_a_catalog_damaged_in_the_middle_is_one_line_for_every_command(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    built = run_cli(["index", photos, "--index", index, "--weights", "random", "-q"], model_cache)
    assert built.returncode == 0, built.stderr
    damage(index / CATALOG_FILE)
    for command in (
        ["info"],
        ["query", photos / "rocket.jpg"],
        ["dupes"],
        ["remove", photos / "rocket.jpg"],
        ["index", photos],
    ):
        line = error_line(run_cli([*command, "--index", index], model_cache))
        assert "is damaged (database disk image is malformed)" in line, (command, line)
        assert "restore it from a backup" in line
    # The library raises its own error, not SQLAlchemy's.
    with pytest.raises(GhostmatchError, match="is damaged"), ghostmatch.open(index) as lib:
        lib.catalog.vectors()


def test_a_name_that_is_not_utf8_is_printed_with_its_bytes(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    # Each byte that is not UTF-8 shows as \\xNN, so the user can tell which file is meant.
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    try:
        os.mkdir(raw)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    folder = Path(os.fsdecode(raw))
    shown = os.fsdecode(tmp_path) + "/caf\\xe9"
    cases = {
        "no index there": (["info", "--index", folder], f"no index at {shown};"),
        "no such folder": (["eval", "retrieval", folder / "gone"], f"{shown}/gone is not a folder"),
    }
    for name, (args, needle) in cases.items():
        line = error_line(run_cli(args, model_cache))
        assert needle in line, (name, line)
    # An index there: JSON gives back the exact bytes, text shows them (brackets too, which
    # rich would otherwise take for markup).
    index = Path(os.fsdecode(raw + b"/index [red]"))
    built = run_cli(
        ["index", photos, "--index", index, "--weights", "random", "--json"], model_cache
    )
    assert built.returncode == 0, built.stderr
    assert os.fsencode(json.loads(built.stdout)["index"]) == os.fsencode(index)
    info = run_cli(["info", "--index", index], model_cache)
    assert f"index        {shown}/index [red]\n" in info.stdout, info.stdout
    info_json = run_cli(["info", "--index", index, "--json"], model_cache)
    assert os.fsencode(json.loads(info_json.stdout)["index"]) == os.fsencode(index)


# ---------------------------------------------------------------------------- weights


def test_weights_that_are_no_model_leave_nothing_behind(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    pickled = tmp_path / "dates.pth"
    torch.save({"when": datetime.date(2026, 1, 1)}, pickled)  # loads only with pickled code
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    cases = {
        "nosuch": "weights file nosuch does not exist; weights takes imagenet, bundled, random",
        str(pickled): "holds a Python object (datetime.date), and only tensors are loaded",
        str(listed): "is not a model checkpoint: it holds a list",
    }
    for weights, needle in cases.items():
        index = tmp_path / "new-index"
        result = run_cli(["index", photos, "--index", index, "--weights", weights], model_cache)
        line = error_line(result)
        assert needle in line, line
        assert "weights_only" not in line
        assert not index.exists()  # checked before anything was created


# ---------------------------------------------------------------------------- retries


def test_a_file_over_the_pixel_limit_is_retried_under_a_higher_one(
    tmp_path: Path, photos: Path
) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shutil.copy(photos / "chelsea.jpg", gallery)  # 451x300
    small = gallery / "small.png"
    Image.new("RGB", (200, 150), "teal").save(small)
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        report = lib.index([gallery], max_megapixels=0.1)
        assert report.added == 1
        [(path, reason, detail)] = report.failures
        assert (path.name, reason) == ("chelsea.jpg", "too-large")
        assert detail == "451x300 is 0.1353 megapixels, over the max_megapixels limit of 0.1"
        assert lib.index([gallery], max_megapixels=0.1).known_bad == 1
        assert lib.index([gallery], max_megapixels=0.05).known_bad == 1
        retried = lib.index([gallery], max_megapixels=0.2)
        assert (retried.added, retried.known_bad, retried.failures) == (1, 0, [])
        assert lib.catalog.failures() == []


def test_remove_forgets_that_a_file_failed(tmp_path: Path, photos: Path) -> None:
    gallery = tmp_path / "gallery"
    (gallery / "sub").mkdir(parents=True)
    shutil.copy(photos / "chelsea.jpg", gallery / "sub")
    shutil.copy(photos / "coffee.jpg", gallery)
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        assert len(lib.index([gallery], max_megapixels=0.01).failures) == 2
        assert lib.remove([gallery / "sub"]) == 0  # a folder: the failures below it go
        assert [f.path.name for f in lib.catalog.failures()] == ["coffee.jpg"]
        assert lib.remove([gallery / "coffee.jpg"]) == 0
        assert lib.catalog.failures() == []
        again = lib.index([gallery], max_megapixels=0.01)
        assert (again.known_bad, len(again.failures)) == (0, 2)  # tried, not skipped
