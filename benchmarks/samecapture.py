"""Same capture or another shot? Dense agreement of a reported pair over its aligned overlap.

An edit of one capture agrees with its source almost everywhere once the two are aligned,
up to one global brightness change and a local overlay (a text bar, a border); another
shot of the scene disagrees in many places (parallax, moved things, light, sensor noise).
For every (kept, member) pair that the shipped finder reported on the other-shots set
(``benchmarks.othershots``), the geometric stage's affine (``ghostmatch.dupes.verify``) starts a
Lucas-Kanade refinement of one affine map on the two greyscale images, weighted robustly
(Tukey) so that an overlay does not pull it, with a gain and offset for the brightness;
then the share of the overlap where the two agree is measured at several tolerances. A
rule (feature and cut) is chosen on the tuning half and reported on the held-out half,
beside the shipped finder. The analysis that chose the rule; the finder applies it through
``ghostmatch.dupes.samecapture``.

``python -m benchmarks.samecapture --work DIR``, DIR as given to ``benchmarks.othershots``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from benchmarks import othershots
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import benchmark_options
from ghostmatch.dupes.groups import DuplicateGroup
from ghostmatch.dupes.verify import ZOOM, ScaledMaps, local_features, verify_scales
from ghostmatch.eval.copies import read_truth
from ghostmatch.ingest.images import load_image
from ghostmatch.library import Library
from ghostmatch.model.embedder import prepare, to_batch

# Coarse to fine: (long side in pixels, blur sigma in pixels, Gauss-Newton steps).
LEVELS = ((48, 1.0, 20), (96, 1.0, 10), (160, 1.0, 5))
# Normalised residuals (|difference| / the kept image's contrast) counted as agreement.
TOLERANCES = (0.05, 0.1, 0.15, 0.2, 0.3)
PATCHES = 8
TUKEY = 4.685
PRECISION = 0.99


@dataclass(frozen=True)
class Agreement:
    """A pair after alignment: ``overlap`` is the share of the kept image that the member
    covers; ``agree[t]`` the share of the overlap whose normalised residual is at most
    ``t``; ``patches[t]`` the share of overlap patches (an 8 x 8 grid) whose median is;
    ``median`` the median normalised residual; ``inliers`` the geometric stage's."""

    overlap: float
    agree: dict[float, float]
    patches: dict[float, float]
    median: float
    inliers: int
    # The same two shares with a colour model (a 3 x 4 affine map of RGB) in place of the
    # grey gain and offset: a hue or saturation change is linear in RGB, not in grey.
    colour_agree: dict[float, float] = field(default_factory=dict)
    colour_patches: dict[float, float] = field(default_factory=dict)


def grey(image: Image.Image, side: int, sigma: float) -> np.ndarray:
    w, h = image.size
    scale = side / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    small = image.convert("L").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return ndimage.gaussian_filter(np.asarray(small, np.float64) / 255.0, sigma)


def _unit_grid(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / h, np.ones(h * w)], axis=1)


def _sample(image: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` at unit coordinates (n, 2): values, and which points fall inside it."""
    h, w = image.shape
    x, y = units[:, 0] * w - 0.5, units[:, 1] * h - 0.5
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return ndimage.map_coordinates(image, [y, x], order=1, mode="nearest"), inside


def _photometric(t: np.ndarray, i: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Gain and offset taking ``i`` to ``t`` by weighted least squares."""
    sw = weight.sum()
    if sw <= 0:
        return 1.0, 0.0
    mt, mi = (weight * t).sum() / sw, (weight * i).sum() / sw
    var = (weight * (i - mi) ** 2).sum() / sw
    gain = ((weight * (i - mi) * (t - mt)).sum() / sw) / var if var > 1e-9 else 0.0
    return gain, mt - gain * mi


def _robust_fit(
    t: np.ndarray, i: np.ndarray, inside: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Gain and offset taking ``i`` to ``t`` over ``inside``, refitted with Tukey weights
    so that an overlay (a caption, a logo) does not shift them: (gain, residuals, weights)."""
    weight = inside.astype(np.float64)
    if not inside.any():  # the member does not cover the kept image at all
        return 1.0, t - i, weight
    for _ in range(3):
        gain, offset = _photometric(t, i, weight)
        r = t - (gain * i + offset)
        scale = max(1.4826 * float(np.median(np.abs(r[inside]))), 1e-3)
        u = r / (TUKEY * scale)
        weight = inside * np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
    gain, offset = _photometric(t, i, weight)
    return gain, t - (gain * i + offset), weight


def align(
    kept: Image.Image, member: Image.Image, warp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Refine ``warp`` (2 x 3, kept's unit coordinates to member's) by robust Gauss-Newton
    from coarse to fine; return it with the finest level's residuals, inside mask and the
    kept image there."""
    p = warp.astype(np.float64).copy()
    for side, sigma, steps in LEVELS:
        t_img, i_img = grey(kept, side, sigma), grey(member, side, sigma)
        gy, gx = np.gradient(i_img)
        h, w = i_img.shape
        design = _unit_grid(*t_img.shape)
        t = t_img.ravel()
        for _ in range(steps):
            units = design @ p.T
            iw, inside = _sample(i_img, units)
            if inside.sum() < 16:
                break
            gain, r, weight = _robust_fit(t, iw, inside)
            ix = _sample(gx, units)[0] * w * gain
            iy = _sample(gy, units)[0] * h * gain
            jac = np.concatenate([ix[:, None] * design, iy[:, None] * design], axis=1)
            jw = jac * weight[:, None]
            hessian = jw.T @ jac + 1e-6 * np.eye(6)
            step = np.linalg.solve(hessian, jw.T @ r)
            p += step.reshape(2, 3)
            if np.abs(step).max() < 1e-5:
                break
    iw, inside = _sample(i_img, design @ p.T)
    _, r, _ = _robust_fit(t, iw, inside)
    return p, r.reshape(t_img.shape), inside.reshape(t_img.shape), t_img


def _rgb(image: Image.Image, side: int, sigma: float) -> np.ndarray:
    w, h = image.size
    scale = side / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.asarray(small, np.float64) / 255.0
    return np.stack([ndimage.gaussian_filter(pixels[..., c], sigma) for c in range(3)], -1)


def colour_residuals(
    kept: Image.Image, member: Image.Image, warp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised colour residuals (h, w) at the finest level under ``warp`` after a robust
    3 x 4 affine colour fit from the member to the kept image, and the inside mask."""
    side, sigma, _ = LEVELS[-1]
    target, source = _rgb(kept, side, sigma), _rgb(member, side, sigma)
    h, w = target.shape[:2]
    units = _unit_grid(h, w) @ warp.T
    warped = np.stack([_sample(source[..., c], units)[0] for c in range(3)], -1)
    inside = _sample(source[..., 0], units)[1]
    t = target.reshape(-1, 3)
    design = np.hstack([warped, np.ones((len(warped), 1))])
    weight = inside.astype(np.float64)
    for _ in range(4):
        root = np.sqrt(weight)[:, None]
        colour, *_ = np.linalg.lstsq(design * root, t * root, rcond=None)
        r = np.linalg.norm(t - design @ colour, axis=1)
        scale = max(1.4826 * float(np.median(r[inside])), 1e-3) if inside.any() else 1.0
        u = r / (TUKEY * scale)
        weight = inside * np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
    spread = t[inside] - t[inside].mean(axis=0) if inside.any() else np.zeros((1, 3))
    contrast = max(float(np.sqrt((spread**2).sum(axis=1).mean())), 0.02)
    return (r / contrast).reshape(h, w), inside.reshape(h, w)


def _shares(e: np.ndarray, inside: np.ndarray) -> tuple[dict[float, float], dict[float, float]]:
    """(share of overlap pixels, share of overlap patches by their median) within each
    tolerance."""
    h, w = e.shape
    medians = []
    for rows in np.array_split(np.arange(h), PATCHES):
        for cols in np.array_split(np.arange(w), PATCHES):
            cell = np.ix_(rows, cols)
            if inside[cell].mean() >= 0.5:
                medians.append(float(np.median(e[cell][inside[cell]])))
    patch = np.array(medians) if medians else np.array([9.9])
    return (
        {tol: float((e[inside] <= tol).mean()) for tol in TOLERANCES},
        {tol: float((patch <= tol).mean()) for tol in TOLERANCES},
    )


def agreement(kept: Image.Image, member: Image.Image, warp: np.ndarray, inliers: int) -> Agreement:
    refined, r, inside, t = align(kept, member, warp)
    if inside.sum() < 16:
        none = dict.fromkeys(TOLERANCES, 0.0)
        return Agreement(0.0, none, none, 9.9, inliers, none, none)
    contrast = max(float(t[inside].std()), 0.02)
    e = np.abs(r) / contrast
    agree, patches = _shares(e, inside)
    colour_agree, colour_patches = _shares(*colour_residuals(kept, member, refined))
    return Agreement(
        overlap=float(inside.mean()),
        agree=agree,
        patches=patches,
        median=float(np.median(e[inside])),
        inliers=inliers,
        colour_agree=colour_agree,
        colour_patches=colour_patches,
    )


def _maps(lib: Library, paths: Sequence[Path]) -> dict[Path, ScaledMaps]:
    """Each image's local feature maps, as the finder computes them."""
    card = lib.embedder.card
    zoomed_card = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)
    model = lib.embedder.local_model
    out = {}
    for start in range(0, len(paths), 32):
        chunk = paths[start : start + 32]
        images = [load_image(p, zoomed_card.input_size).image for p in chunk]
        base = local_features(
            model,
            to_batch(
                [prepare(i, card) for i in images]
                + [prepare(ImageOps.mirror(i), card) for i in images]
            ),
        )
        zoomed = local_features(model, to_batch([prepare(i, zoomed_card) for i in images]))
        for k, path in enumerate(chunk):
            out[path] = ScaledMaps(base[k], base[len(chunk) + k], zoomed[k])
    return out


def measure_pairs(
    lib: Library, pairs: Sequence[tuple[Path, Path]]
) -> dict[tuple[str, str], Agreement]:
    """The agreement of each (kept, member) pair."""
    paths = sorted({p for pair in pairs for p in pair})
    maps = _maps(lib, paths)
    images = {p: load_image(p, 320).image for p in paths}
    out = {}
    for kept, member in pairs:
        check = verify_scales(maps[kept], maps[member])
        # The check maps the member's unit square to the kept one's; alignment needs the
        # other way round.
        warp = np.linalg.inv(np.vstack([check.affine, [0.0, 0.0, 1.0]]))[:2]
        out[(str(kept), str(member))] = agreement(images[kept], images[member], warp, check.inliers)
    return out


def features(a: Agreement) -> dict[str, float]:
    named = {f"agree@{t}": v for t, v in a.agree.items()}
    named |= {f"patches@{t}": v for t, v in a.patches.items()}
    named["-median"] = -a.median
    named |= {f"rgb agree@{t}": v for t, v in a.colour_agree.items()}
    named |= {f"rgb patches@{t}": v for t, v in a.colour_patches.items()}
    # Grey copies agree in grey, recoloured ones in colour: either will do.
    named |= {f"either patches@{t}": max(v, a.colour_patches[t]) for t, v in a.patches.items()}
    return named


def filtered(
    groups: Sequence[DuplicateGroup],
    scores: dict[tuple[str, str], dict[str, float]],
    name: str,
    cut: float,
) -> list[DuplicateGroup]:
    """The groups without the members whose pair with the kept file scores under ``cut``
    on feature ``name`` (exact copies always stay)."""
    out = []
    for g in groups:
        members = [
            m
            for m in g.members
            if m.tier == "exact" or scores[(str(g.keep.path), str(m.path))][name] >= cut
        ]
        if members:
            out.append(DuplicateGroup(g.keep, members))
    return out


def choose(
    shots: othershots.OtherShotSet,
    groups: Sequence[DuplicateGroup],
    scores: dict[tuple[str, str], dict[str, float]],
) -> tuple[str, float]:
    """The feature and cut with the best tuning-half recall at precision >= PRECISION.
    Of the cuts that reach it, the middle one (by rank among the pairs' values), so the
    rule keeps a margin on both sides; between features with the same recall, the one
    with the widest such range."""
    best: tuple[float, int, str, float] | None = None
    for name in next(iter(scores.values())):
        values = np.array([s[name] for s in scores.values()])
        cuts = np.unique(np.quantile(values, np.linspace(0, 0.95, 48)))
        results = []
        for cut in cuts:
            got = othershots.measure(shots, filtered(groups, scores, name, float(cut)), "tuning")
            results.append((got.captures.precision >= PRECISION, got.groups.recall))
        recalls = [recall for ok, recall in results if ok]
        if not recalls:
            continue
        top = max(recalls)
        good = [n for n, (ok, recall) in enumerate(results) if ok and recall >= top - 1e-9]
        candidate = (top, len(good), name, float(cuts[good[len(good) // 2]]))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        raise RuntimeError("no cut reaches the precision on the tuning half")
    return best[2], best[3]


def run(work: Path, weights: str = "bundled") -> Report:
    report = Report("samecapture", quick=False)
    shots = othershots.load(work / "set")
    groups = othershots.read_groups(work / "groups.json")
    cache = work / "samecapture_pairs.json"
    root = shots.folder
    # Paths relative to the set, so that another build of the same set reuses the rows.
    cached: dict[str, Any] = (
        json.loads(cache.read_text()) if cache.is_file() else {"seconds": 0.0, "pairs": []}
    )
    # Rows measured before a feature was added are measured again.
    zero = dict.fromkeys(TOLERANCES, 0.0)
    current = set(features(Agreement(0.0, zero, zero, 0.0, 0, zero, zero)))
    known = {(r["kept"], r["member"]): r for r in cached["pairs"] if current <= r.keys()}
    wanted = [(g.keep.path, m.path) for g in groups for m in g.members if m.tier != "exact"]
    missing = [
        (a, b)
        for a, b in wanted
        if (str(a.relative_to(root)), str(b.relative_to(root))) not in known
    ]
    seconds = float(cached["seconds"]) if known else 0.0
    if missing:
        start = time.perf_counter()
        with Library(work / "index", weights=weights, device="cpu") as lib:
            measured = measure_pairs(lib, missing)
        for (k, m), a in measured.items():
            kept, member = str(Path(k).relative_to(root)), str(Path(m).relative_to(root))
            known[(kept, member)] = {
                "kept": kept,
                "member": member,
                **features(a),
                "overlap": a.overlap,
                "inliers": a.inliers,
            }
        seconds += time.perf_counter() - start
        cache.write_text(json.dumps({"seconds": seconds, "pairs": list(known.values())}))
    rows = [known[(str(a.relative_to(root)), str(b.relative_to(root)))] for a, b in wanted]
    scores = {(str(root / r["kept"]), str(root / r["member"])): r for r in rows}
    feature_names = [k for k in rows[0] if k not in ("kept", "member", "overlap", "inliers")]
    usable = {key: {n: row[n] for n in feature_names} for key, row in scores.items()}
    name, cut = choose(shots, groups, usable)
    rule = filtered(groups, usable, name, cut)
    for part in (*othershots.HALVES, None):
        label = part or "all"
        new, shipped = (
            othershots.measure(shots, rule, part),
            othershots.measure(shots, groups, part),
        )
        base = "shipped finder"
        rows_out = [
            ("precision", new.captures.precision, shipped.captures.precision),
            ("recall", new.groups.recall, shipped.groups.recall),
            ("other-shot pairs", new.captures.other_shots, shipped.captures.other_shots),
            (
                "captures grouped with another shot",
                new.captures.captures_grouped_share,
                shipped.captures.captures_grouped_share,
            ),
            ("unrelated pairs", new.captures.unrelated, shipped.captures.unrelated),
            ("pairs among synthetic images", new.synthetic_pairs, shipped.synthetic_pairs),
        ]
        for title, value, baseline in rows_out:
            report.add(Figure(f"{label}: {title}", float(value), "", base, float(baseline)))
        for edit, recall in new.groups.per_transform.items():
            report.add(
                Figure(
                    f"{label}: recall, {edit}", recall, "", base, shipped.groups.per_transform[edit]
                )
            )
        report.details[label] = {"rule": new.to_dict(), "shipped": shipped.to_dict()}
    report.details.update(
        {
            "feature": name,
            "cut": cut,
            "pairs": len(rows),
            "measure_seconds": seconds,
            "separation": separation(shots, groups, usable),
        }
    )
    report.notes.append(
        f"rule: keep a reported pair when {name} >= {cut:.4g} (chosen on objects 0-"
        f"{othershots.TUNING_OBJECTS - 1}: best recall at precision >= {PRECISION}); "
        f"{len(rows)} reported pairs aligned and compared in {seconds:.0f} s"
    )
    return report


def separation(
    shots: othershots.OtherShotSet,
    groups: Sequence[DuplicateGroup],
    scores: dict[tuple[str, str], dict[str, float]],
) -> dict[str, dict[str, list[float]]]:
    """Per feature, the 5/25/50/75/95th percentiles over copies and over other shots."""
    scene = {p.resolve(): s for p, s in shots.scene_of().items()}
    capture: dict[Path, int] = {
        p.resolve(): g for g, group in enumerate(read_truth(shots.truth)) for p in group
    }
    kinds: dict[str, list[dict[str, float]]] = {"copy": [], "other shot": [], "unrelated": []}
    for g in groups:
        a = g.keep.path.resolve()
        for m in g.members:
            if m.tier == "exact":
                continue
            b = m.path.resolve()
            kind = (
                "copy"
                if a in capture and capture.get(a) == capture.get(b)
                else "other shot"
                if a in scene and scene.get(b) == scene[a]
                else "unrelated"
            )
            kinds[kind].append(scores[(str(g.keep.path), str(m.path))])
    out: dict[str, dict[str, list[float]]] = {}
    for name in next(iter(scores.values())):
        out[name] = {
            kind: [
                round(float(q), 4)
                for q in np.percentile([r[name] for r in rows], [5, 25, 50, 75, 95])
            ]
            for kind, rows in kinds.items()
            if rows
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_options("samecapture", __doc__)
    parser.add_argument(
        "--work", type=Path, required=True, help="benchmarks.othershots' --work folder"
    )
    args = parser.parse_args(argv)
    report = run_and_save("samecapture", argv, args.out, lambda: run(args.work))
    print(json.dumps(report.details["separation"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
