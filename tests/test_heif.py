"""HEIC photos index when the [heif] extra (pillow-heif) is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from skimage import data

import ghostmatch
from ghostmatch.ingest.images import load_image


def test_heic_photo_is_decoded_and_indexed(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="the [heif] extra is not installed")
    pillow_heif.register_heif_opener()
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "cat.heic", format="HEIF", quality=80)
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    decoded = load_image(folder / "cat.heic")
    assert (decoded.format, decoded.width, decoded.height) == ("HEIF", 451, 300)
    with pytest.warns(UserWarning), ghostmatch.open(tmp_path / "index", weights="random") as lib:
        report = lib.index([folder])
        records = lib.catalog.records_by_path([folder / "cat.heic"])
    assert report.added == 2 and not report.failed
    assert records[folder / "cat.heic"].format == "HEIF"
