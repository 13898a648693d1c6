"""Duplicate search over an index: all pairs of the collection, or the duplicates of one
image, in two stages (descriptor scores, then a geometric check of local features)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ghostmatch.dupes import turns
from ghostmatch.dupes.groups import (
    DEFAULT_MIN_INLIERS,
    THRESHOLD_META,
    DuplicateGroup,
    DuplicateMember,
    check_threshold,
    default_thresholds,
    group_pairs,
    threshold_of,
    tier_of,
)
from ghostmatch.dupes.verify import ZOOM, ScaledMaps, Verification, local_features, verify_scales
from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.allpairs import pair_scores, similar_pairs
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.ingest.scan import content_hash
from ghostmatch.model.binding import ImageLike, ModelBinding
from ghostmatch.model.card import ModelCard
from ghostmatch.model.embedder import Embedder, prepare, to_batch
from ghostmatch.pathtext import path_text
from ghostmatch.search import Searcher, check_k
from ghostmatch.store.catalog import Catalog, ImageRecord
from ghostmatch.store.vectors import VectorStore


class DuplicateFinder:
    """Duplicates among the images of one index (its catalog's vectors and files, its
    FAISS index for candidates of a single image, its model for local features)."""

    def __init__(
        self, catalog: Catalog, vectors: VectorStore, model: ModelBinding, searcher: Searcher
    ) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.model = model
        self.searcher = searcher

    @property
    def card(self) -> ModelCard | None:
        return self.model.card

    @property
    def embedder(self) -> Embedder:
        return self.model.embedder

    def duplicate_threshold(self) -> float:
        """The calibrated threshold of this index, else the model's measured one, else the
        default (0.9 for plain cosines)."""
        card = self.card
        extra = card.extra if card is not None else None
        return threshold_of(self.catalog.get_meta(THRESHOLD_META), extra, self.normalised_scores)[0]

    @property
    def normalised_scores(self) -> bool:
        """Whether duplicate scores are background-normalised (the model file carries a
        score background, ``ghostmatch.model.scorenorm``) rather than plain cosines."""
        return self.card is not None and self.card.normalised_scores

    def score_offsets(self, vectors: np.ndarray) -> np.ndarray | None:
        """Each vector's background offset for duplicate scores, or None when the model has
        no score background (duplicate scores are then plain cosines)."""
        if not self.normalised_scores:
            return None
        norm = self.embedder.model.score_norm
        if norm is None:
            raise GhostmatchError(
                f"the model card of index {self.vectors.path} names a score background that its "
                "weights file lacks; restore the original weights file"
            )
        return norm.offsets(vectors)

    def find_duplicates(
        self,
        threshold: float | None = None,
        *,
        keep: str = "pixels",
        verify: bool = True,
        min_inliers: int | None = None,
        turned: bool = True,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, each with one kept file and its copies.

        Stage 1: an all-pairs search of the stored vectors (exact for Flat indexes); a pair
        scoring at least ``threshold`` is a duplicate on its descriptors alone. Stage 2
        (``verify``): a pair scoring between the verify threshold and ``threshold`` is a
        duplicate when its local features agree on one geometric transform on at least
        ``min_inliers`` points (see ``ghostmatch.dupes.verify``); the transform also sets the
        tier. Pairs marked not duplicates are ignored; grouping never chains. ``turned``:
        copies turned by a quarter-turn or tilted are found too (``ghostmatch.dupes.turns``).
        """
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        verify_default = default_thresholds(normalised)[1]
        low = min(t, self._stage2_setting("verify_threshold", verify_default))
        ids, vectors = self.catalog.vectors()
        if len(ids) < 2:
            return []
        index = self.vectors.index
        approximate = index if index is not None and index.factory != "Flat" else None
        floor = low if verify else t
        offsets = self.score_offsets(vectors)
        a, b, scores = similar_pairs(vectors, floor, ids=ids, index=approximate, offsets=offsets)
        found = {
            (min(i, j), max(i, j)): s
            for i, j, s in zip(a.tolist(), b.tolist(), scores.tolist(), strict=True)
        }
        # Byte-identical files are duplicates whatever their score: a photo much like the
        # score background can score an exact copy of itself under the threshold.
        exact = [
            (same[m], same[n])
            for same in self.catalog.shared_hashes()
            for m in range(len(same))
            for n in range(m + 1, len(same))
        ]
        exact = [pair for pair in exact if pair not in found]
        if exact:
            rows = np.searchsorted(ids, np.array(exact, dtype=np.int64))
            exact_scores = pair_scores(vectors, rows[:, 0], rows[:, 1], offsets)
            found.update(zip(exact, exact_scores.tolist(), strict=True))
        involved = sorted({i for pair in found for i in pair})
        records = {r.id: r for r in self.catalog.get(involved)}
        ignored = self.catalog.not_duplicates()
        pairs = []
        for (i, j), score in found.items():
            pa, pb = records[i].path, records[j].path
            if (pa, pb) in ignored or (pb, pa) in ignored:
                continue
            pairs.append((i, j, float(score)))

        def identical(i: int, j: int) -> bool:
            return records[i].content_hash == records[j].content_hash

        checks: dict[tuple[int, int], Verification] = {}
        if verify and pairs:
            needed = min_inliers
            if needed is None:
                needed = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
            to_check = [(i, j) for i, j, _ in pairs if not identical(i, j)]
            checks = self.verify_pairs(to_check, records, needed)
            pairs = [
                (i, j, s)
                for i, j, s in pairs
                if s >= t or identical(i, j) or checks[(i, j)].inliers >= needed
            ]
        # Quarter-turned and tilted copies, found and checked through turned views.
        turned_pairs: dict[tuple[int, int], turns.TurnedPair] = {}
        pictures: dict[int, float] = {}
        if turned:
            enough = min_inliers
            if enough is None:
                enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
            # A pair its score alone let in may still be a turned copy that only a turned
            # check lines up; one that an upright check lined up is not.
            upright = {(i, j) for i, j, _ in pairs if (i, j) not in checks or identical(i, j)}
            upright |= {key for key, c in checks.items() if c.inliers >= enough}
            turned_pairs, more, pictures = turns.pairs_of_collection(
                self, ids, vectors, offsets, floor, t, enough if verify else None, upright, ignored
            )
            records.update(more)
            pairs = [p for p in pairs if (p[0], p[1]) not in turned_pairs]
            pairs += [(i, j, p.score) for (i, j), p in turned_pairs.items()]
        members = {i: _member(r, 1.0, "keep") for i, r in records.items()}
        groups = []
        for leader, taken in group_pairs(turns.by_picture(members, pictures), pairs, keep):
            kept = records[leader]
            group = []
            for j, s in taken:
                check = checks.get((leader, j)) or checks.get((j, leader))
                ceiling = 1.0
                if offsets is not None:  # an identical copy scores 1 less both offsets
                    rows = np.searchsorted(ids, [leader, j])
                    ceiling -= float(offsets[rows[0]] + offsets[rows[1]])
                tier = tier_of(kept, records[j], s, t, check, ceiling)
                pair = turned_pairs.get((min(leader, j), max(leader, j)))
                tier = "edited" if pair is not None else tier
                group.append(_member(records[j], s, tier, turns.member_turn(pair, j)))
            groups.append(DuplicateGroup(keep=members[leader], members=group))
        groups.sort(key=lambda g: (-len(g.members), -g.members[0].score))
        return groups

    def _stage2_setting(self, key: str, default: float) -> float:
        """A stage-2 setting: calibrated in this index, else measured for the model."""
        stored = self.catalog.get_meta(THRESHOLD_META)
        if isinstance(stored, dict) and key in stored:
            return float(stored[key])
        card = self.card
        if card is not None and key in card.extra:
            return float(card.extra[key])
        return default

    def verify_pairs(
        self,
        pairs: Sequence[tuple[int, int]],
        records: dict[int, ImageRecord],
        enough: int | None = None,
    ) -> dict[tuple[int, int], Verification]:
        """Local-feature verification of each pair (``ghostmatch.dupes.verify.verify_scales``).
        A pair whose equal-scale check already has ``enough`` inliers skips the zoomed checks.

        Memory stays bounded however many pairs there are: at most ``MAP_CACHE_IMAGES``
        images' maps are held (fp16: about 0.2 MB each at 224 px, 0.1 MB at 160 px), least
        recently used dropped first. Pairs
        are taken in breadth-first order of the pair graph (:func:`_locality_order`), so
        the two images of a pair are seldom far apart and most images are decoded once.
        """
        cache = _MapCache(self.embedder, records)
        empty = Verification(0, 0, np.eye(2, 3), False)
        results: dict[tuple[int, int], Verification] = {}
        ordered = _locality_order(pairs)
        block: list[tuple[int, int]] = []
        with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:

            def flush() -> None:
                cache.load({i for pair in block for i in pair}, pool)
                for i, j in block:
                    a, b = cache.get(i), cache.get(j)
                    results[(i, j)] = (
                        empty
                        if a is None or b is None
                        else verify_scales(_as_float(a), _as_float(b), enough)
                    )
                block.clear()

            new: set[int] = set()
            for pair in ordered:
                new.update(i for i in pair if i not in cache)
                block.append(pair)
                # A block needs its images' maps at once: few enough new ones to embed as
                # one batch, and few enough in all to fit the cache.
                if len(new) >= MAP_BATCH or len(block) >= MAP_CACHE_IMAGES // 4:
                    flush()
                    new.clear()
            if block:
                flush()
        return results

    def duplicates_of(
        self, x: ImageLike, threshold: float | None = None, k: int = 100, *, turned: bool = True
    ) -> list[DuplicateMember]:
        """Indexed files that duplicate ``x`` (a new image or an indexed path), best first.

        One k-NN search of the index (at most ``k`` candidates), no scan of the collection;
        indexed files with the same bytes as ``x`` always count, as ``exact``. The tiers of
        the others come from the geometric check of ``x`` against each. ``turned``: files
        that are ``x`` turned by a quarter-turn, or ``x`` tilted, count too, ``edited``.
        """
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        k = check_k(k)
        if self.card is None:
            return []
        vector, own_id = self.searcher.query_vector(x)
        index = self.vectors.index
        if index is None:
            return []
        digest = None
        if isinstance(x, str | os.PathLike):
            try:
                digest = content_hash(Path(x))
            except OSError:
                digest = None
        # Byte-identical indexed files are duplicates whatever their score (see
        # find_duplicates), so they are looked up by content hash, not left to the search.
        same = self.catalog.find_by_hash([digest]).get(digest, []) if digest else []
        exact = {r.id for r in same if r.id != own_id}
        _, found = index.search(vector[None, :], min(k, index.ntotal) + 1)
        near = [int(i) for i in found[0] if i >= 0 and i != own_id and i not in exact]
        ids, vectors = self.catalog.vectors(sorted(exact) + near)
        # Rescored from the stored vectors, the way find_duplicates scores a pair.
        rows = np.vstack([vector[None, :], vectors]) if len(ids) else vector[None, :]
        offsets = self.score_offsets(rows)
        scores = pair_scores(
            rows, np.zeros(len(ids), np.int64), np.arange(1, len(ids) + 1), offsets
        )
        hits = sorted(
            (
                (int(i), float(s))
                for i, s in zip(ids, scores, strict=True)
                if s >= t or int(i) in exact
            ),
            key=lambda hit: (-hit[1], hit[0]),
        )
        records = {r.id: r for r in self.catalog.get([i for i, _ in hits])}
        # Tiers from the same geometric check as find_duplicates: a score alone cannot
        # tell a flip or a mild crop from a recoloured copy.
        checks = self._check_against(x, {i: r for i, r in records.items() if i not in exact})
        # Files that are x turned or tilted, found and checked through x's turned views
        # (also those that the score alone let in but an upright check did not line up).
        turned_pairs: dict[int, turns.TurnedPair] = {}
        if turned:
            verify_default = default_thresholds(normalised)[1]
            low = min(t, self._stage2_setting("verify_threshold", verify_default))
            enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
            taken = exact | {i for i, c in checks.items() if c.inliers >= enough}
            by_turn = turns.pairs_of_image(self, x, low, t, enough, k, taken | {own_id or -1})
            turned_pairs = {p.other: p for p in by_turn}
            hits = [h for h in hits if h[0] not in turned_pairs] + [
                (p.other, p.score) for p in by_turn
            ]
            hits.sort(key=lambda hit: (-hit[1], hit[0]))
            records.update((r.id, r) for r in self.catalog.get(list(turned_pairs)))
        result = []
        for i, s in hits:
            record = records.get(i)
            if record is None:
                continue
            tier = "exact" if i in exact else tier_of(None, record, s, t, checks.get(i))
            pair = turned_pairs.get(i)
            tier = "edited" if pair is not None else tier
            result.append(_member(record, s, tier, turns.member_turn(pair, i)))
        return result

    def _check_against(
        self, x: ImageLike, records: dict[int, ImageRecord]
    ) -> dict[int, Verification]:
        """The geometric check of ``x`` (the copy) against each indexed image in
        ``records`` (the original), as ``verify_pairs`` checks an indexed pair."""
        if not records:
            return {}
        cache = _MapCache(self.embedder, records)
        if isinstance(x, Image.Image):
            image = to_rgb(x)
        elif isinstance(x, np.ndarray):
            image = image_from_array(x)
        else:
            try:
                image = load_image(x, cache.zoomed_card.input_size).image
            except ImageRejected as err:
                raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err
        model = self.embedder.local_model
        pixels = [prepare(image, cache.card), prepare(ImageOps.mirror(image), cache.card)]
        base = local_features(model, to_batch(pixels)).astype(np.float16)
        zoomed = local_features(model, to_batch([prepare(image, cache.zoomed_card)]))
        mine = _as_float(ScaledMaps(base[0], base[1], zoomed[0].astype(np.float16)))
        enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
        with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:
            cache.load(set(records), pool)
        checks = {}
        for i in records:
            maps = cache.get(i)
            if maps is not None:
                checks[i] = verify_scales(_as_float(maps), mine, enough)
        return checks

    def mark_not_duplicate(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        """Record that two files are not duplicates; later searches ignore the pair."""
        pa, pb = Path(os.path.abspath(a)), Path(os.path.abspath(b))
        if pa == pb:
            raise GhostmatchError("a pair of non-duplicates needs two different files")
        self.catalog.add_not_duplicate(pa, pb)


def _member(record: ImageRecord, score: float, tier: str, turn: int = 0) -> DuplicateMember:
    return DuplicateMember(
        path=record.path,
        score=score,
        tier=tier,
        width=record.width,
        height=record.height,
        bytes=record.size,
        mtime_ns=record.mtime_ns,
        content_hash=record.content_hash,
        turn=turn,
    )


# Images whose local maps verify_pairs embeds together, and the most it holds at once.
MAP_BATCH = 32
MAP_CACHE_IMAGES = 4096


def _locality_order(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs, each once, in an order that keeps the images they share close together:
    images numbered breadth-first over the pair graph (lowest degree first in each
    component, as in Cuthill-McKee), pairs sorted by the later of their two numbers."""
    neighbours: dict[int, set[int]] = {}
    for i, j in pairs:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    position: dict[int, int] = {}
    for root in sorted(neighbours, key=lambda i: (len(neighbours[i]), i)):
        if root in position:
            continue
        position[root] = len(position)
        queue = [root]
        while queue:
            frontier = []
            for i in queue:
                for j in sorted(
                    neighbours[i] - position.keys(), key=lambda j: (len(neighbours[j]), j)
                ):
                    position[j] = len(position)
                    frontier.append(j)
            queue = frontier
    unique = {(i, j) for i, j in pairs}
    return sorted(
        unique,
        key=lambda p: (max(position[p[0]], position[p[1]]), min(position[p[0]], position[p[1]])),
    )


def _as_float(maps: ScaledMaps) -> ScaledMaps:
    return ScaledMaps(*(m.astype(np.float32) for m in (maps.base, maps.mirrored, maps.zoomed)))


class _MapCache:
    """Local feature maps (fp16 ``ScaledMaps``) of recently used images, LRU-bounded."""

    def __init__(self, embedder: Embedder, records: dict[int, ImageRecord]) -> None:
        self.embedder = embedder
        self.records = records
        card = embedder.card
        self.card = card
        self.zoomed_card = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)
        # None marks an image that could not be decoded, so it is not tried again.
        self.maps: OrderedDict[int, ScaledMaps | None] = OrderedDict()

    def __contains__(self, i: int) -> bool:
        return i in self.maps

    def get(self, i: int) -> ScaledMaps | None:
        self.maps.move_to_end(i)
        return self.maps[i]

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        try:
            image = load_image(self.records[i].path, self.zoomed_card.input_size).image
        except ImageRejected:
            return None
        return (
            prepare(image, self.card),
            prepare(ImageOps.mirror(image), self.card),
            prepare(image, self.zoomed_card),
        )

    def load(self, ids: set[int], pool: ThreadPoolExecutor) -> None:
        """Make sure every image in ``ids`` has its maps (or a failure mark) cached."""
        for i in ids & self.maps.keys():
            self.maps.move_to_end(i)
        missing = sorted(ids - self.maps.keys())
        for start in range(0, len(missing), MAP_BATCH):
            chunk = missing[start : start + MAP_BATCH]
            decoded = list(pool.map(self._decode, chunk))
            ok = [(i, d) for i, d in zip(chunk, decoded, strict=True) if d is not None]
            self.maps.update((i, None) for i, d in zip(chunk, decoded, strict=True) if d is None)
            if ok:
                model, n = self.embedder.local_model, len(ok)
                base = local_features(
                    model, to_batch([d[0] for _, d in ok] + [d[1] for _, d in ok])
                ).astype(np.float16)
                zoomed = local_features(model, to_batch([d[2] for _, d in ok]))
                zoomed = zoomed.astype(np.float16)
                for k, (i, _) in enumerate(ok):
                    self.maps[i] = ScaledMaps(base[k], base[n + k], zoomed[k])
        while len(self.maps) > max(MAP_CACHE_IMAGES, len(ids)):
            self.maps.popitem(last=False)
