"""Contracts of ghostmatch.ingest.images: every bad file is rejected with a reason, every good one
decodes to an upright RGB image of the right size."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from corpus import (
    EXPECTED,
    GIF_FRAME_COLOURS,
    HUGE_SIZE,
    PALETTE_OPAQUE,
    UNREADABLE_NAME,
    gradient16,
    make_bad_files,
    png_with_header_size,
    rotated_jpeg,
)
from PIL import Image
from skimage import data

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import (
    REASONS,
    DecodedImage,
    ImageRejected,
    image_from_array,
    load_image,
    sniff_image,
    to_rgb,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_bad_files(folder)


def _save(path: Path, pixels: np.ndarray, fmt: str, **options: object) -> Path:
    Image.fromarray(pixels).save(path, fmt, **options)
    return path


def _smooth(height: int, width: int) -> np.ndarray:
    """Photo-like smooth RGB ramps that generate and compress fast."""
    x = (np.arange(width) * 255 // width).astype(np.uint8)
    y = (np.arange(height) * 255 // height).astype(np.uint8)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, :, 0] = x
    pixels[:, :, 1] = y[:, None]
    pixels[:, :, 2] = x[None, :] // 2 + y[:, None] // 2
    return pixels


def _pixels(decoded: DecodedImage) -> np.ndarray:
    return np.asarray(decoded.image).astype(np.int64)


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_corpus_file_gives_its_reason_or_an_rgb_image(
    corpus: tuple[Path, dict[str, str]], name: str, expected: str
) -> None:
    folder, created = corpus
    if name not in created:
        pytest.skip(f"this platform cannot create {name!a}")
    path = folder / name
    if name == UNREADABLE_NAME and os.access(path, os.R_OK):
        pytest.skip("running as root: chmod 000 does not stop reads")
    if expected == "ok":
        decoded = load_image(path)
        assert decoded.image.mode == "RGB"
        assert min(decoded.image.size) >= 1
        assert decoded.width >= decoded.image.width and decoded.height >= decoded.image.height
        assert decoded.format in {"JPEG", "PNG", "GIF"}
    else:
        with pytest.raises(ImageRejected) as caught:
            load_image(path)
        assert caught.value.reason == expected
        assert caught.value.reason in REASONS
        assert str(caught.value) == f"{expected}: {caught.value.detail}"


def test_jpeg_draft_decodes_small_and_reports_full_size(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.jpg", _smooth(3000, 4000), "JPEG")
    decoded = load_image(path, min_side=224)
    assert decoded.image.size == (500, 375)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.format == "JPEG"


@pytest.mark.parametrize(
    ("width", "height", "min_side"),
    [
        (600, 447, 224),  # 447 / 2 rounds up to 224: half scale still fits
        (600, 446, 224),
        (1000, 896, 224),
        (1800, 1791, 224),
        (100, 80, 224),  # already smaller than min_side
        (1600, 2000, 100),
        (64, 64, 1),
        (5, 3, 1),  # draft() needs a request of at least 1x1, so at most 1/3 here
    ],
)
def test_jpeg_draft_picks_smallest_scale_keeping_min_side(
    tmp_path: Path, width: int, height: int, min_side: int
) -> None:
    path = _save(tmp_path / "x.jpg", _smooth(height, width), "JPEG")
    short = min(width, height)
    fitting = [s for s in (1, 2, 4, 8) if s <= short and -(-short // s) >= min_side]
    scale = max(fitting, default=1)
    decoded = load_image(path, min_side=min_side)
    assert decoded.image.size == (-(-width // scale), -(-height // scale))
    assert (decoded.width, decoded.height) == (width, height)


def test_png16_is_scaled_not_clipped(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    assert Image.open(folder / "png16.png").mode == "I;16"
    row = _pixels(load_image(folder / "png16.png"))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert abs(row[len(row) // 2] - 128) <= 1
    assert np.all(np.diff(row) >= 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_files_keep_their_gradient(tmp_path: Path, fmt: str) -> None:
    path = _save(tmp_path / f"g.{fmt.lower()}", gradient16(8, 512), fmt)
    row = _pixels(load_image(path))[4, :, 1]
    expected = np.round(np.linspace(0, 255, 512))
    assert np.abs(row - expected).max() <= 1


def test_exif_orientation_rotates_and_swaps_size(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    decoded = load_image(folder / "rotated.jpg")
    chelsea = data.chelsea()  # 451 wide, 300 high
    assert (decoded.width, decoded.height) == (300, 451)
    assert decoded.image.size == (300, 451)
    clockwise = np.rot90(chelsea, k=-1).astype(np.int64)
    assert np.abs(_pixels(decoded) - clockwise).mean() < 8
    assert np.abs(_pixels(decoded) - np.rot90(chelsea, k=1)).mean() > 20


def test_exif_rotation_with_draft_reports_upright_full_size(tmp_path: Path) -> None:
    path = tmp_path / "r.jpg"
    path.write_bytes(rotated_jpeg(_smooth(900, 1200)))
    decoded = load_image(path, min_side=224)
    assert decoded.image.size == (225, 300)
    assert (decoded.width, decoded.height) == (900, 1200)


def test_palette_transparency_is_white(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    pixels = _pixels(load_image(folder / "palette_alpha.png"))
    assert tuple(pixels[5, 2]) == (255, 255, 255)
    assert tuple(pixels[5, 30]) == PALETTE_OPAQUE


def test_animated_gif_gives_first_frame(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    pixels = _pixels(load_image(folder / "animated.gif"))
    assert tuple(pixels[10, 10]) == GIF_FRAME_COLOURS[0]


def test_cmyk_jpeg_matches_source_colours(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    decoded = load_image(folder / "cmyk.jpg")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert np.abs(_pixels(decoded) - data.coffee()).mean() < 8


def test_content_decides_format_not_extension(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    assert load_image(folder / "jpeg-named.png").format == "JPEG"


def test_size_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", data.astronaut(), "PNG")  # 512x512 = 0.26 MP
    with pytest.raises(ImageRejected) as caught:
        load_image(path, max_megapixels=0.25)
    assert caught.value.reason == "too-large"
    assert load_image(path, max_megapixels=0.27).image.size == (512, 512)


def test_pillow_bomb_warning_does_not_escape(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_header_size(*HUGE_SIZE))
    with pytest.raises(ImageRejected) as caught:
        load_image(path)
    assert caught.value.reason == "too-large"
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),  # directory at the end: header points past it
    ],
)
def test_cut_files_are_truncated(tmp_path: Path, fmt: str, options: dict[str, object]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, fmt, **options)
    path = tmp_path / "cut.img"
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    with pytest.raises(ImageRejected) as caught:
        load_image(path)
    assert caught.value.reason == "truncated"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_directory_are_rejected_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    for path in (tmp_path / "pipe.jpg", tmp_path):
        with pytest.raises(ImageRejected) as caught:
            load_image(path)
        assert caught.value.reason == "unreadable"


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as caught:
        load_image(tmp_path / "nope.jpg")
    assert caught.value.reason == "unreadable"


@pytest.mark.parametrize("mode", Image.MODES)
def test_to_rgb_handles_every_mode(mode: str) -> None:
    converted = to_rgb(Image.new(mode, (5, 3)))
    assert converted.mode == "RGB"
    assert converted.size == (5, 3)


@pytest.mark.parametrize(
    ("mode", "transparent", "opaque"),
    [
        ("RGBA", (9, 9, 9, 0), (9, 9, 9, 255)),
        ("RGBa", (0, 0, 0, 0), (9, 9, 9, 255)),
        ("LA", (9, 0), (9, 255)),
        ("PA", (3, 0), (3, 255)),
    ],
)
def test_alpha_is_composited_on_white(
    mode: str, transparent: tuple[int, ...], opaque: tuple[int, ...]
) -> None:
    image = Image.new(mode, (2, 1))
    if mode == "PA":
        image.putpalette([9, 9, 9] * 256)
    image.putpixel((0, 0), transparent)
    image.putpixel((1, 0), opaque)
    converted = to_rgb(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((1, 0)) == (9, 9, 9)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("I;16", 65535, 255),
        ("I;16", 32896, 128),
        ("I;16B", 65535, 255),
        ("I", 65535, 255),
        ("I", 257, 1),
        ("F", 1.0, 255),
        ("F", 0.5, 128),
    ],
)
def test_wide_modes_scale_to_8_bit(mode: str, value: float, expected: int) -> None:
    image = Image.new(mode, (2, 1), 0)
    image.putpixel((1, 0), value)
    assert to_rgb(image).getpixel((1, 0)) == (expected,) * 3
    assert to_rgb(image).getpixel((0, 0)) == (0, 0, 0)


def test_float_mode_in_8_bit_range_is_kept() -> None:
    image = Image.new("F", (2, 1), 10.0)
    image.putpixel((1, 0), 200.0)
    assert to_rgb(image).getpixel((1, 0)) == (200, 200, 200)


def test_rgb_transparency_key_is_white() -> None:
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (7, 7, 7))
    image.info["transparency"] = (1, 2, 3)
    converted = to_rgb(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((1, 0)) == (7, 7, 7)


@pytest.mark.parametrize(
    ("array", "pixel"),
    [
        (np.full((4, 6), 7, np.uint8), (7, 7, 7)),
        (np.full((4, 6, 1), 7, np.uint8), (7, 7, 7)),
        (np.full((4, 6, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((4, 6, 4), (1, 2, 3, 0), np.uint8), (255, 255, 255)),
        (np.full((4, 6, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
        (np.full((4, 6, 3), (0.0, 0.5, 1.0), np.float32), (0, 128, 255)),
        (np.full((4, 6), 2.0), (255, 255, 255)),
    ],
)
def test_image_from_array(array: np.ndarray, pixel: tuple[int, int, int]) -> None:
    image = image_from_array(array)
    assert image.mode == "RGB"
    assert image.size == (6, 4)
    assert image.getpixel((2, 1)) == pixel


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 8, 8), np.uint8), np.zeros((4, 6), np.int16), np.zeros((0, 5), np.uint8)],
)
def test_image_from_array_rejects_bad_input(array: np.ndarray) -> None:
    with pytest.raises(GhostmatchError):
        image_from_array(array)


def test_rejection_pickles_and_checks_its_reason() -> None:
    rejected = pickle.loads(pickle.dumps(ImageRejected("corrupt", "bad Huffman table")))
    assert (rejected.reason, rejected.detail) == ("corrupt", "bad Huffman table")
    assert str(rejected) == "corrupt: bad Huffman table"
    with pytest.raises(ValueError):
        ImageRejected("broken", "not a reason")


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (struct.pack(">I", 4 + len(body)) + body + b"\x00" * 16)[:32]


def _encoded_head(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, fmt)
    return buffer.getvalue()[:32]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        *((_encoded_head(fmt), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")),
        (b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 24, "TIFF"),
        (b"II+\x00\x08\x00\x00\x00" + b"\x00" * 24, "TIFF"),
        (_ftyp(b"heic", b"mif1", b"heic"), "HEIF"),
        (_ftyp(b"mif1", b"heic"), "HEIF"),
        (_ftyp(b"avif", b"mif1", b"miaf"), "AVIF"),
        (_ftyp(b"mif1", b"miaf", b"avif"), "AVIF"),
        (_ftyp(b"isom", b"iso2", b"mp41"), None),
        (b"BMW and other cars, a list\n", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"plain text", None),
        (b"", None),
    ],
)
def test_sniff_image(head: bytes, expected: str | None) -> None:
    assert sniff_image(head) == expected


def test_avif_photo_is_decoded_and_indexed(tmp_path: Path) -> None:
    import ghostmatch

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = data.chelsea()  # 451 x 300
    # A real AVIF (AV1 in HEIF boxes), written by Pillow's own encoder.
    Image.fromarray(photo).save(folder / "cat.avif", quality=90)
    assert (folder / "cat.avif").read_bytes()[4:12] == b"ftypavif"
    decoded = load_image(folder / "cat.avif", min_side=300)
    assert (decoded.format, decoded.width, decoded.height) == ("AVIF", 451, 300)
    assert decoded.image.mode == "RGB" and decoded.image.size == (451, 300)
    error = np.abs(np.asarray(decoded.image, dtype=float) - photo.astype(float)).mean()
    assert error < 6, error  # lossy, but the same picture
    with pytest.warns(UserWarning), ghostmatch.open(tmp_path / "index", weights="random") as lib:
        report = lib.index([folder])
        records = lib.catalog.records_by_path([folder / "cat.avif"])
    assert report.added == 1 and not report.failed
    assert records[folder / "cat.avif"].format == "AVIF"
