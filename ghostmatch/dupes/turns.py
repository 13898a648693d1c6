"""Turned copies: photos turned by a quarter-turn (with or without a mirror) or tilted with
filled corners are still copies; their turned or straightened views find and verify them.

A descriptor is not rotation invariant: a photo turned by 90 degrees scores like an
unrelated photo against its original. So the duplicate search first pairs images on
their thumbnails and tilts (:func:`turn_screen`, made while indexing and kept in the
catalog; :func:`screen`): two images whose thumbnails meet at a quarter-turn (with or
without a mirror), and an image tilted onto a larger canvas with filled corners with the
images that its straightened picture's thumbnail meets. Each pair's *view* (its owner
turned clockwise by 90, 180 or 270 degrees, or straightened and cut back to its picture,
then turned) is embedded and scored against the other file, and the pair is verified on
the view itself with the mirror the thumbnails tell, so the geometric stage sees an
upright copy.

Turns here are clockwise degrees. A pair's relation is kept as "``owner`` turned by
``turn`` (straightened first when ``straightened``), then mirrored when ``flipped``, lines
up with ``other``"; :func:`member_turn` turns it into what the duplicate groups report.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageChops, ImageOps

from ghostmatch.dupes.groups import DUPLICATE_TIERS, SIMILAR
from ghostmatch.dupes.workers import usable_cores
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.model.binding import ImageLike
from ghostmatch.pathtext import path_text
from ghostmatch.store.catalog import TurnScreen

if TYPE_CHECKING:
    from ghostmatch.dupes.finder import DuplicateFinder, PairJudge
    from ghostmatch.dupes.groups import DuplicateMember
    from ghostmatch.dupes.samecapture import Capture
    from ghostmatch.indexes.vector_index import VectorIndex
    from ghostmatch.model.embedder import Embedder
    from ghostmatch.model.scorenorm import ScoreNorm

QUARTER_TURNS = (90, 180, 270)

# Tilt detection works on the image scaled to at most this side (enough to fit each edge's
# line to a fraction of a degree, cheap beside embedding).
TILT_SIDE = 128
# A pixel belongs to the fill when every channel is within this of the fill colour (JPEG
# rings a few levels around the edge of a flat area).
FILL_TOLERANCE = 40
# Each corner's fill must run at least this share along both edges it touches: a tilt of
# about 3 degrees or more. Smaller tilts are within what the geometric check already
# accepts.
MIN_LEG = 0.05
# The corners' edge directions must agree within this many degrees.
ANGLE_AGREEMENT = 2.0
MIN_TILT, MAX_TILT = 3.0, 44.0
# Pixels cut from each side of the straightened content, where the fill was blended in.
EDGE_MARGIN = 2


def turn_array(array: np.ndarray, degrees: int) -> np.ndarray:
    """An (h, w, ...) image array turned clockwise by a multiple of 90 degrees."""
    if degrees % 90:
        raise ValueError(f"a quarter-turn is a multiple of 90 degrees, not {degrees}")
    return np.ascontiguousarray(np.rot90(array, k=-(degrees // 90) % 4))


def turn_image(image: Image.Image, degrees: int) -> Image.Image:
    """A PIL image turned clockwise by a multiple of 90 degrees."""
    method = {
        90: Image.Transpose.ROTATE_270,  # Pillow's ROTATE_n turn counter-clockwise
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_90,
    }
    degrees %= 360
    return image if degrees == 0 else image.transpose(method[degrees])


def inverse_turn(degrees: int, flipped: bool) -> int:
    """If X turned by ``degrees`` (then mirrored when ``flipped``) is Y, the turn that lines
    Y up with X: the opposite turn, or with a mirror the same one (mirroring reverses the
    sense of a turn)."""
    return degrees % 360 if flipped else (-degrees) % 360


def compose_turns(first: int, flipped: bool, then: int) -> int:
    """If X turned clockwise by ``first`` (then mirrored when ``flipped``) is Y, and Y
    turned by ``then`` (then mirrored or not) is Z, the turn that lines X up with Z (then
    mirrored when exactly one of the two was): a mirror reverses the sense of the turns
    after it."""
    return (first + (-then if flipped else then)) % 360


# How a file lines up with another: the clockwise turn, and whether a mirror follows it
# (None: not known, for an upright pair, which the geometric check may have mirrored).
Relation = tuple[int, "bool | None"]


def _chained(first: Relation, then: Relation) -> Relation | None:
    """X to Z through Y (:func:`compose_turns`), from X to Y and Y to Z; None when an
    unknown mirror leaves the turn unknown (a mirror reverses a turn of 90 or 270)."""
    (t1, f1), (t2, f2) = first, then
    if f1 is None and t2 % 180:
        return None
    return compose_turns(t1, bool(f1), t2), None if f1 is None or f2 is None else f1 != f2


@dataclass(frozen=True)
class Tilt:
    """An image tilted onto a canvas with filled corners: the content's edges lie at
    ``degrees`` (counter-clockwise, in (-45, 45)) and the corners have colour ``fill``."""

    degrees: float
    fill: tuple[int, int, int]


def _tilt_pixels(image: Image.Image) -> np.ndarray:
    """``image`` as (h, w, 3) int16 RGB at most ``TILT_SIDE`` pixels on its longer side."""
    small = image if image.mode == "RGB" else image.convert("RGB")
    scale = TILT_SIDE / max(small.size)
    if scale < 1:
        small = small.resize(
            (max(8, round(small.width * scale)), max(8, round(small.height * scale))),
            Image.Resampling.BOX,
        )
    return np.asarray(small, dtype=np.int16)


def _corner_fill(pixels: np.ndarray) -> np.ndarray | None:
    """The colour that the four corners of ``pixels`` share, or None when they do not
    share one (or the image is too small to tell)."""
    h, w, _ = pixels.shape
    if min(h, w) < 16:
        return None
    patches = [pixels[:2, :2], pixels[:2, -2:], pixels[-2:, :2], pixels[-2:, -2:]]
    colours = np.array([p.reshape(-1, 3).mean(axis=0) for p in patches])
    fill = np.median(colours, axis=0)
    if np.abs(colours - fill).max() > FILL_TOLERANCE / 2:
        return None
    return fill


def find_tilt(image: Image.Image, sides_shown: bool = True) -> Tilt | None:
    """The tilt of ``image`` when its four corners are filled with one flat colour whose
    edges towards the content are straight lines at one angle (a photo turned by some
    degrees and pasted on black or white), else None. With ``sides_shown`` false, an
    edge that only lies parallel to the picture's sides (the subject of a studio shot on
    white corners, whose own sides are white) is taken for a tilt too: often wrong, so only
    for a caller that checks what the straightened picture matches (:func:`screen`)."""
    pixels = _tilt_pixels(image)
    fill = _corner_fill(pixels)
    if fill is None:
        return None
    content = np.abs(pixels - fill).max(axis=2) > FILL_TOLERANCE
    angles: dict[tuple[bool, bool], float] = {}
    for flip_y, flip_x in CORNERS:
        corner = content[::-1] if flip_y else content
        corner = corner[:, ::-1] if flip_x else corner
        angle = _corner_angle(corner)
        if angle is None:
            continue
        # Mirroring a corner into the top-left one mirrors its edge's direction too.
        angles[(flip_y, flip_x)] = -angle if flip_x != flip_y else angle
    if not angles:
        return None
    degrees = float(np.median(list(angles.values())))
    agreeing = [c for c, a in angles.items() if abs(a - degrees) <= ANGLE_AGREEMENT]
    if not MIN_TILT <= abs(degrees) <= MAX_TILT:
        return None
    # Three corners with one edge direction are a tilt. Fewer (a light photo on white
    # corners, a dark one on black, shows no edge where its own border is the fill's
    # colour) are one only where the photo fills the canvas exactly as a turn onto a
    # canvas that holds all of it would: nothing outside that rectangle, and the edges
    # that do show lying on its sides.
    if len(agreeing) < 3 and not _fits_canvas(content, degrees, agreeing, sides_shown):
        return None
    red, green, blue = (round(float(c)) for c in fill)
    return Tilt(degrees, (red, green, blue))


# The corners as (flipped vertically, flipped horizontally) from the top-left one.
CORNERS = ((False, False), (False, True), (True, False), (True, True))
# Pixels beside a predicted side of the picture: within this many of it, and, outside the
# picture, further than this from it (JPEG and resampling blur the side itself).
SIDE_BAND = 3
# Outside the predicted picture at most this share of pixels may differ from the fill; in
# the band inside a side that shows, at least this share must (a light photo on white
# shows about half of its sides).
OUTSIDE_CONTENT, SIDE_CONTENT = 0.01, 0.3


def _canvas_rectangle(
    width: int, height: int, degrees: float, grow: float = 0.0
) -> list[tuple[float, float]] | None:
    """The corners of the picture that, turned counter-clockwise by ``degrees`` onto a
    canvas just large enough to hold it, fills a ``width`` x ``height`` canvas (its sides
    moved out by ``grow`` pixels), or None when no picture does."""
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    det = c * c - s * s
    w = (width * c - height * s) / det + 2 * grow
    h = (height * c - width * s) / det + 2 * grow
    if min(w, h) < 8:
        return None
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = width / 2, height / 2
    # Counter-clockwise on screen, where y points down.
    return [
        (cx + x * cos + y * sin, cy - x * sin + y * cos)
        for x, y in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]


def _polygon_mask(shape: tuple[int, int], corners: list[tuple[float, float]]) -> np.ndarray:
    from PIL import ImageDraw

    mask = Image.new("1", (shape[1], shape[0]))
    ImageDraw.Draw(mask).polygon(corners, fill=1)
    return np.array(mask, dtype=bool)


def _fits_canvas(
    content: np.ndarray,
    degrees: float,
    shown: Sequence[tuple[bool, bool]],
    sides_shown: bool = True,
) -> bool:
    """Whether ``content`` (the pixels that differ from the fill) is a picture turned by
    ``degrees`` onto a canvas that just holds it, one of the corners ``shown`` (flips from
    the top-left one) showing its side of the picture (unless not ``sides_shown``)."""
    h, w = content.shape
    outer = _canvas_rectangle(w, h, degrees, SIDE_BAND)
    inner = _canvas_rectangle(w, h, degrees, -SIDE_BAND)
    if outer is None or inner is None:
        return False
    outside = ~_polygon_mask((h, w), outer)
    if not outside.any() or content[outside].mean() > OUTSIDE_CONTENT:
        return False
    if not sides_shown:
        return True
    band = _polygon_mask((h, w), _canvas_rectangle(w, h, degrees) or inner)
    band &= ~_polygon_mask((h, w), inner)
    for flip_y, flip_x in shown:
        rows = slice(h // 2, h) if flip_y else slice(0, h // 2)
        cols = slice(w // 2, w) if flip_x else slice(0, w // 2)
        side = band[rows, cols]
        # One side that shows is enough: an edge inside the picture (a frame, a horizon)
        # can line up with a corner whose own side is the fill's colour.
        if side.any() and content[rows, cols][side].mean() >= SIDE_CONTENT:
            return True
    return False


def _corner_angle(content: np.ndarray) -> float | None:
    """The direction, in degrees in (-45, 45] (counter-clockwise on screen), of the edge
    between the top-left corner's fill and the content, or None when the corner holds no
    straight edge of a fill triangle."""
    h, w = content.shape
    # The first content pixel of each row of the upper half and of each column of the left
    # half: on the corner triangle's hypotenuse, or the next corner's where the triangle
    # is long and flat (a line fit that ignores the minority takes care of those).
    upper, left = content[: h // 2], content[:, : w // 2]
    first_x, first_y = np.argmax(upper, axis=1), np.argmax(left, axis=0)
    from_rows = upper.any(axis=1) & (first_x > 0)
    from_cols = left.any(axis=0) & (first_y > 0)
    if from_rows.sum() < MIN_LEG * h or from_cols.sum() < MIN_LEG * w:
        return None
    points = np.concatenate(
        [
            np.stack([first_x, np.arange(len(first_x))], axis=1)[from_rows],
            np.stack([np.arange(len(first_y)), first_y], axis=1)[from_cols],
        ]
    ).astype(np.float64)
    line = _fit_line(points)
    if line is None:
        return None
    direction, inliers = line
    if inliers < max(8, 0.5 * len(points)):
        return None
    # Screen coordinates have y down: a direction (dx, dy) lies at -atan2(dy, dx)
    # counter-clockwise. Edges are undirected and a rectangle's repeat every 90 degrees.
    angle = -math.degrees(math.atan2(direction[1], direction[0]))
    return (angle + 45.0) % 90.0 - 45.0


@functools.lru_cache(maxsize=1024)
def _line_picks(n: int) -> np.ndarray:
    """RANSAC's pairs of distinct point indices among ``n``, the same for every call (a
    seeded generator costs more to make than the fit)."""
    picks = np.random.default_rng(0).integers(0, n, (64, 2))
    picks = picks[picks[:, 0] != picks[:, 1]]
    picks.flags.writeable = False
    return picks


def _fit_line(points: np.ndarray, tolerance: float = 1.5) -> tuple[np.ndarray, int] | None:
    """The dominant straight line through ``points`` (n, 2): its unit direction and how
    many points lie within ``tolerance`` of it (RANSAC on pairs, then least squares)."""
    n = len(points)
    picks = _line_picks(n)
    edges = points[picks[:, 1]] - points[picks[:, 0]]
    lengths = np.sqrt((edges * edges).sum(axis=1))
    keep = lengths > 4.0
    if not keep.any():
        return None
    picks, edges, lengths = picks[keep], edges[keep], lengths[keep]
    normals = edges[:, ::-1] * np.array([-1.0, 1.0]) / lengths[:, None]
    # (m, n) distances of every point from every candidate line, as one broadcast (the
    # screen fits four corners of every image with shared corner colours).
    starts = points[picks[:, 0]]
    distances = np.abs(
        (points[None, :, 0] - starts[:, :1]) * normals[:, :1]
        + (points[None, :, 1] - starts[:, 1:]) * normals[:, 1:]
    )
    counts = (distances <= tolerance).sum(axis=1)
    near = distances[int(counts.argmax())] <= tolerance
    centre = points[near].mean(axis=0)
    chosen = points[near] - centre
    # The least-squares direction: the principal axis of the chosen points' 2 x 2 scatter.
    (xx, xy), (_, yy) = chosen.T @ chosen
    theta = 0.5 * math.atan2(2.0 * xy, xx - yy)
    direction = np.array([math.cos(theta), math.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    near = np.abs((points - centre) @ normal) <= tolerance
    return direction, int(near.sum())


def straighten(image: Image.Image, tilt: Tilt, margin: int = EDGE_MARGIN) -> Image.Image:
    """``image`` turned back by its tilt and cut to its picture, less ``margin`` pixels
    where the fill was blended in. The picture is the rectangle that, tilted onto a canvas just
    large enough to hold it, fills ``image``, when every content pixel lies inside it: a
    picture whose own sides are the fill's colour (a studio shot on white) shows only its
    subject, whose bounding box is not the picture. Otherwise (a canvas cut or padded
    after the tilt) the picture is the content's bounding box."""
    rgb = image.convert("RGB")
    upright = rgb.rotate(
        -tilt.degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=tilt.fill
    )
    content = _differs(upright, tilt.fill)
    # Rows and columns mostly content: the bounding box of the content without the odd
    # fill-coloured pixel of a dark photo or the ring of JPEG noise outside it.
    if not content.any():
        return rgb
    per_row, per_col = content.sum(axis=1), content.sum(axis=0)
    rows = np.flatnonzero(per_row >= 0.5 * per_row.max())
    cols = np.flatnonzero(per_col >= 0.5 * per_col.max())
    if len(rows) < 8 or len(cols) < 8:
        return rgb
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    picture = _picture_box(rgb.size, upright.size, tilt.degrees)
    if picture is not None and _holds(picture, content):
        box = picture
    left, top = box[0] + margin, box[1] + margin
    right, bottom = box[2] - margin, box[3] - margin
    if bottom - top < 8 or right - left < 8:
        return rgb
    return upright.crop((left, top, right, bottom))


def _differs(image: Image.Image, fill: tuple[int, int, int]) -> np.ndarray:
    """Which pixels of an RGB ``image`` differ from ``fill`` by more than
    ``FILL_TOLERANCE`` in some channel, (h, w) bool. Pillow's per-channel difference and
    maximum, in one pass each: a tenth of what numpy's reduction over the three channels
    of a photo costs, with the same mask."""
    difference = ImageChops.difference(image, Image.new("RGB", image.size, fill))
    red, green, blue = difference.split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    return np.asarray(largest) > FILL_TOLERANCE


def _picture_box(
    canvas: tuple[int, int], upright: tuple[int, int], degrees: float
) -> tuple[int, int, int, int] | None:
    """The box, in a ``canvas`` (width, height) turned back by ``degrees`` onto an
    ``upright`` canvas, of the picture that tilted by ``degrees`` just fills ``canvas``."""
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    det = c * c - s * s
    if det <= 0:
        return None
    w = (canvas[0] * c - canvas[1] * s) / det
    h = (canvas[1] * c - canvas[0] * s) / det
    if min(w, h) < 8:
        return None
    left, top = (upright[0] - w) / 2, (upright[1] - h) / 2
    return (round(left), round(top), round(left + w), round(top + h))


def _holds(box: tuple[int, int, int, int], content: np.ndarray) -> bool:
    """Whether (nearly) every content pixel lies in ``box`` (left, top, right, bottom),
    give or take the blur of a side."""
    inside = np.zeros_like(content)
    grow = SIDE_BAND
    inside[
        max(0, box[1] - grow) : box[3] + grow,
        max(0, box[0] - grow) : box[2] + grow,
    ] = True
    return float(content[~inside].sum()) <= OUTSIDE_CONTENT * max(1, int(content.sum()))


# ---------------------------------------------------------------------------- views


@dataclass(frozen=True)
class View:
    """How a view of image ``owner`` was made: straightened by ``tilt`` (when not None),
    then turned clockwise by ``turn`` degrees."""

    owner: int
    turn: int
    tilt: Tilt | None = None

    def of(self, image: Image.Image) -> Image.Image:
        """This view of ``image`` (the owner's pixels)."""
        upright = straighten(image, self.tilt) if self.tilt is not None else image
        return turn_image(upright, self.turn)


def views_of(owner: int, image: Image.Image, turns: tuple[int, ...]) -> list[View]:
    """The views an image is searched with: ``turns`` of the image itself, and when it is
    tilted with filled corners, its straightened content at every quarter-turn (a tilted
    copy may be turned as well, and straightening can only tell the tilt up to 90 degrees)."""
    views = [View(owner, t) for t in turns]
    tilt = find_tilt(image)
    if tilt is not None:
        views += [View(owner, t, tilt) for t in (0, *QUARTER_TURNS)]
    return views


@dataclass(frozen=True)
class TurnedPair:
    """A pair found through a view: ``owner`` turned by ``turn`` (straightened first by
    ``tilt``), then mirrored when ``flipped``, lines up with ``other``; ``score`` is the
    view's duplicate score with ``other``, ``inliers`` the geometric check's count (None
    when unchecked)."""

    owner: int
    other: int
    turn: int
    tilt: Tilt | None
    score: float
    flipped: bool = False
    inliers: int | None = None
    # The geometric check's map (2 x 3, from the view's unit square to the other file's).
    affine: np.ndarray | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return (min(self.owner, self.other), max(self.owner, self.other))


def member_turn(pair: TurnedPair | None, member: int) -> int:
    """The clockwise quarter-turn that lines ``member`` up with the other file of
    ``pair`` (then mirrored if the pair is a mirror image); 0 for an upright pair."""
    if pair is None:
        return 0
    if member == pair.owner:
        return pair.turn % 360
    return inverse_turn(pair.turn, pair.flipped)


# ---------------------------------------------------------------------------- search

# Images decoded together for a screen without stored thumbnails, and the nearest stored
# images each view is compared with (a turned copy is its view's nearest image; more only
# guard against ties).
VIEW_BATCH = 64
VIEW_NEIGHBOURS = 8

Offsets = Callable[[np.ndarray], "np.ndarray | None"]
# A kept file and what the grouping took with it: (file, score, tier) each.
Grouped = tuple[int, list[tuple[int, float, str]]]


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2)))


def decode(path: Path, side: int) -> Image.Image | None:
    """The image at ``path`` decoded for its views (at least ``side`` pixels on its
    shorter side), or None when it cannot be read any more."""
    try:
        return load_image(path, side).image
    except ImageRejected:
        return None


# ---------------------------------------------------------------------------- screening

# Thumbnails compared for the screen: grey, this many pixels a side whatever the aspect
# ratio (a quarter-turn of an image squashed to a square is the square turned).
THUMB_SIDE = 16
# A turned thumbnail must correlate at least this with another image's, and beat the
# two images' upright correlation by ``THUMB_MARGIN``, for their views to be embedded.
# Set on caltech101 train photos (``python -m benchmarks.turn_screen``): every turned
# and mirrored-and-turned copy passes, a pair of unrelated photos for about one photo in
# thirty.
THUMB_CUT = 0.9
THUMB_MARGIN = 0.05
# Other thumbnails each turned thumbnail is compared with (a turned copy is its nearest).
THUMB_NEIGHBOURS = 4


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    """``image`` as ``THUMB_SIDE`` x ``THUMB_SIDE`` uint8 grey pixels, whatever its aspect
    ratio (what the catalog keeps, ``TurnScreen.thumbnail``)."""
    grey = image.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8)


def unit_thumbnail(grey: np.ndarray) -> np.ndarray:
    """Grey thumbnail pixels as a vector, mean removed and unit length (zero for a flat
    image), so that a dot product of two is their correlation."""
    pixels = np.asarray(grey, dtype=np.float32).reshape(-1)
    pixels = pixels - pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 1e-3 else np.zeros_like(pixels)


def thumbnail(image: Image.Image) -> np.ndarray:
    """``image`` as a ``THUMB_SIDE`` squared grey vector, mean removed and unit length
    (zero for a flat image)."""
    return unit_thumbnail(grey_thumbnail(image))


def turn_screen(image: Image.Image) -> TurnScreen:
    """What :func:`screen` needs of a decoded image (at least ``SCREEN_SIDE`` pixels on
    its shorter side): its grey thumbnail, and when its picture is tilted onto filled
    corners, the tilt and the straightened picture's thumbnail. The indexer keeps it in
    the catalog, where the image is decoded anyway."""
    grey = grey_thumbnail(image).tobytes()
    tilt = find_tilt(image, sides_shown=False)
    if tilt is None:
        return TurnScreen(grey)
    picture = picture_thumbnail(image, tilt).tobytes()
    return TurnScreen(grey, tilt.degrees, tilt.fill, picture)


def picture_thumbnail(image: Image.Image, tilt: Tilt) -> np.ndarray:
    """The grey thumbnail (:func:`grey_thumbnail`) of ``image``'s picture straightened by
    ``tilt``. A thumbnail needs no more pixels than the tilt was measured on (and at that
    size the blended edge is one pixel wide)."""
    small = Image.fromarray(_tilt_pixels(image).astype(np.uint8))
    return grey_thumbnail(straighten(small, tilt, margin=1))


def _dihedral(thumbs: np.ndarray) -> list[tuple[int, bool, np.ndarray]]:
    """``thumbs`` (n, side*side) under the eight turns and mirrors: (clockwise turn,
    mirrored after the turn, the n turned thumbnails)."""
    squares = thumbs.reshape(-1, THUMB_SIDE, THUMB_SIDE)
    found = []
    for turn in (0, *QUARTER_TURNS):
        turned = np.rot90(squares, k=-(turn // 90), axes=(1, 2))
        for flipped in (False, True):
            made = turned[:, :, ::-1] if flipped else turned
            found.append((turn, flipped, np.ascontiguousarray(made).reshape(len(thumbs), -1)))
    return found


def screen_pairs(
    thumbs: np.ndarray,
    cut: float = THUMB_CUT,
    margin: float = THUMB_MARGIN,
) -> dict[tuple[int, int], tuple[int, int, bool, float]]:
    """The pairs of rows of ``thumbs`` (:func:`thumbnail`) where one may be the other
    turned by a quarter-turn (with or without a mirror): its turned (or turned and
    mirrored) thumbnail correlates at least ``cut`` with the other's and beats their
    upright correlation by ``margin`` (less when it is nearly exact). Each pair (low row
    first) with its owner (the row found from), the turn that lines the owner up with
    the other row, and the turn that lines the other up with the owner. A cheap
    screen: the views decide.
    """
    import faiss

    n = len(thumbs)
    if n < 2:
        return {}
    thumbs = np.ascontiguousarray(thumbs, dtype=np.float32)
    index = faiss.IndexFlatIP(thumbs.shape[1])
    index.add(thumbs)
    k = min(THUMB_NEIGHBOURS + 1, n)
    variants = _dihedral(thumbs)
    mirrored = variants[1][2]
    found: dict[tuple[int, int], tuple[int, int, bool, float]] = {}
    for turn, flipped, turned in variants[2:]:
        scores, rows = index.search(turned, k)
        for i, j in zip(*np.nonzero((scores >= cut) & (rows >= 0)), strict=True):
            mine, other = int(i), int(rows[i, j])
            if other == mine:
                continue
            upright = max(
                float(thumbs[mine] @ thumbs[other]), float(mirrored[mine] @ thumbs[other])
            )
            score = float(scores[i, j])
            # A near-exact turned match need beat the upright one only by as much as it
            # misses being exact: a photo nearly symmetric under a mirror and a turn
            # correlates highly upright too.
            if score - upright < min(margin, 1.0 - score):
                continue
            key = (min(mine, other), max(mine, other))
            # The best transform of a pair: a thumbnail nearly alike under two of them
            # keeps the one that fits.
            if key not in found or found[key][3] < score:
                found[key] = (mine, turn, flipped, score)
    return found


@dataclass(frozen=True)
class Screened:
    """What the screen found: ``candidates``, the pairs whose thumbnails met turned (or
    whose straightened picture met another image), best first, at most one per pair of
    ids, each with the turn (and mirror) that the thumbnails say lines its owner up with
    the other file, and no score yet; the tilted images (``tilts``); and, as sets, the
    turns of each image itself (``turns``) and of the tilted images' straightened pictures
    (``tilt_turns``) that those pairs ask for, and the pairs of ids (low first) whose
    thumbnails met turned (``pairs``)."""

    turns: dict[int, set[int]]
    tilts: dict[int, Tilt]
    tilt_turns: dict[int, set[int]] = field(default_factory=dict)
    pairs: set[tuple[int, int]] = field(default_factory=set)
    candidates: list[TurnedPair] = field(default_factory=list)

    @property
    def images(self) -> set[int]:
        return set(self.turns) | set(self.tilt_turns)


# The straightened picture of a tilted image, at some quarter-turn (with or without a
# mirror), must correlate at least this with another image's thumbnail for the two to be
# checked at that turn: the highest cut that keeps as many tilted copies as any. Set on
# the tuning half of the full ``python -m benchmarks.turns`` set's tilted copies (196 of
# the 197 whose tilt is found pass; held out, 179 of 189); of the 1,000 caltech101 test
# photos of its mostly upright library, 65 look tilted (caltech rotated some classes, or a
# studio shot's edges pass for a tilt) and 8 of them pass.
TILT_CUT = 0.75
# Other thumbnails each straightened picture is compared with.
TILT_NEIGHBOURS = 2
# The side, in pixels, the screen decodes images to (at least, on the shorter side; a
# JPEG at a reduced DCT scale): the bundled model's input size. At 96 the thumbnails of
# two held-out turned copies in 500 fell under the cut (``benchmarks.turn_screen``), and
# photos of caltech101's size decoded no faster.
SCREEN_SIDE = 160


def screen(
    paths: Mapping[int, Path],
    side: int = SCREEN_SIDE,
    on_batch: Callable[[int], None] | None = None,
    stored: Mapping[int, TurnScreen] | None = None,
) -> Screened:
    """Which pairs of images may be turned or tilted copies, from each image's thumbnail
    and tilt (:func:`turn_screen`): ``stored`` ones (the catalog's, made while indexing),
    else from one small decode of the image. Pairs: two images whose thumbnails meet at
    a quarter-turn (:func:`screen_pairs`), and a tilted image with each image that its
    straightened picture's thumbnail meets (:func:`tilt_partners`): most tilted photos are
    no one's copy. ``on_batch`` counts the images decoded."""
    ids = list(paths)
    stored = stored or {}
    thumbs = np.zeros((len(ids), THUMB_SIDE * THUMB_SIDE), np.float32)
    tilts: dict[int, Tilt] = {}
    straightened: dict[int, np.ndarray] = {}

    def keep(n: int, found: TurnScreen) -> None:
        thumbs[n] = unit_thumbnail(np.frombuffer(found.thumbnail, np.uint8))
        if found.tilt is not None and found.fill is not None and found.straightened is not None:
            tilts[ids[n]] = Tilt(found.tilt, found.fill)
            straightened[n] = unit_thumbnail(np.frombuffer(found.straightened, np.uint8))

    def work(n: int) -> None:
        image = decode(paths[ids[n]], side)
        if image is not None:
            keep(n, turn_screen(image))

    size = THUMB_SIDE * THUMB_SIDE
    missing = []
    for n, i in enumerate(ids):
        found = stored.get(i)
        # A thumbnail of another size was made by another version: made again here.
        if found is None or len(found.thumbnail) != size:
            missing.append(n)
        else:
            keep(n, found)
    if missing:
        with _pool() as pool:
            for start in range(0, len(missing), VIEW_BATCH):
                chunk = missing[start : start + VIEW_BATCH]
                list(pool.map(work, chunk))
                if on_batch is not None:
                    on_batch(len(chunk))
    turns: dict[int, set[int]] = {}
    pairs = set()
    found_pairs: list[tuple[float, TurnedPair]] = []
    for (a, b), (mine, turn, flipped, score) in screen_pairs(thumbs).items():
        # Two tilted canvases line up turned by their fill alone (a tilt turned by 90 is
        # the same tilt): their thumbnails, and the geometric check, see the corners. So
        # their straightened pictures must meet as well.
        if a in straightened and b in straightened and not _pictures_meet(straightened, a, b):
            continue
        other = b if mine == a else a
        turns.setdefault(ids[mine], set()).add(turn)
        turns.setdefault(ids[other], set()).add(inverse_turn(turn, flipped))
        pairs.add((min(ids[a], ids[b]), max(ids[a], ids[b])))
        found_pairs.append(
            (score, TurnedPair(ids[mine], ids[other], turn, None, math.nan, flipped))
        )
    tilt_turns: dict[int, set[int]] = {}
    for n, other, turn, flipped, score in tilt_partners(thumbs, straightened):
        tilt = tilts[ids[n]]
        tilt_turns.setdefault(ids[n], set()).add(turn)
        found_pairs.append((score, TurnedPair(ids[n], ids[other], turn, tilt, math.nan, flipped)))
    best: dict[tuple[int, int], TurnedPair] = {}
    for _, pair in sorted(found_pairs, key=lambda sp: -sp[0]):
        best.setdefault(pair.key, pair)
    return Screened(turns, tilts, tilt_turns, pairs, list(best.values()))


def _pictures_meet(straightened: Mapping[int, np.ndarray], a: int, b: int) -> bool:
    """Whether the straightened thumbnails of rows ``a`` and ``b`` correlate at least
    ``TILT_CUT`` at some quarter-turn, with or without a mirror."""
    variants = np.stack([v[0] for _, _, v in _dihedral(straightened[a][None])])
    return bool((variants @ straightened[b]).max() >= TILT_CUT)


def tilt_partners(
    thumbs: np.ndarray, straightened: Mapping[int, np.ndarray], cut: float = TILT_CUT
) -> list[tuple[int, int, int, bool, float]]:
    """For each row of ``thumbs`` in ``straightened`` (its straightened picture's
    :func:`thumbnail`), the other rows whose thumbnail that picture, turned clockwise by a
    quarter-turn and then mirrored or not, correlates at least ``cut`` with: (row, other
    row, turn, mirrored, correlation)."""
    import faiss

    if not straightened or len(thumbs) < 2:
        return []
    rows = list(straightened)
    index = faiss.IndexFlatIP(thumbs.shape[1])
    index.add(np.ascontiguousarray(thumbs, dtype=np.float32))
    mine = np.stack([straightened[n] for n in rows]).astype(np.float32)
    found = []
    # Two others (one neighbour may be the tilted image's own canvas): the original and an
    # upright copy of it that may be the file kept.
    k = min(TILT_NEIGHBOURS + 1, len(thumbs))
    for turn, flipped, turned in _dihedral(mine):
        scores, near = index.search(turned, k)
        for m, n in enumerate(rows):
            for score, j in zip(scores[m].tolist(), near[m].tolist(), strict=True):
                if score >= cut and j >= 0 and j != n:
                    found.append((n, int(j), turn, flipped, float(score)))
    return found


def picture_share(width: int, height: int, tilt: Tilt) -> float:
    """The share of a ``width`` x ``height`` canvas that a picture tilted by ``tilt`` onto
    it, just fitting, covers (1 where no picture fits)."""
    c, s = abs(math.cos(math.radians(tilt.degrees))), abs(math.sin(math.radians(tilt.degrees)))
    det = c * c - s * s
    if det <= 0 or width <= 0 or height <= 0:
        return 1.0
    w, h = (width * c - height * s) / det, (height * c - width * s) / det
    return 1.0 if min(w, h) <= 0 else min(1.0, w * h / (width * height))


def view_pairs(
    views: Sequence[View],
    view_vectors: np.ndarray,
    ids: np.ndarray,
    vectors: np.ndarray,
    floor: float,
    offsets: np.ndarray | None,
    offsets_of: Offsets,
    index: VectorIndex | None = None,
    neighbours: int = VIEW_NEIGHBOURS,
) -> list[TurnedPair]:
    """Pairs (owner, stored image) whose view scores at least ``floor`` with a stored
    descriptor, the best view of each pair; ``ids`` and ``vectors`` are the stored images
    (``offsets`` theirs), ``index`` their FAISS index when it holds exactly them."""
    if not len(views) or not len(ids):
        return []
    k = min(neighbours + 1, len(ids))
    if index is not None and index.ntotal == len(ids):
        _, found = index.search(view_vectors, k)
        rows = np.searchsorted(ids, np.where(found >= 0, found, ids[0]))
        rows = np.where(found >= 0, rows, -1)
    else:
        sims = view_vectors @ vectors.T
        rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    own = offsets_of(view_vectors)
    best: dict[tuple[int, int], TurnedPair] = {}
    for n, view in enumerate(views):
        for row in rows[n]:
            if row < 0 or int(ids[row]) == view.owner:
                continue
            # Rescored from the vectors, as every duplicate score is.
            score = float(np.dot(view_vectors[n].astype(np.float64), vectors[row]))
            if offsets is not None and own is not None:
                score -= float(offsets[row]) + float(own[n])
            if score < floor:
                continue
            pair = TurnedPair(view.owner, int(ids[row]), view.turn, view.tilt, score)
            if pair.key not in best or best[pair.key].score < score:
                best[pair.key] = pair
    return sorted(best.values(), key=lambda p: (-p.score, p.key))


# ---------------------------------------------------------------------------- verification


# Views embedded together for their scores: on one thread, small batches cost less per
# image than large ones, whose activations no longer fit in the cache.
SCORE_BATCH = 8
# Maps check_screened keeps at once (about 0.1 MB each).
MAP_CACHE_VIEWS = 512


# The share of a tilted image's picture pixels that the keep rule counts: an upright file
# of about as many pixels is kept over it.
TILTED_PIXELS = 0.8


def by_picture(
    members: Mapping[int, DuplicateMember], pictures: Mapping[int, float]
) -> dict[int, DuplicateMember]:
    """``members`` as the keep rule should rank them: a tilted image counts only the
    pixels of its picture (``pictures``: the share of each tilted image's pixels that is
    picture), not its filled corners, so that the larger canvas of a tilt does not make it
    the file kept over its upright original; and only ``TILTED_PIXELS`` of those, since a
    picture measured from an angle a degree or two off (one taken from its subject's
    edges) comes out larger than it is, and a tilt has resampled every pixel anyway."""
    ranked = dict(members)
    for i, share in pictures.items():
        if i in ranked:
            m, side = ranked[i], math.sqrt(share * TILTED_PIXELS)
            ranked[i] = replace(m, width=int(m.width * side), height=int(m.height * side))
    return ranked


# Decoded images image_loader keeps at once (at the zoomed maps' size, about 0.3 MB each).
IMAGE_CACHE = 256


def image_loader(paths: Mapping[int, Path], side: int) -> Callable[[int], Image.Image | None]:
    """Decode images by id, the recently used ones kept (a pair's two images, and a kept
    file's turned copies, are asked for together)."""
    cache: OrderedDict[int, Image.Image | None] = OrderedDict()

    def load(i: int) -> Image.Image | None:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = found = decode(paths[i], side)
        if len(cache) > IMAGE_CACHE:
            cache.popitem(last=False)
        return found

    return load


def shared_loader(
    paths: Mapping[int, Path], side: int, judge: PairJudge
) -> Callable[[int], Image.Image | None]:
    """:func:`image_loader` through the decodes of ``judge`` (``PairJudge.decoded``), which
    hands back a file it decoded at another size where that gives the same pixels; a file
    that cannot be read is not tried again."""
    failed: set[int] = set()

    def load(i: int) -> Image.Image | None:
        if i in failed:
            return None
        try:
            return judge.decoded.image(paths[i], side)
        except ImageRejected:
            failed.add(i)
            return None

    return load


# ---------------------------------------------------------------------------- screened pairs


def check_screened(
    embedder: Embedder,
    views: Callable[[View], Image.Image | None],
    pairs: Sequence[TurnedPair],
    cache: MutableMapping[tuple[View, bool], np.ndarray],
    prepared: Mapping[View, np.ndarray] | None = None,
) -> list[TurnedPair]:
    """Each screened pair with the inliers of the geometric check of its owner's view
    against the other image (``ghostmatch.dupes.verify.verify_pair``), on maps at the
    model's input size. The thumbnails have told the turn and whether a mirror follows
    it, so each side needs one map, not the mirrored and zoomed ones of a pair whose
    transform is unknown. ``cache`` keeps the maps by (view, mirrored) from one call to
    the next (a kept file's map serves all its turned copies); ``views`` makes a view's
    pixels (None: its image cannot be read any more), ``prepared`` holds views already
    prepared for the model (unmirrored, as for their descriptors)."""
    from ghostmatch.dupes.verify import local_features, verify_pair
    from ghostmatch.model.embedder import prepare, to_batch

    if len(cache) >= MAP_CACHE_VIEWS:
        cache.clear()
    sides = [((View(p.other, 0), False), (View(p.owner, p.turn, p.tilt), p.flipped)) for p in pairs]
    made: list[tuple[tuple[View, bool], np.ndarray]] = []
    for key in dict.fromkeys(k for side in sides for k in side):
        if key in cache:
            continue
        array = None if key[1] or prepared is None else prepared.get(key[0])
        if array is None:
            seen = views(key[0])
            if seen is None:
                continue
            array = prepare(ImageOps.mirror(seen) if key[1] else seen, embedder.card)
        made.append((key, array))
    if made:
        maps = local_features(embedder.local_maps_model, to_batch([a for _, a in made]))
        cache.update(zip([k for k, _ in made], maps, strict=True))
    checked = []
    for pair, (target, view) in zip(pairs, sides, strict=True):
        a, b = cache.get(target), cache.get(view)
        if a is None or b is None:
            checked.append(replace(pair, inliers=0))
            continue
        found = verify_pair(a, b)
        checked.append(replace(pair, inliers=found.inliers, affine=found.affine))
    return checked


# Captures (``ghostmatch.dupes.samecapture``) of views that capture_cache keeps at once
# (about 0.5 MB each, pyramid made).
CAPTURE_CACHE = 64

Captures = Callable[[View, bool], "Capture | None"]


def capture_cache(
    views: Callable[[View], Image.Image | None],
    stored: Callable[[int], Capture | None] | None = None,
) -> Captures:
    """Captures for :func:`same_capture` by (view, mirrored), each prepared once: a kept
    file's turned view serves all its copies turned alike. An indexed file seen as it is
    comes from ``stored`` (the upright judge's own, ``PairJudge.capture``), which the
    upright pairs of that file use too; ``views`` makes a view's pixels (None: its image
    cannot be read any more)."""
    from ghostmatch.dupes.samecapture import prepare_capture

    cache: OrderedDict[tuple[View, bool], Capture | None] = OrderedDict()

    def capture(view: View, flipped: bool) -> Capture | None:
        if stored is not None and view.owner >= 0 and view == View(view.owner, 0) and not flipped:
            return stored(view.owner)
        key = (view, flipped)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        seen = views(view)
        made = None if seen is None else prepare_capture(ImageOps.mirror(seen) if flipped else seen)
        cache[key] = made
        if len(cache) > CAPTURE_CACHE:
            cache.popitem(last=False)
        return made

    return capture


def same_capture(
    captures: Captures, pair: TurnedPair, unmoved: bool = False, crowded: bool = False
) -> bool:
    """Whether a checked pair's view and other file are one capture: the dense agreement
    of ``ghostmatch.dupes.samecapture`` on the geometric check's map, the decision every
    upright pair gets. Local features alone line up two unrelated pictures of smooth
    noise turned, as they would upright. With ``unmoved``, the pair (checked or not) is
    aligned from the identity map instead, as an upright pair is first tried, and a
    first try that hardly agrees is settled early; with ``crowded`` too, it is tried as an
    upright crowded pair is, its only try. ``captures`` (:func:`capture_cache`) gives both
    sides prepared."""
    from ghostmatch.dupes.samecapture import agreement

    if pair.affine is None and not unmoved:
        return False
    target = captures(View(pair.other, 0), False)
    seen = captures(View(pair.owner, pair.turn, pair.tilt), pair.flipped)
    if target is None or seen is None:
        return False
    if unmoved:
        tried = agreement(
            target,
            seen,
            np.eye(2, 3),
            second_chance=not crowded,
            first_try=crowded,
            colours_early=crowded,
        )
        return tried.same_capture
    assert pair.affine is not None
    # The check maps the view's unit square to the other file's; alignment needs the
    # other way round.
    warp = np.linalg.inv(np.vstack([pair.affine, [0.0, 0.0, 1.0]]))[:2]
    return agreement(target, seen, warp).same_capture


# ---------------------------------------------------------------------------- the finder's hooks


class TurnedCandidates:
    """The turned and tilted candidate pairs of an index, decided only when the grouping
    asks for them (as ``PairJudge`` decides upright pairs).

    :func:`screen` pairs images by their thumbnails (stored in the catalog while
    indexing), each pair with the turn and mirror that line its owner up with the other
    file; a pair that is byte-identical or marked not a duplicate (``ignored``) is left
    out. Each pair's view (its owner turned, or straightened and turned) is embedded
    and scored against the other file's stored descriptor; the pair is a candidate when
    that score reaches ``floor`` and beats its upright score (``upright``: the upright
    candidates'); a crowded file's pair by a quarter-turn is one on its thumbnails alone,
    its view embedded only for the score of a pair that passes. :meth:`decide` then
    settles the candidates of one kept file: with the geometric stage (``enough``
    inliers), the view must pass it against the other file (:func:`check_screened`);
    without it, the view's score must reach ``threshold``. A
    pair that fails still gets the upright decision when it is an upright candidate too.
    ``judge``, the upright pairs' ``PairJudge``, prepares the indexed files for the dense
    agreement (shared with the upright pairs) and tells the crowded files, whose views'
    nearest images are not looked at (see ``__init__``).
    """

    def __init__(
        self,
        finder: DuplicateFinder,
        ids: np.ndarray,
        vectors: np.ndarray,
        offsets: np.ndarray | None,
        floor: float,
        threshold: float,
        enough: int | None,
        upright: Mapping[tuple[int, int], float],
        ignored: set[tuple[Path, Path]],
        judge: PairJudge | None = None,
    ) -> None:
        self.records = {r.id: r for r in finder.catalog.get([int(i) for i in ids])}
        paths = {i: r.path for i, r in self.records.items()}
        self.finder = finder
        self.ids, self.vectors, self.offsets = ids, vectors, offsets
        self.normalised = offsets is not None
        self.threshold, self.enough = threshold, enough
        self.upright = upright
        card = finder.card
        side = card.input_size if card is not None else SCREEN_SIDE
        # With a judge, through its decodes: a crowd's files are decoded for their captures
        # before their turned views are asked for, and the view's size mostly decodes the
        # same pixels (1,000 synthetic images: 136 of the 137 files whose views are made).
        self.images = (
            image_loader(paths, side) if judge is None else shared_loader(paths, side, judge)
        )
        self.maps: dict[tuple[View, bool], np.ndarray] = {}
        self.straightened: OrderedDict[tuple[int, Tilt], Image.Image] = OrderedDict()
        self.captures = capture_cache(self._view, judge.capture if judge is not None else None)
        self.judge = judge
        crowded = judge.crowded if judge is not None else frozenset()
        self.crowded = crowded
        # Each view's descriptor and score offset.
        self.described: dict[View, tuple[np.ndarray, float]] = {}
        # Each view as the model took it, for the geometric check's map of the view.
        self.prepared: dict[View, np.ndarray] = {}
        # Made while indexing; images indexed before that are decoded here.
        screened = screen(paths, stored=finder.catalog.turn_screens([int(i) for i in ids]))
        hashes = {i: r.content_hash for i, r in self.records.items()}
        kept = [
            p
            for p in screened.candidates
            if hashes[p.owner] != hashes[p.other]
            and (paths[p.owner], paths[p.other]) not in ignored
            and (paths[p.other], paths[p.owner]) not in ignored
        ]

        # With the dense agreement (the geometric stage on), a crowded file's pair by a
        # quarter-turn (neither file tilted) is a candidate on its thumbnails alone: the
        # descriptor cannot tell such images apart, so its score neither admits the pair
        # nor rules it out, and the agreement decides (see ``decide``). A crowded file's own
        # views are embedded for the score of a pair that passes, and only then (1,000
        # synthetic images: 318 of their 319 views, about 6 CPU seconds before the
        # grouping, for no pair that passed).
        def screen_only(p: TurnedPair) -> bool:
            return (
                enough is not None
                and p.tilt is None
                and bool({p.owner, p.other} & crowded)
                and p.owner not in screened.tilts
                and p.other not in screened.tilts
            )

        later = [screen_only(p) and p.owner in crowded for p in kept]
        # The other views all at once, before the grouping starts deciding upright pairs: a
        # few small batches cost less than one model pass per pair between those of the check.
        now = [p for p, wait in zip(kept, later, strict=True) if not wait]
        scored = {p.key: p for p in self._scored(now)}
        # Each view also meets its nearest stored images: the thumbnails pair a copy with
        # its few nearest, which may miss the file kept over its original (an upright or
        # turned copy of it) or the original of a tilted copy whose straightened thumbnail
        # met another image first. The thumbnails then tell such a pair's turn and mirror.
        views = list(self.described)
        found = view_pairs(
            views,
            np.stack([self.described[v][0] for v in views]).astype(np.float32)
            if views
            else np.zeros((0, vectors.shape[1]), np.float32),
            ids,
            vectors,
            floor,
            offsets,
            lambda _: np.array([self.described[v][1] for v in views]),
            finder.vectors.index,
        )
        for p in found:
            if p.key in scored or hashes[p.owner] == hashes[p.other]:
                continue
            # Where the descriptor cannot tell images apart (a crowded file, see
            # ``PairJudge``), a view's nearest images are any images: such a file pairs by a
            # turn only as the screen paired it (1,000 synthetic images: 1,168 of their
            # 1,639 turned pairs came that way, not one a copy, each needing the geometric
            # check).
            if p.owner in crowded or p.other in crowded:
                continue
            # A turned view of a tilted canvas meets other tilted canvases by their
            # corners: two tilted images pair by a turn only as the screen paired them.
            if p.tilt is None and p.owner in screened.tilts and p.other in screened.tilts:
                continue
            if {(paths[p.owner], paths[p.other]), (paths[p.other], paths[p.owner])} & ignored:
                continue
            if p.tilt is None and p.other in screened.tilts:
                # A turned view that meets a tilted canvas: checked, like the screen's tilted
                # pairs, on the canvas straightened (the picture at the other's scale).
                p = TurnedPair(p.other, p.owner, 0, screened.tilts[p.other], p.score)
            lined_up = self._lined_up(p)
            if lined_up is not None:
                scored[p.key] = lined_up
        self.pairs = {
            key: p
            for key, p in scored.items()
            if screen_only(p) or (p.score >= floor and p.score > upright.get(key, -math.inf))
        }
        # The pairs whose views are not embedded stand in the grouping's candidates at their
        # upright score (the one they are listed with should they go to the upright
        # decision), else at the floor, until one passes (:meth:`rescored`).
        self.unscored = {
            p.key: replace(p, score=upright.get(p.key, floor))
            for p, wait in zip(kept, later, strict=True)
            if wait and p.key not in scored
        }
        self.pairs.update(self.unscored)
        # Only the candidates' views are checked: the other views' pixels go.
        asked = {View(p.owner, p.turn, p.tilt) for p in self.pairs.values()}
        self.prepared = {v: a for v, a in self.prepared.items() if v in asked}
        # The keep rule counts a tilted image's picture, not its filled corners.
        self.pictures = {
            i: share
            for i, tilt in screened.tilts.items()
            if any(i in key for key in self.pairs)
            and (share := picture_share(self.records[i].width, self.records[i].height, tilt)) < 1
        }
        # The pairs that passed, as checked (their turn and mirror settled).
        self.passed: dict[tuple[int, int], TurnedPair] = {}
        self.ignored = ignored
        # (kept file, copy) joined through another copy of the kept file (:meth:`adopt`).
        self.chained: dict[tuple[int, int], Relation] = {}

    @functools.cached_property
    def embedder(self) -> Embedder:
        """The model, loaded only when there is a view to embed or a pair to check."""
        return self.finder.embedder

    @functools.cached_property
    def _norm(self) -> ScoreNorm | None:
        """The score background itself (the finder's own lookup reads the model card each
        time), None for plain cosines."""
        return self.embedder.score_norm if self.normalised else None

    def candidates(self, upright: Iterable[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
        """The grouping's candidates: ``upright`` ones (low id first), each turned
        candidate in place of its upright pair with its view's score."""
        merged = [(i, j, s) for i, j, s in upright if (i, j) not in self.pairs]
        return merged + [(i, j, p.score) for (i, j), p in self.pairs.items()]

    def decide(self, leader: int, others: Sequence[int]) -> tuple[dict[int, str], list[int]]:
        """The others that are ``leader``'s turned or tilted copies (tier ``edited``), and
        the ones left for the upright decision."""
        keys = {j: (min(leader, j), max(leader, j)) for j in others}
        asked = [self.pairs[k] for k in keys.values() if k in self.pairs]
        if self.enough is None:
            passed = [p for p in asked if p.score >= self.threshold]
        else:
            # As upright pairs are (``PairJudge``): a view that scores from the threshold up
            # is first aligned unmoved, where a copy only turned or tilted (and re-encoded,
            # resized, recoloured) agrees already without local features. A crowded file's
            # pairs turned by quarter-turns are only tried unmoved, as its upright pairs
            # are: the screen paired their thumbnails at the turn, and local features line
            # up any two such pictures. The others that do not agree unmoved go to the
            # geometric check.
            crowded = {p.key for p in asked if {p.owner, p.other} & self.crowded}
            passed = [
                p
                for p in asked
                if p.score >= self.threshold
                and p.key not in crowded
                and (self._glanced(p) or same_capture(self.captures, p, unmoved=True))
            ]
            tried = {p.key for p in asked if p.key in crowded and p.tilt is None}
            passed += [
                p
                for p in asked
                if p.key in tried and same_capture(self.captures, p, unmoved=True, crowded=True)
            ]
            settled = {p.key for p in passed} | tried
            moved = [p for p in asked if p.key not in settled]
            checked = check_screened(self.embedder, self._view, moved, self.maps, self.prepared)
            passed += [
                p
                for p in checked
                if (p.inliers or 0) >= self.enough and same_capture(self.captures, p)
            ]
        # A pair passed on its thumbnails alone gets its view's score now (see ``__init__``).
        if waiting := [p for p in passed if p.key in self.unscored]:
            scored = {p.key: p for p in self._scored(waiting)}
            passed = [scored.get(p.key, p) for p in passed]
        self.passed.update((p.key, p) for p in passed)
        known = {j: "edited" for j, k in keys.items() if k in self.passed}
        rest = [
            j
            for j, k in keys.items()
            if j not in known and (k not in self.pairs or k in self.upright)
        ]
        return known, rest

    def rescored(self, decided: Sequence[Grouped], rank: Callable[[int], Any]) -> list[Grouped]:
        """The grouping's groups (kept file, [(copy, score, tier), ...]) with each copy that
        passed on its thumbnails alone (``__init__``) at its view's score, not the score it
        stood in the candidates at, each group's copies ordered again as the grouping orders
        them (best score first, then by ``rank``, the keep rule's order)."""
        scores = {k: self.passed[k].score for k in self.unscored if k in self.passed}
        out = []
        for leader, taken in decided:
            fixed = [(j, scores.get((min(leader, j), max(leader, j)), s), t) for j, s, t in taken]
            if fixed != taken:
                fixed.sort(key=lambda jst: (-jst[1], rank(jst[0])))
            out.append((leader, fixed))
        return out

    def _glanced(self, pair: TurnedPair) -> bool:
        """Whether a pair turned by quarter-turns (not tilted) is settled on small grey views,
        as an upright copy is (``ghostmatch.dupes.settle.settles``): its view, turned and
        mirrored as the pair says, is the other file unmoved up to one brightness and
        contrast change. A quarter-turn moves pixels without resampling them, so the
        view of a copy only turned is the picture an upright copy would be."""
        from ghostmatch.dupes.settle import Glance, settles

        if pair.tilt is not None or self.judge is None or self.judge.capture(pair.other) is None:
            return False
        kept = self.judge.glances.get(pair.other)
        seen = self._view(View(pair.owner, pair.turn, pair.tilt))
        if kept is None or seen is None:
            return False
        view = Glance.of(ImageOps.mirror(seen) if pair.flipped else seen, framed=False)
        return settles(kept, view)

    def _scored(self, pairs: Sequence[TurnedPair]) -> list[TurnedPair]:
        """``pairs`` with their views' duplicate scores against the other files' stored
        descriptors, each view embedded once; a view whose image cannot be read any more
        leaves its pair out."""
        from ghostmatch.model.embedder import prepare

        embedder, card, norm = self.embedder, self.embedder.card, self._norm
        views = list(dict.fromkeys(View(p.owner, p.turn, p.tilt) for p in pairs))
        described = self.described

        def embedded(made: list[tuple[View, Image.Image]]) -> tuple[list[np.ndarray], np.ndarray]:
            arrays = [prepare(seen, card) for _, seen in made]
            return arrays, embedder.embed_arrays(arrays, threads=1)

        def take(
            made: list[tuple[View, Image.Image]], arrays: list[np.ndarray], found: np.ndarray
        ) -> None:
            # At most ``IMAGE_CACHE`` of them kept (about 77 kB each); a view without its
            # array is prepared again for its check.
            room = max(0, IMAGE_CACHE - len(self.prepared))
            self.prepared.update(list(zip([v for v, _ in made], arrays, strict=True))[:room])
            own = norm.offsets(found) if norm is not None else np.zeros(len(made))
            described.update(
                (v, (found[n].astype(np.float64), float(own[n]))) for n, (v, _) in enumerate(made)
            )

        # The views are made here (their caches are this object's) while batches already
        # made are embedded on other threads, each on a one-thread session of its own use:
        # this runs before the grouping's processes start, with every core free. Results
        # are taken in order, a few batches behind, so that the views held stay few.
        processes = usable_cores()
        with ThreadPoolExecutor(processes) as pool:
            pending: deque[tuple[list[tuple[View, Image.Image]], Future[Any]]] = deque()
            for start in range(0, len(views), SCORE_BATCH):
                chunk = views[start : start + SCORE_BATCH]
                made = [(v, seen) for v in chunk if (seen := self._view(v)) is not None]
                if made:
                    pending.append((made, pool.submit(embedded, made)))
                while len(pending) > 2 * processes:
                    done, future = pending.popleft()
                    take(done, *future.result())
            while pending:
                done, future = pending.popleft()
                take(done, *future.result())
        scored = []
        for p in pairs:
            view = described.get(View(p.owner, p.turn, p.tilt))
            if view is None:
                continue
            row = int(np.searchsorted(self.ids, p.other))
            # Rescored from the vectors, as every duplicate score is.
            score = float(view[0] @ self.vectors[row].astype(np.float64))
            if self.offsets is not None:
                score -= float(self.offsets[row]) + view[1]
            scored.append(replace(p, score=score))
        return scored

    def _lined_up(self, pair: TurnedPair) -> TurnedPair | None:
        """``pair`` with the turn and mirror under which its owner's thumbnail (its
        straightened picture's, when tilted) best meets the other file's; None when either
        cannot be read any more."""
        base, other = self._view(View(pair.owner, 0, pair.tilt)), self.images(pair.other)
        if base is None or other is None:
            return None
        turn, flipped = _best_transform(base, other)
        return replace(pair, turn=turn, flipped=flipped)

    def _view(self, view: View) -> Image.Image | None:
        """The pixels of ``view``; a tilted image is straightened once for its check and its
        descriptor."""
        image = self.images(view.owner)
        if image is None or view.tilt is None:
            return None if image is None else view.of(image)
        key = (view.owner, view.tilt)
        if key not in self.straightened:
            self.straightened[key] = straighten(image, view.tilt)
            if len(self.straightened) > IMAGE_CACHE:
                self.straightened.popitem(last=False)
        return turn_image(self.straightened[key], view.turn)

    def turn(self, leader: int, j: int) -> int:
        """The turn that lines copy ``j`` up with its kept file ``leader`` (0: upright)."""
        return self._relation(leader, j)[0]

    def _relation(self, leader: int, j: int) -> Relation:
        if (leader, j) in self.chained:
            return self.chained[(leader, j)]
        pair = self.passed.get((min(leader, j), max(leader, j)))
        return (0, None) if pair is None else (member_turn(pair, j), pair.flipped)

    def adopt(self, decided: Sequence[Grouped], rank: Callable[[int], Any]) -> list[Grouped]:
        """The grouping's groups (kept file, [(copy, score, tier), ...]), with the files
        left out that are turned or tilted copies of a copy in a group: each joins that
        group (with its own copies, when it kept some), its turn to the kept file
        composed through that copy. The grouping compares a file with kept files only,
        and a family of copies is often kept by a copy (a re-encode of more bytes than its
        original): a turned copy's screened partners are its few nearest thumbnails,
        which may all be others of the family, never the kept one (of the 99 held-out
        copies of ``benchmarks.turns --quick``, one turned by 90 was lost so: the family's
        kept file was its mirror image, which the upright check of a nearly symmetric
        subject does not take for a copy, and its eight turned partners were all taken).
        ``rank(file)`` orders files as the keep rule does: a file ranked before a group's
        kept file had its chance when it was visited, and is left as it is."""
        groups = [(leader, list(taken)) for leader, taken in decided]
        at = {leader: n for n, (leader, _) in enumerate(groups)}
        member_of = {
            j: leader for leader, taken in groups for j, _, tier in taken if tier in DUPLICATE_TIERS
        }
        paths = {i: r.path for i, r in self.records.items()}

        def ignored(a: int, b: int) -> bool:
            return bool({(paths[a], paths[b]), (paths[b], paths[a])} & self.ignored)

        def score(pair: TurnedPair) -> float:
            # A pair that passed has its view's score (see ``rescored``).
            return self.passed[pair.key].score if pair.key in self.passed else pair.score

        for pair in sorted(self.pairs.values(), key=lambda p: (-score(p), p.key)):
            for s, c in ((pair.owner, pair.other), (pair.other, pair.owner)):
                leader = member_of.get(s)
                if leader is None or c in member_of or c == leader or rank(c) <= rank(leader):
                    continue
                own = [m for m, _, t in groups[at[c]][1] if t in DUPLICATE_TIERS] if c in at else []
                if any(ignored(leader, f) for f in (c, *own)):
                    continue
                if c not in self.decide(s, [c])[0]:
                    continue
                via = self.passed[pair.key]
                joined = _chained((member_turn(via, c), via.flipped), self._relation(leader, s))
                if joined is None:
                    continue
                theirs = {m: _chained(self._relation(c, m), joined) for m in own}
                if any(r is None for r in theirs.values()):
                    continue
                joining = {c, *own}
                taken = [e for e in groups[at[leader]][1] if e[0] not in joining or e[2] != SIMILAR]
                taken.append((c, via.score, "edited"))
                if c in at:
                    # The copies kept by ``c`` follow it (its similar files stay listed).
                    listed = {e[0] for e in taken} | {leader}
                    taken += [e for e in groups[at[c]][1] if e[0] not in listed]
                    groups[at.pop(c)] = (c, [])
                groups[at[leader]] = (leader, taken)
                self.chained[(leader, c)] = joined
                for m, r in theirs.items():
                    assert r is not None
                    self.chained[(leader, m)] = r
                member_of.update((f, leader) for f in (c, *own))
                break
        return [(leader, taken) for leader, taken in groups if taken]


def pairs_of_image(
    finder: DuplicateFinder,
    x: ImageLike,
    floor: float,
    threshold: float,
    enough: int | None,
    k: int,
    accepted: set[int],
    vector: np.ndarray | None = None,
) -> list[TurnedPair]:
    """Indexed files that duplicate image ``x`` turned (every quarter-turn of it) or
    tilted, leaving out ``accepted`` ids; ``x`` is the pairs' owner, id -1. Each view
    meets its nearest stored images (``VIEW_NEIGHBOURS``, at most ``k``); with ``x``'s
    own descriptor (``vector``), only the files that its view scores above ``x`` itself
    are checked, as in :class:`TurnedCandidates`. A tilt that only ``x``'s subject shows
    is straightened where its picture's thumbnail meets a stored one
    (:func:`_loose_tilt_views`)."""
    from ghostmatch.model.embedder import prepare

    index = finder.vectors.index
    if index is None or index.ntotal == 0:
        return []
    embedder = finder.embedder
    # The score background itself: the finder's own lookup reads the model card each time.
    norm = embedder.score_norm if finder.normalised_scores else None

    def offsets_of(vectors: np.ndarray) -> np.ndarray | None:
        return None if norm is None else norm.offsets(vectors)

    image = _as_image(x, embedder.card.input_size)
    views = views_of(-1, image, QUARTER_TURNS)
    # Met by their thumbnails: checked even where the views' nearest images miss them.
    met: set[int] = set()
    if not any(v.tilt is not None for v in views):
        loose, met = _loose_tilt_views(finder, image, accepted)
        views += loose
    # x itself, and straightened (once) when it is tilted.
    bases: dict[Tilt | None, Image.Image] = {None: image}
    tilts = {v.tilt for v in views if v.tilt is not None}
    bases.update((tilt, straighten(image, tilt)) for tilt in tilts)
    view_vectors = embedder.embed_arrays(
        [prepare(turn_image(bases[v.tilt], v.turn), embedder.card) for v in views], threads=1
    )
    # A turned copy is its view's nearest stored image; a few more only guard against ties.
    _, found = index.search(view_vectors, min(k, VIEW_NEIGHBOURS, index.ntotal))
    candidates = sorted(({int(i) for i in found.ravel() if i >= 0} | met) - accepted)
    ids, vectors = finder.catalog.vectors(candidates)
    offsets = offsets_of(vectors) if len(ids) else None
    pairs = view_pairs(
        views, view_vectors, ids, vectors, floor, offsets, offsets_of, None, len(ids)
    )
    if vector is not None and pairs:
        rows = np.searchsorted(ids, [p.other for p in pairs])
        upright = vectors[rows].astype(np.float64) @ vector.astype(np.float64)
        own = offsets_of(vector[None, :])
        if offsets is not None and own is not None:
            upright -= offsets[rows] + float(own[0])
        pairs = [p for p, u in zip(pairs, upright.tolist(), strict=True) if p.score > u]
    if enough is None:
        return [p for p in pairs if p.score >= threshold]
    if met:
        # A tilt read from a subject's edges is found on pictures mostly of the fill's
        # colour, whose flat areas and subject's outline pass the geometric check against
        # another such studio shot laid out alike: its views must reach the threshold too.
        pairs = [p for p in pairs if p.tilt is None or p.score >= threshold]
    paths = {r.id: r.path for r in finder.catalog.get([p.other for p in pairs])}
    cached = image_loader(paths, embedder.card.input_size)

    def view_of(view: View) -> Image.Image | None:
        # Stored files are only ever seen as they are.
        return cached(view.owner) if view.owner != -1 else turn_image(bases[view.tilt], view.turn)

    # The descriptor tolerates a mirror, the thumbnails do not: they tell the turn and
    # mirror that line the view up with the file, for a check on one map a side.
    lined_up = []
    for p in pairs:
        other = cached(p.other)
        if other is not None:
            turn, flipped = _best_transform(bases[p.tilt], other)
            lined_up.append(replace(p, turn=turn, flipped=flipped))
    captures = capture_cache(view_of)
    # As the duplicate search decides (``TurnedCandidates.decide``): from the threshold up,
    # a view is first aligned unmoved; the rest need the geometric check.
    unmoved = [
        p for p in lined_up if p.score >= threshold and same_capture(captures, p, unmoved=True)
    ]
    settled = {p.key for p in unmoved}
    moved = [p for p in lined_up if p.key not in settled]
    checked = check_screened(embedder, view_of, moved, {})
    return unmoved + [
        p for p in checked if (p.inliers or 0) >= enough and same_capture(captures, p)
    ]


def _loose_tilt_views(
    finder: DuplicateFinder, image: Image.Image, accepted: set[int]
) -> tuple[list[View], set[int]]:
    """The views of a new ``image`` (id -1) whose tilt shows only in its subject's edges
    (:func:`find_tilt` with ``sides_shown`` false, often wrong), and the stored images
    they are for: as the duplicate search does (:func:`tilt_partners`), its picture is
    straightened only at the quarter-turns where its thumbnail meets a stored image's
    (the catalog's, made while indexing), other than the ``accepted`` ids."""
    tilt = find_tilt(image, sides_shown=False)
    if tilt is None:
        return [], set()
    stored = {
        i: s.thumbnail
        for i, s in finder.catalog.turn_screens().items()
        if i not in accepted and len(s.thumbnail) == THUMB_SIDE * THUMB_SIDE
    }
    if not stored:
        return [], set()
    ids = list(stored)
    # The image's own canvas is among the thumbnails searched, as a tilted indexed image's
    # is in the duplicate search, so that the same neighbours are kept.
    thumbs = np.stack(
        [unit_thumbnail(np.frombuffer(stored[i], np.uint8)) for i in ids] + [thumbnail(image)]
    )
    picture = {len(ids): unit_thumbnail(picture_thumbnail(image, tilt))}
    partners = tilt_partners(thumbs, picture)
    turns = sorted({turn for _, _, turn, _, _ in partners})
    return [View(-1, t, tilt) for t in turns], {ids[other] for _, other, _, _, _ in partners}


def _best_transform(image: Image.Image, other: Image.Image) -> tuple[int, bool]:
    """The clockwise quarter-turn, and whether a mirror follows it, under which the
    thumbnail of ``image`` correlates best with that of ``other``."""
    mine, theirs = thumbnail(image), thumbnail(other)
    scores = [(float(v[0] @ theirs), t, f) for t, f, v in _dihedral(mine[None])]
    _, turn, flipped = max(scores)
    return turn, flipped


def quarter_turns_of(x: ImageLike, side: int) -> list[Image.Image]:
    """``x`` (a path, PIL image or array) turned clockwise by 90, 180 and 270 degrees, for
    a search that tries every way up (``QUARTER_TURNS``' order)."""
    image = _as_image(x, side)
    return [turn_image(image, t) for t in QUARTER_TURNS]


def _as_image(x: ImageLike, side: int) -> Image.Image:
    """``x`` (a path, PIL image or array) as an RGB image."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        return image_from_array(x)
    try:
        return load_image(x, side).image
    except ImageRejected as err:
        raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err
