"""What the same-capture decision spends on a pair: the shortcuts give the answers the full
measurement gives, and the work they skip is really skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from skimage import data
from threadpoolctl import threadpool_info

import ghostmatch
from ghostmatch.dupes import samecapture
from ghostmatch.dupes.samecapture import LEVELS, agreement, prepare_capture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def sorted_share(e: np.ndarray, inside: np.ndarray) -> float:
    """The patch share by each patch's own median, the way it reads in the docstring."""
    patch = samecapture._patch_of(*e.shape)
    mask = inside.ravel()
    n = samecapture.PATCHES**2
    sizes, covered = np.bincount(patch, minlength=n), np.bincount(patch[mask], minlength=n)
    counted = covered >= 0.5 * sizes
    if not counted.any():
        return 0.0
    medians = np.array(
        [np.median(e.ravel()[mask & (patch == k)]) if covered[k] else np.inf for k in range(n)]
    )
    return float((medians[counted] <= samecapture.TOLERANCE).sum() / counted.sum())


def test_patch_medians_by_counting_equal_sorted_medians() -> None:
    rng = np.random.default_rng(3)
    for case in range(300):
        h, w = (int(v) for v in rng.integers(8, 130, 2))
        # Residuals rounded to tenths put many values exactly on the tolerance and make
        # even-sized patches whose two middle values straddle it.
        e = np.round(np.abs(rng.standard_normal((h, w))) * rng.choice([0.1, 0.2, 0.4]), 1)
        inside = rng.random((h, w)) >= rng.choice([0.0, 0.3, 0.6])
        if case % 5 == 0:
            inside[:, : w // 2] = False
        assert samecapture._patch_share(e, inside) == sorted_share(e, inside)


def test_alignment_that_slides_off_is_settled_at_a_coarse_level() -> None:
    # Two independent smooth noise images: the alignment slides into a strong shear or
    # onto a sliver of overlap, which no edit makes; that is settled before the finest,
    # dearest level.
    noise = [prepare_capture(synthetic.make_image("noise", n, seed=5)) for n in range(4)]
    for n in range(3):
        found = agreement(noise[n], noise[n + 1], np.eye(2, 3))
        assert not found.same_capture
        assert found.level < len(LEVELS) - 1
    # A copy goes all the way to the finest level, and is the same capture there.
    kept = prepare_capture(scene())
    copy = agreement(kept, prepare_capture(scene().resize((200, 150))), np.eye(2, 3))
    assert copy.level == len(LEVELS) - 1
    assert copy.same_capture and copy.is_whole()
    # A mirror image is no copy unmoved (the geometric check finds its flip).
    mirrored = agreement(kept, prepare_capture(ImageOps.mirror(scene())), np.eye(2, 3))
    assert not mirrored.same_capture


def test_a_recoloured_copy_still_agrees_after_the_colour_fit() -> None:
    # Hue and saturation changes agree in colour, not in grey: however little agrees in
    # grey, the colour fit decides.
    pixels = np.asarray(scene(), np.float64)
    recoloured = np.clip(pixels[..., [1, 2, 0]] * 0.6 + pixels * 0.4, 0, 255).astype(np.uint8)
    kept = prepare_capture(scene())
    found = agreement(kept, prepare_capture(Image.fromarray(recoloured)), np.eye(2, 3))
    assert found.same_capture


def test_pairs_are_decided_on_one_thread_and_the_count_is_restored(tmp_path: Path) -> None:
    # Idle pool threads spin between the many small steps of deciding pairs; one thread
    # each for torch and BLAS, and the caller's setting back afterwards.
    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    scene().save(folder / "scene_q50.jpg", quality=50)
    for n in range(4):
        synthetic.make_image("noise", n, seed=5).save(folder / f"noise{n}.jpg", quality=90)
    seen: list[tuple[int, list[int]]] = []

    def progress(stage: str, done: int, total: int | None) -> None:
        blas = [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
        seen.append((torch.get_num_threads(), blas))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
            lib.index([folder])
            groups = lib.find_duplicates(progress=progress)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and all(threads == 1 and set(blas) <= {1} for threads, blas in seen)
    assert [(g.keep.path.name, [(m.path.name, m.tier) for m in g.members]) for g in groups] == [
        ("scene.jpg", [("scene_q50.jpg", "near")])
    ]
