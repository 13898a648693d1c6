"""Second-stage check of candidate duplicate pairs: do local features agree on one geometry?

A global descriptor cannot tell a copy from another photo of the same object. Copies
(re-encoded, resized, cropped, flipped, slightly rotated, with borders or text) are one
affine map away from the original, so their stride-16 GhostNet features match mutually
*and* those matches agree on a single affine transform; another shot of the scene gives
matches that no one transform explains. The transform also tells the tier: identity means
a ``near`` copy, anything else (crop, flip, border, rotation) an ``edited`` one.

Stride-16 features are not scale invariant: a crop to 60% of the side shows everything 1.7x
larger than its original. Each image therefore also has a map at ``ZOOM`` times the input
size, and a pair is tried at equal scales and with either image zoomed
(:func:`verify_scales`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ghostmatch.model.exports import ExportedModel, export_path, local_maps_tag, onnx_available

if TYPE_CHECKING:
    from ghostmatch.model.descriptor import Descriptor

RANSAC_ITERATIONS = 256
# Inlier tolerance in feature-grid cells, and the cosine below which a local match is noise.
TOLERANCE_CELLS = 1.5
MIN_LOCAL_SIMILARITY = 0.5
# Lowe's ratio test on feature distances: a match counts only when its distance is below
# this fraction of the distance to the second-nearest feature of the other image. Cells of
# a plain background (sky, a white studio sweep) match many cells about equally well, and
# would otherwise line up under the identity map between any two photos framed alike.
MATCH_RATIO = 0.9
SEED = 0
# Copies scale by at most this much either way and keep their handedness (mirrors are
# matched on the mirrored image), so wilder transforms are chance alignments.
MAX_SCALE = 4.0
MAX_ANISOTROPY = 3.0
# The second scale: a 60-80% crop's content is 1.25-1.7x larger than in its original.
ZOOM = 1.6


def plausible(affines: np.ndarray) -> np.ndarray:
    """Which (..., 2, 3) affines could come from cropping, resizing, padding or a small turn
    (bounded scale and aspect change, no mirror: mirrors are matched on the mirrored image)."""
    a, b = affines[..., 0, 0], affines[..., 0, 1]
    c, d = affines[..., 1, 0], affines[..., 1, 1]
    # Singular values of a 2 x 2 matrix in closed form: s1 * s2 = |det| and
    # s1^2 + s2^2 = the squared Frobenius norm.
    det = a * d - b * c
    frobenius = a * a + b * b + c * c + d * d
    root = np.sqrt(np.maximum(frobenius * frobenius - 4.0 * det * det, 0.0))
    big = np.sqrt((frobenius + root) / 2.0)
    small = np.sqrt(np.maximum((frobenius - root) / 2.0, 0.0))
    return (
        (det > 0) & (small >= 1 / MAX_SCALE) & (big <= MAX_SCALE) & (big <= MAX_ANISOTROPY * small)
    )


@dataclass(frozen=True)
class Verification:
    """Outcome for one pair: ``inliers`` of ``matches`` mutual matches fit ``affine``
    (2 x 3, from B's unit-square coordinates to A's), ``flipped`` if B was mirrored."""

    matches: int
    inliers: int
    affine: np.ndarray
    flipped: bool
    cells: int = 196

    @property
    def coverage(self) -> float:
        """Share of the (smaller) feature grid explained by the transform (0..1)."""
        return self.inliers / max(1, self.cells)

    def is_identity(self, tolerance: float = 0.06, min_coverage: float = 0.4) -> bool:
        """The copy is the whole original, unmirrored (re-encoded, resized, recoloured):
        an identity map that explains much of the grid. Local features are not scale
        invariant, so a mild crop can fit a near-identity map on a few matches only."""
        eye = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        close = float(np.abs(self.affine - eye).max()) <= tolerance
        return not self.flipped and close and self.coverage >= min_coverage


def local_features(model: Descriptor | ExportedModel, batch: np.ndarray) -> np.ndarray:
    """Unit local descriptors (n, h, w, c) from the stride-16 stage for a (n, 3, H, W) batch
    in [0, 1] (the model's own input). ``model`` may be the embedder's BatchNorm-folded,
    channels_last copy, on any device, or that model as an exported one (its
    ``local_maps_model``); the maps come back as float32 on the CPU. On the CPU they come from
    ONNX Runtime when it is installed (:func:`_local_session`)."""
    session = _local_session(model) if _on_cpu(model) else None
    if session is not None:
        images = np.ascontiguousarray(batch, dtype=np.float32)
        step = _maps_batch(maps_threads())
        runs = [
            session.run(None, {"images": images[k : k + step]})[0]
            for k in range(0, len(images), step)
        ]
        out = runs[0] if len(runs) == 1 else np.concatenate(runs)
        return np.ascontiguousarray(out, dtype=np.float32)
    import torch

    from ghostmatch.model.localmaps import LocalMaps

    loaded = _loaded(model)
    weight = loaded.backbone.conv_stem.weight
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(weight.device)
        if weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        out = LocalMaps(loaded)(x).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def local_maps_made_by(model: Descriptor | ExportedModel) -> str | None:
    """The tag (``local_maps_tag``) of the maps :func:`local_features` makes for ``model``
    here, so that maps kept at indexing with the same tag stand in for them, the same to
    the bit; None where torch makes them (on a GPU, or without onnxruntime)."""
    if not _on_cpu(model) or _local_session(model) is None:
        return None
    return local_maps_tag(model.card)


def _on_cpu(model: Descriptor | ExportedModel) -> bool:
    """Whether ``model`` runs on the CPU (an exported model always does)."""
    if isinstance(model, ExportedModel):
        return True
    return bool(model.backbone.conv_stem.weight.device.type == "cpu")


def _loaded(model: Descriptor | ExportedModel) -> Descriptor:
    """The torch model ``model`` is or stands for (loaded now for an exported one)."""
    return model.load() if isinstance(model, ExportedModel) else model


# The most threads a process's local maps take (``maps_threads``): set to one while a
# duplicate search runs (``ghostmatch.dupes.finder.one_thread``), None for torch's count.
_thread_limit: int | None = None


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """Within, the local maps are made on ``threads`` (``maps_threads``)."""
    global _thread_limit
    before, _thread_limit = _thread_limit, threads
    try:
        yield
    finally:
        _thread_limit = before


def maps_threads() -> int:
    """How many threads the local maps are made on at this moment: one while a
    duplicate search runs, else torch's thread count (the CPU count where torch is not
    loaded, as torch counts them here)."""
    if _thread_limit is not None:
        return _thread_limit
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return os.cpu_count() or 1


def _maps_batch(threads: int) -> int:
    """Images per ONNX Runtime run of the local maps. Larger runs are slower an image once
    their activations outgrow the cache: on one thread (a duplicate search's processes),
    a 160 px map takes 3.3 ms alone and 5.7-6.3 ms an image in runs of 32, a 256 px one
    9.8-10.6 ms alone and 16-18 ms in runs of 32; on two threads, runs of 8 do best
    (3.9 ms a 160 px map, 4.4 ms in runs of 32, 4.7 ms alone)."""
    return 1 if threads <= 1 else 8


# ONNX Runtime sessions of the local maps, by (model card, thread count): the
# maps of a duplicate search are made on one thread (``ghostmatch.dupes.finder.one_thread``).
_SESSIONS: dict[tuple[str, int], Any] = {}
# One export at a time in this process: threads of a server share the temporary file name.
_SESSIONS_LOCK = threading.Lock()


# In a forked process, the sessions made before the fork: kept, never destroyed there (a
# destructor waits for the session's thread pool, which the fork did not carry over).
_INHERITED: list[Any] = []


def _forget_sessions() -> None:
    """In a forked process: sessions made before the fork are left to the parent (their
    thread pools do not survive it), and the lock made afresh (another thread may have
    held it at the fork)."""
    global _SESSIONS_LOCK
    _INHERITED.extend(_SESSIONS.values())
    _SESSIONS.clear()
    _SESSIONS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_sessions)


def _local_session(model: Descriptor | ExportedModel) -> Any:
    """An ONNX Runtime session of :class:`LocalMaps` for ``model``, exported once per
    model card into the weights cache beside the embedder's own export; None without
    onnxruntime. Measured on one thread, it makes the maps in two thirds of the CPU time
    of torch's (the same maps to 1e-6)."""
    threads = maps_threads()
    key = (model.card.fingerprint, threads)
    if key in _SESSIONS:
        return _SESSIONS[key]
    with _SESSIONS_LOCK:
        return _SESSIONS[key] if key in _SESSIONS else _new_session(model, key)


def _new_session(model: Descriptor | ExportedModel, key: tuple[str, int]) -> Any:
    """Make and keep the session for ``key`` (None where onnxruntime is missing or the
    export cannot be written: torch makes the same maps, only slower)."""
    session = None
    if onnx_available():
        import onnxruntime as ort

        path = export_path(model.card, "local")
        try:
            if not path.exists():
                _export_local(_loaded(model), path)
            exported = True
        except OSError:  # a read-only cache
            exported = False
        if exported:
            options = ort.SessionOptions()
            options.intra_op_num_threads = key[1]
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    _SESSIONS[key] = session
    return session


def _export_local(model: Descriptor, path: Path) -> None:
    """Export :class:`LocalMaps` with dynamic batch, height and width, atomically."""
    from ghostmatch.model.embedder import export_onnx
    from ghostmatch.model.localmaps import LocalMaps

    export_onnx(
        LocalMaps(model).eval(),
        model.card,
        path,
        ["maps"],
        dynamic_axes={
            "images": {0: "batch", 2: "height", 3: "width"},
            "maps": {0: "batch", 1: "rows", 2: "columns"},
        },
    )


@functools.lru_cache(maxsize=64)
def _design(h: int, w: int) -> np.ndarray:
    """:func:`_grid` with a column of ones, the affine fit's design rows; read-only."""
    design = np.hstack([_grid(h, w), np.ones((h * w, 1))])
    design.flags.writeable = False
    return design


@functools.lru_cache(maxsize=64)
def _grid(h: int, w: int) -> np.ndarray:
    """Cell centres of an h x w map in unit coordinates, (h * w, 2) as (x, y); read-only."""
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / h], axis=1)
    grid.flags.writeable = False
    return grid


def mutual_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of features that are each other's nearest neighbour (and pass the
    ratio test, ``MATCH_RATIO``)."""
    sim = a @ b.T
    best_b = sim.argmax(axis=1)
    best_a = sim.argmax(axis=0)
    ia = np.arange(len(a))
    best = sim[ia, best_b]
    keep = (best_a[best_b] == ia) & (best >= MIN_LOCAL_SIMILARITY)
    if MATCH_RATIO < 1.0 and sim.shape[1] > 1:
        # The second-best similarity only of the rows still kept: most rows are not mutual
        # matches, and a row's partition does not depend on the other rows.
        rows = np.flatnonzero(keep)
        second = np.partition(sim[rows], -2, axis=1)[:, -2]
        # Squared distances of unit vectors: 2 - 2 * cosine.
        keep[rows] = (1.0 - best[rows]) < MATCH_RATIO**2 * (1.0 - second)
    return ia[keep], best_b[keep]


def _affines_from_triples(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (m, 2, 3) affines taking each triple of points src (m, 3, 2) onto dst (m, 3, 2),
    in closed form; degenerate (collinear) triples are left out."""
    p = (src[:, 1:] - src[:, :1]).transpose(0, 2, 1)  # (m, 2, 2): columns are the edges
    q = (dst[:, 1:] - dst[:, :1]).transpose(0, 2, 1)
    det = p[:, 0, 0] * p[:, 1, 1] - p[:, 0, 1] * p[:, 1, 0]
    keep = np.abs(det) > 1e-9
    p, q, det = p[keep], q[keep], det[keep]
    # The inverse of each 2 x 2 edge matrix: its adjugate over its determinant.
    adjugate = np.empty_like(p)
    adjugate[:, 0, 0], adjugate[:, 0, 1] = p[:, 1, 1], -p[:, 0, 1]
    adjugate[:, 1, 0], adjugate[:, 1, 1] = -p[:, 1, 0], p[:, 0, 0]
    inverse = adjugate / det[:, None, None]
    linear = q @ inverse
    shift = dst[keep, 0] - np.einsum("mij,mj->mi", linear, src[keep, 0])
    return np.concatenate([linear, shift[:, :, None]], axis=2)


def fit_affine(
    src: np.ndarray, dst: np.ndarray, tolerance: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC affine src -> dst: (2 x 3 matrix, inlier mask), refined on the inliers.

    All hypotheses are solved in closed form and scored at once (one error matrix), which
    is what keeps a pair to about a millisecond.
    """
    n = len(src)
    if n < 3:
        return np.eye(2, 3), np.zeros(n, dtype=bool)
    return _fit_picked(src, dst, tolerance, _distinct(rng.integers(0, n, (RANSAC_ITERATIONS, 3))))


def _distinct(picks: np.ndarray) -> np.ndarray:
    """The drawn triples (k, 3) whose three indices differ."""
    picks = picks[(picks[:, 0] != picks[:, 1]) & (picks[:, 1] != picks[:, 2])]
    return picks[picks[:, 0] != picks[:, 2]]


@functools.lru_cache(maxsize=4096)
def _seeded_picks(after: int, n: int) -> np.ndarray:
    """The triples :func:`fit_affine` draws for ``n`` matches from a generator seeded with
    ``SEED`` that first drew the triples of ``after`` matches (none below 3), as
    :func:`_fit_one` seeds it: the draws depend on nothing else, so they are made once per
    (after, n) instead of seeding a generator for every try; read-only."""
    rng = np.random.default_rng(SEED)
    if after >= 3:  # fit_affine draws nothing for fewer than 3 matches
        rng.integers(0, after, (RANSAC_ITERATIONS, 3))
    picks = _distinct(rng.integers(0, n, (RANSAC_ITERATIONS, 3)))
    picks.flags.writeable = False
    return picks


def _fit_picked(
    src: np.ndarray,
    dst: np.ndarray,
    tolerance: float,
    picks: np.ndarray,
    design: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_affine` on triples already drawn (``picks``, three distinct indices each);
    ``design`` is src with a column of ones, where the caller has it at hand."""
    n = len(src)
    none = np.zeros(n, dtype=bool)
    if design is None:
        design = np.hstack([src, np.ones((n, 1))])
    kernels = _kernels()
    # The compiled loop takes the read-only draws of ``_seeded_picks`` (one compiled
    # signature); ``fit_affine``'s own draws are scored in numpy, to the same choice.
    if kernels is not None and picks.dtype == np.int64 and not picks.flags.writeable:
        best_row = kernels.best_triple(src, dst, picks, _squared(tolerance))
        if best_row < 0:
            return np.eye(2, 3), none
        picked = picks[best_row : best_row + 1]
        best_model = _affines_from_triples(src[picked], dst[picked])[0]
    else:
        models = _affines_from_triples(src[picks], dst[picks])
        models = models[plausible(models)]
        if len(models) == 0:
            return np.eye(2, 3), none
        # The squared offsets computed in place, with the same roundings as written out.
        offsets = np.matmul(models, design.T)  # (m, 2, n)
        offsets -= dst.T[None]
        np.square(offsets, out=offsets)
        counts = np.count_nonzero(offsets[:, 0] + offsets[:, 1] <= _squared(tolerance), axis=1)
        best_model = models[int(counts.argmax())]
    best = _lengths(design @ best_model.T - dst) <= tolerance
    if best.sum() < 3:
        return np.eye(2, 3), none
    m, *_ = np.linalg.lstsq(design[best], dst[best], rcond=None)
    affine = m.T
    if not plausible(affine):
        return best_model, best
    err = _lengths(design @ affine.T - dst)
    return affine, err <= tolerance


def _squared(tolerance: float) -> float:
    """The squared offset up to which a hypothesis counts a match as its inlier. A shade
    over ``tolerance**2``: cell centres lie on grids, so offsets of exactly the tolerance
    are common (0.9 and 1.2 cells make 1.5), and they count whichever way the sum rounds
    (numpy's matrix product and the compiled loop round differently)."""
    return tolerance**2 * (1.0 + 1e-9)


def _kernels() -> ModuleType | None:
    """``ghostmatch.dupes.gaussnewton`` once a duplicate search has loaded its compiled
    steps (``gaussnewton.warm``), else None: a query's re-ranking does not import numba
    for a few fits, and scores its hypotheses in numpy, to the same choice."""
    kernels = sys.modules.get("ghostmatch.dupes.gaussnewton")
    # None too while another thread is still importing it (a search loads the kernels on a
    # thread of their own while it looks for candidates).
    warmed = getattr(kernels, "warmed", None)
    if warmed is None or not warmed():
        return None
    return kernels


def _lengths(offsets: np.ndarray) -> np.ndarray:
    """Row lengths of (n, 2) offsets: ``np.linalg.norm(offsets, axis=1)``'s own arithmetic
    (the square root of the summed squares) without its checks."""
    return np.sqrt(np.add.reduce(offsets * offsets, axis=1))


_MIRROR = np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def verify_pair(
    fa: np.ndarray, fb: np.ndarray, fb_flipped: np.ndarray | None = None
) -> Verification:
    """Check one pair from their local feature maps (h, w, c), which may differ in size;
    ``fb_flipped`` is B's map computed on the mirrored image, to accept flipped copies."""
    best = _fit_one(fa, fb, False)
    if fb_flipped is not None:
        mirrored = _fit_one(fa, fb_flipped, True, best.matches)
        if mirrored.inliers > best.inliers:
            best = mirrored
    return best


def _fit_one(fa: np.ndarray, fb: np.ndarray, flipped: bool, after: int = 0) -> Verification:
    """One try of :func:`verify_pair`: B's map, mirrored or not, against A's. ``after`` is
    the number of matches of the unmirrored try, whose RANSAC draws come first from the
    seed; a mirrored try made on its own later draws exactly what it would have drawn
    right after it."""
    (ha, wa, c), (hb, wb, _) = fa.shape, fb.shape
    grid_a, grid_b = _grid(ha, wa), _grid(hb, wb)
    # The coarser grid's cell, in the unit coordinates both grids share.
    tolerance = TOLERANCE_CELLS / min(max(ha, wa), max(hb, wb))
    cells = min(ha * wa, hb * wb)
    ia, ib = mutual_matches(fa.reshape(-1, c), fb.reshape(-1, c))
    if len(ia) < 3:  # no triple to draw: fit_affine's own answer, without a generator
        affine, inliers = np.eye(2, 3), np.zeros(len(ia), dtype=bool)
    else:
        picks = _seeded_picks(after if after >= 3 else 0, len(ia))
        affine, inliers = _fit_picked(grid_b[ib], grid_a[ia], tolerance, picks, _design(hb, wb)[ib])
    if flipped:  # express the map from B's own (unmirrored) coordinates
        affine = affine @ _MIRROR
    return Verification(len(ia), int(inliers.sum()), affine, flipped, cells)


@dataclass(frozen=True)
class ScaledMaps:
    """One image's local feature maps: at the input size, mirrored, and ``ZOOM`` x larger."""

    base: np.ndarray
    mirrored: np.ndarray
    zoomed: np.ndarray


class Maps(Protocol):
    """What :func:`verify_scales` reads of an image's maps: ``ScaledMaps``, or a view that
    makes the zoomed map only when it is first read (``ghostmatch.dupes.finder``)."""

    @property
    def base(self) -> np.ndarray: ...

    @property
    def mirrored(self) -> np.ndarray: ...

    @property
    def zoomed(self) -> np.ndarray: ...


def verify_scales(a: Maps, b: Maps, enough: int | None = None) -> Verification:
    """Check a pair at equal scales and, unless that already finds ``enough`` inliers, with
    A zoomed (B a crop of A) and with B zoomed (A a crop of B); the best fit wins. The
    affine always maps B's unit square to A's. The zoomed maps are read only when the
    equal-scale check without mirrors falls short, so a caller can leave them unmade until
    then."""
    for fit, final in scale_steps(a, b, enough):
        if final:
            return fit
    raise AssertionError("scale_steps always ends with its final fit")


def scale_steps(a: Maps, b: Maps, enough: int | None = None) -> Iterator[tuple[Verification, bool]]:
    """:func:`verify_scales` one step at a time, each mirrored map read as late as it can
    be: yields ``(fit, False)`` for a fit without mirrors that already has ``enough``
    inliers, which a caller may accept (a copy that is not mirrored needs no mirrored map)
    or pass over, and ends with ``(verify_scales(a, b, enough), True)``. Likewise a
    zoomed fit with ``enough`` inliers: on A's zoomed map first (before B's mirrored map
    is read, once the equal scale falls short), then on B's, each only where the one
    before was passed over, and B's only with more inliers."""
    plain = _fit_one(a.base, b.base, False)
    if enough is not None and plain.inliers >= enough:
        yield plain, False
        yield _better(plain, _fit_one(a.base, b.mirrored, True, plain.matches)), True
        return
    zoomed = _fit_one(a.zoomed, b.base, False)
    if enough is not None and zoomed.inliers >= enough:
        # B a crop of A, on A's zoomed map alone: A is the kept file, whose map serves all
        # of its pairs, so B's own mirrored and zoomed maps are made only where this does
        # not settle the pair (on the full ``benchmarks.othershots`` set 291 copies passed
        # at this step, and B's mirrored maps made went from 862 to 506 with it taken
        # before the mirrored fit, every decision the same).
        yield zoomed, False
    best = _better(plain, _fit_one(a.base, b.mirrored, True, plain.matches))
    if enough is not None and best.inliers >= enough:
        yield best, True
        return
    # Roles swapped, the fit maps A's own coordinates (mirror included) to B's: inverted
    # when it is kept.
    swapped = _fit_one(b.zoomed, a.base, False)
    if enough is not None and swapped.inliers >= enough and swapped.inliers > zoomed.inliers:
        yield _inverted(swapped), False
    zoomed = _better(zoomed, _fit_one(a.zoomed, b.mirrored, True, zoomed.matches))
    swapped = _better(swapped, _fit_one(b.zoomed, a.mirrored, True, swapped.matches))
    yield _better(_better(best, zoomed), _inverted(swapped)), True


def _better(first: Verification, second: Verification) -> Verification:
    """The fit with more inliers, the first one on a tie."""
    return second if second.inliers > first.inliers else first


def _inverted(fit: Verification) -> Verification:
    """A fit of B against A as a fit of A against B (its affine inverted)."""
    affine = np.linalg.inv(np.vstack([fit.affine, [0.0, 0.0, 1.0]]))[:2]
    return Verification(fit.matches, fit.inliers, affine, fit.flipped, fit.cells)
