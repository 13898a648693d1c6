"""Decoding image files into upright RGB Pillow images for the model; every bad file becomes
an ``ImageRejected`` with a reason from ``REASONS``, never a Pillow exception."""

from __future__ import annotations

import functools
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, features

from ghostmatch.errors import GhostmatchError

REASONS: tuple[str, ...] = (
    "unreadable",
    "empty",
    "not-an-image",
    "truncated",
    "too-large",
    "decompression-bomb",
    "unsupported",
    "corrupt",
)

# Enough for every signature below, including a few ftyp compatible brands.
SNIFF_BYTES = 32

_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Sizes of the BMP info headers Pillow decodes (OS/2 core, Windows v1 to v5).
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_WHITE = (255, 255, 255, 255)


class ImageRejected(Exception):
    """A file that cannot be used as an image; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; use one of {REASONS}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for preprocessing, with the size of the file it came from.

    ``image`` is upright (EXIF orientation applied) and may be smaller than the file: JPEGs
    are decoded at a reduced DCT scale. ``width`` and ``height`` are the full-resolution,
    upright dimensions; ``format`` is Pillow's name for the file format ("JPEG", "PNG", ...).
    """

    image: Image.Image
    width: int
    height: int
    format: str


def sniff_image(head: bytes) -> str | None:
    """Pillow's name for the image format that ``head`` (a file's first bytes) starts, or None.

    Knows JPEG, PNG, GIF, WEBP, TIFF (both byte orders, BigTIFF), BMP, and HEIF/AVIF by the
    brands of their ISO-BMFF ``ftyp`` box; 32 bytes are enough for all of them.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    # "BM" alone is too common a start for text, so also require a known info header size.
    if head.startswith(b"BM") and len(head) >= 18:
        (info_size,) = struct.unpack_from("<I", head, 14)
        if info_size in _BMP_HEADER_SIZES:
            return "BMP"
    return _sniff_ftyp(head)


def _sniff_ftyp(head: bytes) -> str | None:
    """HEIF or AVIF from the major and compatible brands of an ``ftyp`` box, else None."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    (box_size,) = struct.unpack_from(">I", head, 0)
    end = min(box_size, len(head))
    # Major brand at 8, minor version at 12, compatible brands from 16 to the box end.
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    # AVIF files often carry the generic HEIF brand "mif1" too, so AVIF wins.
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


def load_image(
    path: str | os.PathLike[str], min_side: int = 224, max_megapixels: float = 100.0
) -> DecodedImage:
    """Decode the image at ``path`` by its content, whatever its extension.

    JPEGs are decoded at the smallest DCT scale (1/8, 1/4, 1/2) whose shorter side is still
    at least ``min_side``, which is several times faster than a full decode. Images over
    ``max_megapixels`` are rejected from their header, before any pixel is decoded. Pillow's
    own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) stays in force as a hard stop.

    Raises ``ImageRejected`` for every kind of bad file.
    """
    if min_side < 1:
        raise GhostmatchError(f"min_side must be at least 1 pixel, got {min_side}")
    if max_megapixels <= 0:
        raise GhostmatchError(f"max_megapixels must be positive, got {max_megapixels}")
    fspath = os.fspath(path)
    try:
        # stat first: opening a FIFO or a device for reading could block forever.
        st = os.stat(fspath)
    except OSError as e:
        raise ImageRejected("unreadable", describe_os_error(fspath, e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageRejected("unreadable", "not a regular file")
    if st.st_size == 0:
        raise ImageRejected("empty", "the file has zero bytes")
    try:
        with open(fspath, "rb") as fp:
            return _load_file(fp, st.st_size, min_side, max_megapixels)
    except OSError as e:
        # Only opening and sniffing get here: _load_file maps decoding errors itself.
        raise ImageRejected("unreadable", describe_os_error(fspath, e)) from e


def _load_file(fp: BinaryIO, size: int, min_side: int, max_megapixels: float) -> DecodedImage:
    head = fp.read(SNIFF_BYTES)
    fmt = sniff_image(head)
    if fmt is None:
        raise ImageRejected(
            "not-an-image", "content is not JPEG, PNG, GIF, WebP, TIFF, BMP, HEIF or AVIF"
        )
    _require_decoder(fmt)
    with warnings.catch_warnings():
        # max_megapixels replaces the threshold of Pillow's DecompressionBombWarning; its
        # error threshold (twice that) still raises. Its other warnings (corrupt EXIF and
        # the like) are about files we decode anyway, and would flood a batch run.
        # catch_warnings is not thread-safe before Python 3.14, but the worst a race does
        # is leave this filter behind.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        try:
            return _decode(fp, fmt, min_side, max_megapixels)
        except ImageRejected:
            raise
        # Pillow's plugins raise a zoo of types for bad data (OSError, SyntaxError,
        # ValueError, struct.error, EOFError, IndexError, ...): all of them mean "this
        # file", never "this program".
        except Exception as e:
            raise _rejection(e, fmt, head, size) from e


def _decode(fp: BinaryIO, fmt: str, min_side: int, max_megapixels: float) -> DecodedImage:
    image = Image.open(fp, formats=[fmt])
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageRejected("corrupt", f"the header says {width}x{height} pixels")
    if width * height > max_megapixels * 1e6:
        raise ImageRejected(
            "too-large",
            # Every digit of the pixel count: rounded, a small image read "0.0 megapixels".
            f"{width}x{height} is {_megapixels(width * height)} megapixels, over the "
            f"max_megapixels limit of {max_megapixels:g}",
        )
    if image.format in ("JPEG", "MPO"):
        request = _draft_request(image.size, min_side)
        if request is not None:
            image.draft("RGB", request)
    image.load()
    format_name = image.format or fmt
    upright, swapped = _apply_orientation(image)
    if swapped:
        width, height = height, width
    return DecodedImage(to_rgb(upright), width, height, format_name)


def _draft_request(size: tuple[int, int], min_side: int) -> tuple[int, int] | None:
    """The size to pass to ``JpegImageFile.draft`` so it DCT-scales by the right factor.

    draft() picks the largest of 8, 4, 2, 1 that is at most ``min(w // rw, h // rh)``.
    Requesting ``(w // s, h // s)`` makes that minimum fall in ``[s, 2s)``, so it picks
    exactly ``s``: the largest factor whose output (rounded up, like libjpeg) keeps the
    shorter side at least ``min_side``.
    """
    scale = draft_scale(size, min_side)
    return None if scale == 1 else (size[0] // scale, size[1] // scale)


def draft_scale(size: tuple[int, int], min_side: int) -> int:
    """The DCT scale (8, 4, 2, or 1 for a full decode) a JPEG of ``size`` pixels is decoded
    at for ``min_side``: the largest whose output (rounded up, like libjpeg) keeps the
    shorter side at least ``min_side``. Either orientation of ``size`` gives the same."""
    short = min(size)
    for scale in (8, 4, 2):
        if scale <= short and -(-short // scale) >= min_side:
            return scale
    return 1


def same_decode(decoded: DecodedImage, min_side: int, other_min_side: int) -> bool:
    """Whether ``load_image`` of the file that gave ``decoded`` at ``min_side`` gives the
    same pixels at ``other_min_side``: only a JPEG's DCT scale depends on it."""
    size = (decoded.width, decoded.height)
    return decodes_alike(decoded.format, size, min_side, other_min_side)


def decodes_alike(fmt: str, size: tuple[int, int], min_side: int, other_min_side: int) -> bool:
    """:func:`same_decode` for a file of Pillow format ``fmt`` and full-resolution
    ``size`` (as the catalog records them), without decoding it."""
    if fmt not in ("JPEG", "MPO"):
        return True
    return draft_scale(size, min_side) == draft_scale(size, other_min_side)


def _apply_orientation(image: Image.Image) -> tuple[Image.Image, bool]:
    """Rotate/flip by the EXIF orientation; also whether width and height swapped.

    Orientation is metadata, so broken EXIF leaves the pixels as stored instead of
    rejecting an image that decodes fine.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation not in range(2, 9):
            return image, False
        return ImageOps.exif_transpose(image), orientation >= 5
    except Exception:
        return image, False


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white.

    16/32-bit integer images are scaled from 0..65535 (not clipped to white); float images
    are taken as 0..1 if they fit, else 0..255 if they fit, else stretched to their range.
    An RGB image without transparency is returned as is.
    """
    if image.mode in _INT_MODES:
        image = _int_to_l(image)
    elif image.mode == "F":
        image = _float_to_l(image)
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _int_to_l(image: Image.Image) -> Image.Image:
    # 16-bit samples come as "I;16*" or, from older decoders, "I"; both use 0..65535.
    values = np.asarray(image).astype(np.int64)
    scaled = (np.clip(values, 0, 65535) + 128) // 257
    return Image.fromarray(scaled.astype(np.uint8))


def _float_to_l(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low < 0.0 or high > 255.0:
        values = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def image_from_array(array: np.ndarray) -> Image.Image:
    """An RGB image from an HxW, HxWx1, HxWx3 or HxWx4 array of uint8 or floats in [0, 1].

    Alpha is composited onto white, like transparent files.
    """
    values = np.asarray(array)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] in (3, 4))):
        raise GhostmatchError(
            f"expected an HxW, HxWx3 or HxWx4 array, got shape {values.shape}; "
            "for a CxHxW tensor pass array.transpose(1, 2, 0)"
        )
    if values.size == 0:
        raise GhostmatchError(f"the array has no pixels (shape {values.shape})")
    if np.issubdtype(values.dtype, np.floating):
        values = np.nan_to_num(values.astype(np.float64), nan=0.0)
        values = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif values.dtype != np.uint8:
        raise GhostmatchError(
            f"expected uint8 values or floats in [0, 1], got dtype {values.dtype}; "
            "convert with array.astype(numpy.uint8) or divide by the maximum value"
        )
    return to_rgb(Image.fromarray(np.ascontiguousarray(values)))


@functools.cache
def _heif_opener_registered() -> bool:
    """Register pillow-heif's opener with Pillow, once; False if it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _require_decoder(fmt: str) -> None:
    if fmt == "HEIF" and not _heif_opener_registered():
        raise ImageRejected(
            "unsupported", "HEIF/HEIC needs pillow-heif: pip install ghostmatch[heif]"
        )
    if fmt == "AVIF" and not features.check("avif"):
        raise ImageRejected(
            "unsupported", "this Pillow was built without AVIF; install Pillow>=11.3 wheels"
        )


def _rejection(error: Exception, fmt: str, head: bytes, size: int) -> ImageRejected:
    """Map an exception raised while decoding to the rejection it stands for."""
    message = str(error)
    if isinstance(error, Image.DecompressionBombError):
        return ImageRejected("decompression-bomb", message)
    if isinstance(error, ValueError) and "Decompressed data too large" in message:
        return ImageRejected("decompression-bomb", message)
    if isinstance(error, MemoryError):
        return ImageRejected("too-large", "not enough memory to decode it")
    # Decoders raise OSError without an errno; one with an errno came from the disk.
    if isinstance(error, OSError) and error.errno is not None:
        return ImageRejected("unreadable", error.strerror or message)
    if "truncated" in message or isinstance(error, EOFError):
        return ImageRejected("truncated", _short(message) or f"the {fmt} data ends early")
    if _header_points_past_end(fmt, head, size):
        return ImageRejected("truncated", f"the {fmt} header describes more than {size} bytes")
    if isinstance(error, Image.UnidentifiedImageError):
        return ImageRejected("corrupt", f"the {fmt} header could not be parsed")
    return ImageRejected("corrupt", _short(message) or type(error).__name__)


def _header_points_past_end(fmt: str, head: bytes, size: int) -> bool:
    """Whether the header alone proves the file was cut short.

    Pillow cannot tell a cut WebP or TIFF from garbage, but the RIFF length and the offset of
    the first TIFF directory say how long the file has to be.
    """
    if fmt == "WEBP" and len(head) >= 8:
        (riff_size,) = struct.unpack_from("<I", head, 4)
        return riff_size + 8 > size
    if fmt == "TIFF" and len(head) >= 16:
        order = "<" if head.startswith(b"II") else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")
        (offset,) = struct.unpack_from(order + ("Q" if big else "I"), head, 8 if big else 4)
        return bool(offset >= size)
    return False


def _megapixels(pixels: int) -> str:
    """A pixel count in megapixels, exactly: 30000 -> "0.03", 24000000 -> "24"."""
    return f"{pixels / 1e6:.6f}".rstrip("0").rstrip(".")


def describe_os_error(path: str, error: OSError) -> str:
    """A short message for an error opening ``path``, naming broken symlinks as such."""
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        return "broken symbolic link"
    return error.strerror or str(error)


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
