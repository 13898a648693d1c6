"""An index keeps working when its model card only gains the learnt GeM p of its own file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.library import CARD_META


@pytest.fixture()
def bundled_index(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((96, 96)).save(folder / f"p{i}.png")
    Image.open(folder / "p0.png").save(tmp_path / "new.jpg", quality=90)  # not indexed
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([folder])
    return index, folder


def _rewrite_card(index: Path, **changes: object) -> None:
    with ghostmatch.open(index, create=False) as lib:
        card = dict(lib.catalog.get_meta(CARD_META))
        card.update(changes)
        lib.catalog.set_meta(CARD_META, card)


def test_a_card_written_with_the_starting_p_still_opens(bundled_index: tuple[Path, Path]) -> None:
    index, folder = bundled_index
    with ghostmatch.open(index, create=False) as lib:
        assert lib.card is not None and lib.card.gem_p != 3.0  # the file's learnt p
    _rewrite_card(index, gem_p=3.0)  # what the card said before p was read from the file
    with ghostmatch.open(index, create=False) as lib:
        [match] = lib.query(folder.parent / "new.jpg", k=1)  # embedded by the model
        assert match.path.name == "p0.png"


def test_any_other_card_change_is_still_refused(bundled_index: tuple[Path, Path]) -> None:
    index, folder = bundled_index
    _rewrite_card(index, gem_p=3.0, input_size=224)
    with ghostmatch.open(index, create=False) as lib, pytest.raises(GhostmatchError):
        lib.query(folder.parent / "new.jpg", k=1)
