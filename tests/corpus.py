"""Awkward and broken image files, and what ``load_image`` should make of each; real pixels
come from ``skimage.data`` so decoders see photo-like content."""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

NON_UTF8_NAME = os.fsdecode(b"caf\xe9.jpg")
UNREADABLE_NAME = "unreadable.jpg"
# Header claims a bomb PNG and a huge PNG make: past Pillow's hard limit (twice
# Image.MAX_IMAGE_PIXELS, about 179 MP) and between 100 MP and that limit.
BOMB_SIZE = (100_000, 100_000)
HUGE_SIZE = (12_000, 10_000)

GIF_FRAME_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
PALETTE_OPAQUE = (200, 30, 40)

EXPECTED: dict[str, str] = {
    "zero-byte.jpg": "empty",
    "truncated.jpg": "truncated",
    "text.jpg": "not-an-image",
    "tiny.png": "ok",
    "png16.png": "ok",
    "cmyk.jpg": "ok",
    "palette_alpha.png": "ok",
    "animated.gif": "ok",
    "rotated.jpg": "ok",
    "bomb.png": "decompression-bomb",
    "huge.png": "too-large",
    "corrupt.png": "corrupt",
    "bad-exif.jpg": "ok",
    "jpeg-named.png": "ok",
    "fake.heic": "corrupt" if importlib.util.find_spec("pillow_heif") else "unsupported",
    UNREADABLE_NAME: "unreadable",
    "broken-link.jpg": "unreadable",
    NON_UTF8_NAME: "ok",
}


def make_bad_files(folder: Path) -> dict[str, str]:
    """Write the corpus into ``folder``; return {file name: expected reason, or "ok"}.

    Names this platform cannot create (symlinks, non-UTF-8 bytes) are left out of the result.
    """
    astronaut = data.astronaut()
    files: dict[str, bytes] = {
        "zero-byte.jpg": b"",
        "truncated.jpg": _half(_encode(astronaut, "JPEG", quality=90)),
        "text.jpg": b"This is a note, not a photo.\n" * 20,
        "tiny.png": _encode(np.array([[[10, 200, 30]]], dtype=np.uint8), "PNG"),
        "png16.png": _encode(gradient16(64, 256), "PNG"),
        "cmyk.jpg": _cmyk_jpeg(),
        "palette_alpha.png": _palette_alpha_png(),
        "animated.gif": _animated_gif(),
        "rotated.jpg": rotated_jpeg(data.chelsea()),
        "bomb.png": png_with_header_size(*BOMB_SIZE),
        "huge.png": png_with_header_size(*HUGE_SIZE),
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "bad-exif.jpg": _with_broken_exif(_encode(data.coffee(), "JPEG")),
        "jpeg-named.png": _encode(data.chelsea(), "JPEG"),
        # An ftyp box with HEIC brands, then junk: HEIF by its header, undecodable.
        "fake.heic": struct.pack(">I", 24) + b"ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        UNREADABLE_NAME: _encode(astronaut, "JPEG"),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / UNREADABLE_NAME).chmod(0)
    expected = {name: EXPECTED[name] for name in files}

    try:
        os.symlink("does-not-exist.jpg", folder / "broken-link.jpg")
        expected["broken-link.jpg"] = EXPECTED["broken-link.jpg"]
    except OSError:
        pass
    try:
        (folder / NON_UTF8_NAME).write_bytes(_encode(data.coffee(), "JPEG"))
        expected[NON_UTF8_NAME] = EXPECTED[NON_UTF8_NAME]
    except (OSError, UnicodeEncodeError):
        pass
    return expected


def gradient16(height: int, width: int) -> np.ndarray:
    """A left-to-right 16-bit ramp from 0 to 65535."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    """``pixels`` stored as they are, with an EXIF orientation tag (6: turn 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(pixels, "JPEG", exif=exif)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND")


def _chunk(kind: bytes, payload: bytes = b"") -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _encode(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def _half(content: bytes) -> bytes:
    return content[: len(content) // 2]


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _palette_alpha_png() -> bytes:
    """32x32 palette image: left half palette entry 1 (fully transparent), right half opaque."""
    image = Image.new("P", (32, 32), 0)
    image.putpalette([*PALETTE_OPAQUE, 0, 0, 255])
    image.paste(1, (0, 0, 16, 32))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=1)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in GIF_FRAME_COLOURS]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _with_broken_exif(jpeg: bytes) -> bytes:
    """Insert an APP1 Exif segment whose TIFF directory offset points far past its end."""
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\xde\xad" * 8
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]
