"""The turned-copy screen's data kept in the catalog: made while indexing from the same
decode as the vector, the same screen as decoding every image again, and a catalog from
before it still finds turned copies and gets the data on its next ``index`` run without
any image embedded again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import URL
from test_turns import jpeg, light_photo, photo, tilted

import ghostmatch
from ghostmatch.dupes.turns import decode, find_tilt, turn_image, turn_screen
from ghostmatch.model.embedder import Embedder, prepare
from ghostmatch.store.catalog import Catalog, NewImage, TurnScreen

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _screens_by_name(index: Path) -> dict[str, TurnScreen]:
    with ghostmatch.open(index, create=False) as lib:
        paths = {stat[0]: path for path, stat in lib.catalog.all_stat().items()}
        return {paths[i].name: s for i, s in lib.catalog.turn_screens().items()}


@pytest.mark.usefixtures("shared_model_cache")
def test_indexing_keeps_each_images_thumbnail_and_tilt(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    photo("coffee").save(folder / "coffee.jpg", quality=92)
    tilted(photo("rocket"), 20.0, (0, 0, 0)).save(folder / "rocket-tilt20.jpg", quality=90)
    with ghostmatch.open(tmp_path / "index", weights="random") as lib:
        lib.index([folder])
        side = lib.embedder.card.input_size
    stored = _screens_by_name(tmp_path / "index")
    assert stored.keys() == {"coffee.jpg", "rocket-tilt20.jpg"}
    for name, found in stored.items():
        # What the screen would make from its own decode of the file (at the model's input
        # size, as the indexer decodes it).
        image = decode(folder / name, side)
        assert image is not None
        assert found == turn_screen(image)
    assert len(stored["coffee.jpg"].thumbnail) == 256 and stored["coffee.jpg"].tilt is None
    tilt = stored["rocket-tilt20.jpg"]
    assert tilt.tilt == pytest.approx(20.0, abs=1.0) and tilt.fill == (0, 0, 0)
    assert tilt.straightened is not None and len(tilt.straightened) == 256


def test_turn_screens_go_with_their_image(catalog_url: URL) -> None:
    """Stored and read back by id; a new vector (the file changed) drops them, as does
    deleting the image."""
    vector = np.ones(4, np.float32) / 2
    first = TurnScreen(bytes(range(256)), 12.5, (255, 250, 0), bytes(256))
    with Catalog(catalog_url) as catalog:
        with catalog.transaction() as tx:
            a, b, c = tx.insert_images(
                [NewImage(Path(f"/p/{n}.jpg"), 1, 1, str(n), 8, 8, "JPEG", vector) for n in "abc"]
            )
            tx.set_turn_screens([(a, first), (b, TurnScreen(bytes(256))), (c, first)])
        assert catalog.turn_screens([b, a]) == {a: first, b: TurnScreen(bytes(256))}
        assert catalog.ids_without_turn_screens().tolist() == []
        with catalog.transaction() as tx:
            tx.update_image(a, vector=vector)
            tx.delete_images([b])
        assert catalog.turn_screens() == {c: first}
        assert catalog.ids_without_turn_screens().tolist() == [a]


@pytest.mark.usefixtures("shared_model_cache")
def test_views_embedded_on_one_thread_are_the_same_descriptors(random_model) -> None:  # type: ignore[no-untyped-def]
    embedder = Embedder(random_model, runtime="onnx", threads=2)
    images = [turn_image(photo("coffee"), 90), photo("astronaut")]
    arrays = [prepare(image, embedder.card) for image in images]
    np.testing.assert_allclose(
        embedder.embed_arrays(arrays, threads=1), embedder.embed_arrays(arrays), atol=1e-5
    )


@pytest.mark.usefixtures("shared_model_cache")
def test_a_tilted_original_and_its_quarter_turned_copy(tmp_path: Path) -> None:
    """A photo that is itself tilted onto black corners, and a copy of it turned by 90:
    their canvases pair turned, since their straightened pictures meet too; a new copy
    turned by 180 finds both with ``duplicates_of``."""
    folder = tmp_path / "photos"
    folder.mkdir()
    original = tilted(photo("rocket"), 20.0, (0, 0, 0))
    original.save(folder / "rocket-tilt20.jpg", quality=92)
    turn_image(original, 90).save(folder / "rocket-tilt20-cw90.jpg", quality=90)
    for name in ("coffee", "chelsea", "astronaut"):
        photo(name).save(folder / f"{name}.jpg", quality=92)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        groups = lib.find_duplicates()
        found = {m.path.name: m for m in lib.duplicates_of(turn_image(original, 180))}
    assert len(groups) == 1 and len(groups[0].members) == 1
    kept, copy = groups[0].keep, groups[0].members[0]
    assert {kept.path.name, copy.path.name} == {"rocket-tilt20.jpg", "rocket-tilt20-cw90.jpg"}
    # The copy turned by its turn lines up with the kept file.
    assert copy.tier == "edited" and copy.turn == (
        270 if kept.path.name == "rocket-tilt20.jpg" else 90
    )
    assert found.keys() == {"rocket-tilt20.jpg", "rocket-tilt20-cw90.jpg"}
    assert found["rocket-tilt20.jpg"].turn == 180 and found["rocket-tilt20-cw90.jpg"].turn == 90


@pytest.mark.usefixtures("shared_model_cache")
def test_duplicates_of_a_studio_shot_tilted_onto_white(tmp_path: Path) -> None:
    """A studio shot (coffee inside a white picture) tilted by 30 degrees onto white shows
    its tilt only in its subject's edges, not in the picture's sides: ``duplicates_of``
    straightens it, as ``dupes`` does, where its picture's thumbnail meets a stored one,
    and finds its original. Another studio shot tilted alike, and an upright photo, gain
    no pair."""
    folder = tmp_path / "photos"
    folder.mkdir()
    original = light_photo((120, 80), (30, 30))
    original.save(folder / "coffee-studio.jpg", quality=92)
    for name in ("astronaut", "rocket", "chelsea"):
        photo(name).save(folder / f"{name}.jpg", quality=92)
    copy = jpeg(tilted(original, 30.0, (255, 255, 255)))
    # Another studio shot, of a cat indexed nowhere, tilted alike: its straightened picture,
    # turned by 180, is laid out as the indexed studio shot is (their thumbnails meet), but
    # it is not that photo.
    other_shot = Image.new("RGB", (320, 240), (255, 255, 255))
    other_shot.paste(photo("chelsea").resize((120, 80)), (170, 130))
    unrelated = jpeg(tilted(other_shot, 30.0, (255, 255, 255)))
    for image in (copy, unrelated):
        assert find_tilt(image) is None and find_tilt(image, sides_shown=False) is not None
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        found = {m.path.name: m for m in lib.duplicates_of(copy)}
        assert lib.duplicates_of(copy, turned=False) == []
        assert lib.duplicates_of(unrelated) == []
        assert lib.duplicates_of(photo("coffee")) == []
    assert found.keys() == {"coffee-studio.jpg"}
    assert found["coffee-studio.jpg"].tier == "edited" and found["coffee-studio.jpg"].turn == 0
