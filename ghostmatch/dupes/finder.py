"""Duplicate search over an index: all pairs of the collection, or the duplicates of one
image, in two stages (descriptor scores, then a geometric check of local features)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, ImageOps
from threadpoolctl import threadpool_limits

from ghostmatch.dupes import parallax, regions, turns
from ghostmatch.dupes.collection import (
    Stored,
    in_memory,
    stored_offsets,
    stored_pairs,
    stored_vectors,
)
from ghostmatch.dupes.groups import (
    DEFAULT_MIN_INLIERS,
    LOOKAHEAD,
    SIMILAR,
    THRESHOLD_META,
    DuplicateGroup,
    DuplicateMember,
    check_threshold,
    components,
    default_thresholds,
    group_judged,
    keep_priority,
    threshold_of,
    tier_of,
)
from ghostmatch.dupes.samecapture import (
    DECODE_SIDE,
    THUMB_SIDE,
    Agreement,
    Capture,
    agreement,
    prepare_capture,
    unit_thumb,
)
from ghostmatch.dupes.settle import Glance, first_try, settled_tier
from ghostmatch.dupes.verify import (
    ZOOM,
    Verification,
    limited_threads,
    local_features,
    local_maps_made_by,
    scale_steps,
    verify_scales,
)
from ghostmatch.dupes.workers import can_fork, run_parts, usable_cores
from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.allpairs import pair_scores
from ghostmatch.ingest.images import (
    DecodedImage,
    ImageRejected,
    decodes_alike,
    image_from_array,
    load_image,
    same_decode,
    to_rgb,
)
from ghostmatch.ingest.scan import content_hash
from ghostmatch.model.binding import ImageLike, ModelBinding
from ghostmatch.model.card import ModelCard
from ghostmatch.model.embedder import Embedder, prepare, to_batch
from ghostmatch.pathtext import path_text
from ghostmatch.search import Searcher, check_k
from ghostmatch.store.catalog import Catalog, ImageRecord, TurnScreen
from ghostmatch.store.vectors import VectorStore

# Where a search reads the plain local maps kept by indexing: (ids, what made them) to the
# maps of those that have them (``Catalog.local_maps``).
KeptMaps = Callable[[Sequence[int], str], dict[int, np.ndarray]]


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
        norm = self.embedder.score_norm
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
        similar: bool = False,
        progress: Callable[[str, int, int | None], None] | None = None,
        turned: bool = True,
        workers: int | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, each with one kept file and its copies.

        A duplicate is derived from the same capture. Candidates: an all-pairs search of
        the stored vectors (exact for Flat indexes) down to the verify threshold, each
        file keeping its ``MAX_CANDIDATES`` best partners, and byte-identical files
        (``exact`` whatever their score). The grouping (:func:`group_judged`, never
        chaining) decides a pair only when it needs it, with :class:`PairJudge`: the
        geometric check of local features (``ghostmatch.dupes.verify``, at least
        ``min_inliers`` points on one transform, unless the score reaches ``threshold``)
        and the dense agreement of the aligned pair (``ghostmatch.dupes.samecapture``).
        A pair that matches but is not the same capture is ``similar``: listed in
        ``DuplicateGroup.similar`` when ``similar`` is true, never a member.

        Without ``verify``, a pair is a duplicate on its descriptors alone (score at least
        ``threshold``), byte-identical files always; nothing is ``similar`` then.
        ``progress(stage, done, total)`` counts the files the grouping has visited.
        ``turned`` (the default): copies turned by a quarter-turn or tilted are found too,
        through turned and straightened views (``ghostmatch.dupes.turns``), tier ``edited``
        with their turn; it costs about 1.3 times the plain search on a mostly upright
        library (README, turned copies). A turned copy whose screened partners all went
        into a group kept by another copy may join that group through one of them, after
        the full check against it (``TurnedCandidates.adopt``).

        ``workers``: the processes that decide pairs, each a part of the candidates that
        shares no file with the others (``ghostmatch.dupes.workers``); the groups are the
        same whatever their number. None (the default): the usable cores, and one process
        for a search too small to pay for starting more.
        """
        # Its model passes are small (local maps a few images at a time), which a GPU does
        # not speed up, and worker processes cannot share a CUDA context: on the CPU, unless
        # the model is loaded already (a 420-image library on an H200: 71 s on CUDA, 15.5 s
        # on the CPU in one process, 8.5 s on its 16 cores; README, Duplicates).
        with self.model.on_cpu():
            return self._find_duplicates(
                threshold,
                keep=keep,
                verify=verify,
                min_inliers=min_inliers,
                similar=similar,
                progress=progress,
                turned=turned,
                workers=workers,
            )

    def _find_duplicates(
        self,
        threshold: float | None,
        *,
        keep: str,
        verify: bool,
        min_inliers: int | None,
        similar: bool,
        progress: Callable[[str, int, int | None], None] | None,
        turned: bool,
        workers: int | None,
    ) -> list[DuplicateGroup]:
        if workers is not None and workers < 1:
            raise GhostmatchError(f"workers must be at least 1, not {workers}")
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        verify_default = default_thresholds(normalised)[1]
        low = min(t, self._stage2_setting("verify_threshold", verify_default))
        # Read a chunk at a time, not held, when the FAISS index is too large for memory.
        ids, vectors = stored_vectors(self.catalog, self.vectors.index)
        if len(ids) < 2:
            return []
        offsets = stored_offsets(vectors, self.score_offsets)
        found, crowded = self.candidate_pairs(ids, vectors, offsets, low if verify else t)
        kernels = threading.Thread(target=_warm_kernels, name="ghostmatch-kernels", daemon=True)
        if verify and found:
            # numba's import and the compiled steps' load (about 1 s) run beside the rest of
            # the search for candidates, which mostly waits in faiss and ONNX Runtime.
            kernels.start()
        # Heavily cropped copies, found through regional descriptors (only the geometric
        # check can accept a pair under the threshold, so only with it).
        cropped = self.crop_pairs(ids, vectors, offsets, found, low, t) if verify else {}
        found.update(cropped)
        involved = sorted({i for pair in found for i in pair})
        records = {r.id: r for r in self.catalog.get(involved)}
        ignored = self.catalog.not_duplicates()
        pairs = []
        for (i, j), score in found.items():
            pa, pb = records[i].path, records[j].path
            if (pa, pb) in ignored or (pb, pa) in ignored:
                continue
            pairs.append((i, j, float(score)))
        scores = {(i, j): s for i, j, s in pairs}

        def ceiling(i: int, j: int) -> float:
            """The score an identical copy would get: 1, less both offsets if normalised."""
            if offsets is None:
                return 1.0
            rows = np.searchsorted(ids, [i, j])
            return 1.0 - float(offsets[rows[0]] + offsets[rows[1]])

        needed = min_inliers
        if needed is None:
            needed = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
        judge = PairJudge(self.model, records, t, needed, crowded, self.catalog.local_maps)
        # Quarter-turned and tilted copies, found through turned views and checked on them
        # when the grouping asks; each such pair that passes is ``edited``.
        found_turned = None
        pictures: dict[int, float] = {}
        if turned:
            found_turned = turns.TurnedCandidates(
                self,
                ids,
                in_memory(vectors),
                offsets,
                low if verify else t,
                t,
                needed if verify else None,
                scores,
                ignored,
                judge,
            )
            records.update(found_turned.records)
            pictures = found_turned.pictures
            pairs = found_turned.candidates(pairs)

        def decide(leader: int, others: list[int]) -> dict[int, str | None]:
            known, rest = found_turned.decide(leader, others) if found_turned else ({}, others)
            return {**known, **(judged(leader, rest) if rest else {})}

        def judged(leader: int, others: list[int]) -> dict[int, str | None]:
            if verify:
                plain = [j for j in others if (min(leader, j), max(leader, j)) not in cropped]
                tiers = judge(leader, [(j, _pair(scores, leader, j)) for j in plain])
                if len(plain) < len(others):
                    # A crop shares fewer local features with its source, in proportion to
                    # what it keeps; the dense agreement still decides same capture, and a
                    # loose one only for an unchanged crop (``PairJudge._same``).
                    crops = [j for j in others if j not in tiers]
                    judge.min_inliers = min(needed, REGION_MIN_INLIERS)
                    judge.crops_only = True
                    try:
                        tiers.update(judge(leader, [(j, _pair(scores, leader, j)) for j in crops]))
                    finally:
                        judge.min_inliers = needed
                        judge.crops_only = False
                return tiers
            kept = records[leader]
            return {
                j: tier_of(kept, records[j], s, t, None, ceiling(leader, j))
                if s >= t or kept.content_hash == records[j].content_hash
                else None
                for j in others
                for s in [_pair(scores, leader, j)]
            }

        report = None if progress is None else lambda done, total: progress("verified", done, total)
        members = {i: _member(r, 1.0, "keep") for i, r in records.items()}

        def turn(leader: int, j: int) -> int:
            return found_turned.turn(leader, j) if found_turned else 0

        # Pairs only found turned are checked on their turned views alone.
        only_turned = (
            found_turned.pairs.keys() - found_turned.upright.keys() if found_turned else set()
        )

        if verify and crowded:
            # Crowded pairs are gated on thumbnails before their files are decoded; the
            # catalog's (made while indexing, from a decode at the model's input size)
            # spare the decodes of files in no pair that passes.
            crowd = {i for a, b, _ in pairs if a in crowded or b in crowded for i in (a, b)}
            card = self.card
            side = card.input_size if card is not None else turns.SCREEN_SIDE
            judge.use_thumbnails(self.catalog.turn_screens(sorted(crowd)), side)
        processes = self._processes(workers, len(pairs), verify)
        # Maps are made ahead on a background thread (``PairJudge.prefetch``) only where the
        # search leaves a core idle. With a process on every core the thread only contends
        # with them (the full ``benchmarks.othershots`` set on 2 cores: 19.4 s without it,
        # 20.7 s with it, medians of 6 alternating runs).
        prefetching = processes < usable_cores()

        def ahead(leader: int, others: list[int]) -> None:
            if not prefetching:
                return
            keys = [(j, (min(leader, j), max(leader, j))) for j in others]
            upright = [(j, k) for j, k in keys if k not in only_turned]
            judge.prefetch(leader, [(j, scores[k]) for j, k in upright if k not in cropped])
            # Pairs found through regional descriptors are judged with fewer inliers.
            crops = [(j, scores[k]) for j, k in upright if k in cropped]
            judge.prefetch(leader, crops, min(needed, REGION_MIN_INLIERS))

        groups = []
        ranked = turns.by_picture(members, pictures)
        rule = keep_priority(keep)

        def grouped(
            part: _Part,
            visited: Callable[[int, int], None] | None,
            known: _Tiers | None = None,
        ) -> _Grouped:
            """The groups of the files of ``part`` (candidate pairs), the turns of their
            copies, and the pairs settled from their glances meanwhile; with ``known``,
            the decisions of each kept file (``foreseen``) instead of deciding them."""
            settled = judge.settled
            if known is None:
                decided = group_judged(
                    ranked, part, decide, keep, visited, ahead if verify else None
                )
            else:

                def replayed(i: int, others: list[int]) -> dict[int, str | None]:
                    # A pair not decided ahead (none should be) is decided here.
                    ahead_of = known.get(i, {})
                    missing = [j for j in others if j not in ahead_of]
                    fresh = decide(i, missing) if missing else {}
                    return {j: ahead_of[j] if j in ahead_of else fresh.get(j) for j in others}

                decided = group_judged(ranked, part, replayed, keep)
            if found_turned is not None:
                # Turned copies passed on their thumbnails alone, at their views' scores.
                decided = found_turned.rescored(decided, lambda i: rule(ranked[i]))
                # Turned copies whose partners a copy's group took, joined to it (only
                # through pairs of candidates, so within the part).
                decided = found_turned.adopt(decided, lambda i: rule(ranked[i]))
            turned_by = {
                (leader, j): turn(leader, j)
                for leader, taken in decided
                for j, _, tier in taken
                if tier != SIMILAR
            }
            return decided, turned_by, judge.settled - settled

        def foreseen(
            candidates: dict[int, list[int]], leaders: list[int], step: Callable[[int], None]
        ) -> _Foreseen:
            """Each of ``leaders``'s decisions on all its ``candidates``, as the grouping
            asks for them while none is taken: each pair's decision is the same whenever
            it is asked, so the grouping can take the ones it asks for from these. With
            the turned pairs that passed, and the pairs settled from their glances."""
            settled = judge.settled
            for leader in leaders[:LOOKAHEAD]:
                ahead(leader, candidates[leader])
            tiers = {}
            for n, leader in enumerate(leaders):
                if n + LOOKAHEAD < len(leaders):
                    upcoming = leaders[n + LOOKAHEAD]
                    ahead(upcoming, candidates[upcoming])
                # A pair left out of a decision is one that is not alike (a turned pair that
                # failed its check): recorded as such, or the grouping here would ask again.
                asked = candidates[leader]
                tiers[leader] = dict.fromkeys(asked, None) | decide(leader, asked)
                step(1)
            passed = dict(found_turned.passed) if found_turned is not None else {}
            return tiers, passed, judge.settled - settled

        def learn(passed: dict[tuple[int, int], turns.TurnedPair]) -> None:
            if found_turned is not None:
                found_turned.passed.update(passed)

        with one_thread():
            try:
                if processes == 1:
                    decided, turned_by, _ = grouped(pairs, report)
                else:
                    decided, turned_by, settled = self._grouped_apart(
                        components(pairs),
                        processes,
                        progress,
                        lambda i: rule(ranked[i]),
                        crowded,
                        grouped,
                        foreseen,
                        learn,
                        judge.capture_ahead,
                        judge.gated_out,
                    )
                    judge.settled += settled
            finally:
                judge.close()
        for leader, taken in decided:
            copies = [
                _member(records[j], s, tier, turned_by.get((leader, j), 0))
                for j, s, tier in taken
                if tier != SIMILAR
            ]
            alike = [_member(records[j], s, tier) for j, s, tier in taken if tier == SIMILAR]
            if copies or (similar and alike):
                groups.append(DuplicateGroup(members[leader], copies, alike if similar else []))
        groups.sort(
            key=lambda g: (-len(g.members), -max(m.score for m in (*g.members, *g.similar)))
        )
        if kernels.is_alive():
            kernels.join()  # not left importing while the interpreter shuts down
        return groups

    def _processes(self, workers: int | None, pairs: int, verify: bool) -> int:
        """How many processes decide the grouping's ``pairs`` candidates: one without the
        geometric check (nothing there is worth a process) or where processes cannot be
        forked; else ``workers``, by default the usable cores once there are pairs enough
        to pay for starting them, when called on the main thread. A server searches on
        one of its threads while others run queries on the model, whose locks a fork
        could copy held: there the default is one process."""
        if not verify or not can_fork() or _cuda_initialized():
            # A CUDA context (the model already loaded on a GPU) does not survive a fork.
            return 1
        if workers is None:
            if pairs < PARALLEL_PAIRS or threading.current_thread() is not threading.main_thread():
                return 1
            return usable_cores()
        return workers

    def _grouped_apart(
        self,
        parts: list[_Part],
        processes: int,
        progress: Callable[[str, int, int | None], None] | None,
        rank: Callable[[int], Any],
        crowded: set[int] | frozenset[int],
        grouped: Callable[[_Part, Callable[[int, int], None] | None, _Tiers | None], _Grouped],
        foreseen: Callable[[dict[int, list[int]], list[int], Callable[[int], None]], _Foreseen],
        learn: Callable[[dict[tuple[int, int], turns.TurnedPair]], None],
        ahead_of: Callable[[Sequence[int], int], None],
        gated_out: Callable[[int, int], bool],
    ) -> _Grouped:
        """The grouping of ``parts`` (the candidates' connected parts) on ``processes``
        worker processes, the same as ``grouped`` on all of them in one.

        A part is grouped on one process (the parts with most pairs first, so that no
        large one is left for last). A part too large to share out so (more than its
        share of all pairs) whose files are mostly ``crowded`` (images the descriptor
        cannot tell apart make one part of nearly all, few of them copies) has its kept
        files' decisions made ahead on all processes, a slice of its files each
        (``foreseen``), and is then grouped here from them. Only there: every decision
        the grouping does not ask for (a pair of a file it took) is made for nothing,
        and among photos that is most of them (the full ``benchmarks.othershots`` set
        made one part: 6.5 times the CPU). The groups of all parts are merged in the
        keep order of their kept files, the order the grouping of all of them makes.
        ``ahead_of(files, threads)`` makes the comparison's captures of a crowd's files
        before the processes start, of those in a pair that ``gated_out(a, b)`` (a crowded
        pair whose thumbnails are known not to correlate) does not leave uncompared."""
        total_pairs = sum(len(part) for part in parts)
        tasks: list[tuple[int, list[int] | None]] = []
        candidates: dict[int, dict[int, list[int]]] = {}
        weights: list[int] = []
        for n, part in enumerate(parts):
            files = {i for a, b, _ in part for i in (a, b)}
            if len(part) * processes <= total_pairs or len(files & crowded) * 2 < len(files):
                tasks.append((n, None))
                weights.append(len(part))
                continue
            lists: dict[int, list[int]] = {}
            for a, b, _ in part:
                lists.setdefault(a, []).append(b)
                lists.setdefault(b, []).append(a)
            leaders = sorted(lists, key=rank)
            # The grouping judges each pair once, when the first of its files in the keep
            # order is visited (``group_judged``): only pairs with later files are asked.
            position = {i: m for m, i in enumerate(leaders)}
            lists = {i: [j for j in js if position[j] > position[i]] for i, js in lists.items()}
            candidates[n] = lists
            size = -(-len(leaders) // (processes * FORESEEN_SLICES))
            for first in range(0, len(leaders), size):
                chunk = leaders[first : first + size]
                tasks.append((n, chunk))
                weights.append(sum(len(lists[i]) for i in chunk))
        total = len({i for part in parts for a, b, _ in part for i in (a, b)})
        done = 0

        def visited(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress("verified", done, total)

        def work(t: int, step: Callable[[int], None]) -> _Grouped | _Foreseen:
            n, leaders = tasks[t]
            if leaders is None:
                return grouped(parts[n], lambda _done, _total: step(1), None)
            return foreseen(candidates[n], leaders, step)

        # The model is loaded here once, its weights shared by the processes; they run
        # only its torch module and local maps' session (made afresh in each after the
        # fork, ``ghostmatch.dupes.verify``), never a session whose threads a fork drops.
        self.model.embedder  # noqa: B018 - loaded for its side effect
        # The alignment's compiled steps likewise, loaded (or compiled) once, here: the
        # thread that began loading them (``_warm_kernels``) is done once this returns, so
        # the fork copies no lock it holds.
        from ghostmatch.dupes import gaussnewton

        gaussnewton.warm()
        if candidates:
            # A crowd's files are decoded once, here, on every core, rather than once in
            # each process whose kept files meet them (1,000 synthetic images: 1,636
            # decodes on two processes, against 986 on one).
            compared: set[int] = set()
            for lists in candidates.values():
                for i, later in lists.items():
                    compared.update(k for j in later if not gated_out(i, j) for k in (i, j))
            ahead_of([i for n in candidates for i in candidates[n] if i in compared], processes)
        order = sorted(range(len(tasks)), key=lambda t: (-weights[t], t))
        found = run_parts(order, work, processes, visited, self._forked)
        whole = [cast(_Grouped, found[t]) for t, (_, some) in enumerate(tasks) if some is None]
        ahead = [(n, cast(_Foreseen, found[t])) for t, (n, some) in enumerate(tasks) if some]
        settled = sum(r[2] for r in found.values())
        for _, (_, passed, _) in ahead:
            learn(passed)
        for n in candidates:
            known: _Tiers = {}
            for m, (tiers, _, _) in ahead:
                if m == n:
                    known.update(tiers)
            whole.append(grouped(parts[n], None, known))
        decided = sorted((g for r in whole for g in r[0]), key=lambda g: rank(g[0]))
        turned_by = {key: t for r in whole for key, t in r[1].items()}
        return decided, turned_by, settled

    def _forked(self) -> None:
        """What a worker process does first: its own database connections should it read
        the catalog, and one thread for torch and BLAS (``one_thread``)."""
        self.catalog.forget_connections()
        if (torch := sys.modules.get("torch")) is not None:
            torch.set_num_threads(1)
        threadpool_limits(1, user_api="blas")

    def candidate_pairs(
        self, ids: np.ndarray, vectors: Stored, offsets: np.ndarray | None, floor: float
    ) -> tuple[dict[tuple[int, int], float], set[int]]:
        """Candidate pairs (low id first) and their scores: each file's ``MAX_CANDIDATES``
        best partners at or above ``floor``, and every byte-identical pair; and the
        crowded files, those with more partners than that."""
        a, b, scores = stored_pairs(ids, vectors, floor, self.vectors.index, offsets)
        # Best first: a file keeps its first MAX_CANDIDATES pairs. Without a bound, images
        # the descriptor cannot tell apart (smooth noise, flat graphics) would make every
        # pair among thousands a candidate; a pair both files drop is not a candidate.
        kept: dict[int, int] = {}
        found: dict[tuple[int, int], float] = {}
        for i, j, s in zip(a.tolist(), b.tolist(), scores.tolist(), strict=True):
            room_i, room_j = kept.get(i, 0) < MAX_CANDIDATES, kept.get(j, 0) < MAX_CANDIDATES
            kept[i], kept[j] = kept.get(i, 0) + 1, kept.get(j, 0) + 1
            if room_i or room_j:
                found[(min(i, j), max(i, j))] = s
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
        return found, {i for i, n in kept.items() if n > MAX_CANDIDATES}

    def crop_pairs(
        self,
        ids: np.ndarray,
        stored: Stored,
        offsets: np.ndarray | None,
        found: dict[tuple[int, int], float],
        floor: float,
        strong: float,
    ) -> dict[tuple[int, int], float]:
        """Candidate pairs for heavily cropped copies (``ghostmatch.dupes.regions``) that
        ``found`` lacks, with their scores; none for images without regional descriptors
        (indexed before they existed) or a collection past the search's limit."""
        if len(ids) > regions.REGION_SEARCH_LIMIT:
            return {}  # checked before the regions are read: they are REGIONS x the vectors
        vectors = in_memory(stored)
        region_ids, parts = self.catalog.regions()
        # Only images of this search: the catalog may have changed since it read ``ids``.
        known = np.isin(region_ids, ids)
        region_ids, parts = region_ids[known], parts[known]
        if len(region_ids) == 0:
            return {}
        pairs = regions.crop_candidates(
            ids, vectors, offsets, region_ids, parts, self.score_offsets, found, floor, strong
        )
        if not pairs:
            return {}
        keys = sorted(pairs)
        rows = np.searchsorted(ids, np.array(keys, dtype=np.int64))
        scores = pair_scores(vectors, rows[:, 0], rows[:, 1], offsets)
        return dict(zip(keys, scores.tolist(), strict=True))

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
        cache = _MapCache(self.embedder, records, kept_maps=self.catalog.local_maps)
        empty = Verification(0, 0, np.eye(2, 3), False)
        results: dict[tuple[int, int], Verification] = {}
        ordered = _locality_order(pairs)
        block: list[tuple[int, int]] = []
        with ThreadPoolExecutor(_workers()) as pool:

            def flush() -> None:
                cache.load({i for pair in block for i in pair}, pool)
                for i, j in block:
                    a, b = cache.get(i), cache.get(j)
                    results[(i, j)] = (
                        empty if a is None or b is None else verify_scales(a, b, enough)
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
        self,
        x: ImageLike,
        threshold: float | None = None,
        k: int = 100,
        *,
        similar: bool = False,
        turned: bool = True,
    ) -> list[DuplicateMember]:
        """Indexed files that duplicate ``x`` (a new image or an indexed path), best first,
        then (with ``similar``) the ones that are another capture of it, tier ``similar``.

        One k-NN search of the index (at most ``k`` candidates), no scan of the collection;
        indexed files with the same bytes as ``x`` always count, as ``exact``. The others
        get the decision ``find_duplicates`` makes (:class:`PairJudge`), each indexed file
        as the kept one and ``x`` as its possible copy. ``turned``: files that are ``x``
        turned by a quarter-turn, or ``x`` tilted, count too, ``edited``.
        """
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        low = min(t, self._stage2_setting("verify_threshold", default_thresholds(normalised)[1]))
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
                if s >= low or int(i) in exact
            ),
            key=lambda hit: (-hit[1], hit[0]),
        )
        records = {r.id: r for r in self.catalog.get([i for i, _ in hits])}
        judge = self._judge_against(x, records, t)
        copies, alike = [], []
        taken = set(exact)
        decided: dict[int, str | None] = {}
        with one_thread():
            for i, s in hits:
                if i in records and i not in exact:
                    decided[i] = judge(i, [(_QUERY, s)]).get(_QUERY)
        for i, s in hits:
            record = records.get(i)
            if record is None:
                continue
            tier = "exact" if i in exact else decided.get(i)
            if tier == SIMILAR:
                alike.append(_member(record, s, tier))
            elif tier is not None:
                copies.append(_member(record, s, tier))
                taken.add(i)
        if turned:
            # Files that are x turned or tilted, found and checked through x's turned views.
            enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
            by_turn = turns.pairs_of_image(
                self, x, low, t, enough, k, taken | {own_id or -1}, vector
            )
            if by_turn:
                found_turned = {r.id: r for r in self.catalog.get([p.other for p in by_turn])}
                alike = [m for m in alike if m.path not in {r.path for r in found_turned.values()}]
                for p in sorted(by_turn, key=lambda p: (-p.score, p.other)):
                    member = _member(
                        found_turned[p.other], p.score, "edited", turns.member_turn(p, p.other)
                    )
                    copies.append(member)
                copies.sort(key=lambda m: -m.score)
        return copies + (alike if similar else [])

    def _judge_against(
        self, x: ImageLike, records: dict[int, ImageRecord], threshold: float
    ) -> PairJudge:
        """A judge of the indexed ``records`` (kept) against ``x`` (the copy), which it
        knows as ``_QUERY``."""
        enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
        judge = PairJudge(self.model, records, threshold, enough)
        if not records:
            return judge
        cache = judge.maps
        if isinstance(x, Image.Image):
            image = to_rgb(x)
        elif isinstance(x, np.ndarray):
            image = image_from_array(x)
        else:
            try:
                image = load_image(x, cache.zoomed_card.input_size).image
            except ImageRejected as err:
                raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err
        model = self.embedder.local_maps_model
        pixels = [prepare(image, cache.card), prepare(ImageOps.mirror(image), cache.card)]
        base = local_features(model, to_batch(pixels)).astype(np.float16)
        zoomed = local_features(model, to_batch([prepare(image, cache.zoomed_card)]))
        cache.maps[_QUERY] = _Maps(base[0], base[1], zoomed[0].astype(np.float16))
        judge.captures[_QUERY] = prepare_capture(image)
        judge.images[_QUERY] = image
        judge.glances[_QUERY] = Glance.of(image)
        return judge

    def mark_not_duplicate(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        """Record that two files are not duplicates; later searches ignore the pair."""
        pa, pb = Path(os.path.abspath(a)), Path(os.path.abspath(b))
        if pa == pb:
            raise GhostmatchError("a pair of non-duplicates needs two different files")
        self.catalog.add_not_duplicate(pa, pb)


class PairJudge:
    """The same-capture decision for the pairs of one search: ``judge(kept, [(other,
    score), ...])`` gives each other file's tier with the kept one: ``exact`` (same
    bytes), ``near`` or ``edited`` (same capture), ``similar`` (alike, another capture),
    or None (not alike).

    Each pair is first aligned from the identity map (``ghostmatch.dupes.samecapture``):
    a re-encoded, resized, recoloured or captioned copy agrees there already, and needs
    no local features; a flipped copy agrees from the mirror map, where its glances
    send it, and a pair whose glances show that first try hopeless skips it. One scoring
    at least ``threshold`` whose small grey views already show the same picture unmoved
    (``ghostmatch.dupes.settle``) is ``near`` without even that, or ``edited`` when one
    shows it inside a uniform frame or mirrored (counted in ``settled``).
    Otherwise the geometric check (``verify_scales``) finds the transform (a crop, flip,
    turn, border), which must hold at least ``min_inliers``
    points unless the score reaches ``threshold``, and the pair is aligned again from it.
    A pair whose geometry holds but whose pixels disagree is ``similar``.
    A pair with a ``crowded`` file (where the descriptor cannot tell images apart) is
    only tried unmoved, and only when its thumbnails and layouts correlate.
    """

    def __init__(
        self,
        model: ModelBinding,
        records: dict[int, ImageRecord],
        threshold: float,
        min_inliers: int,
        crowded: set[int] | frozenset[int] = frozenset(),
        kept_maps: KeptMaps | None = None,
    ) -> None:
        self.records = records
        self.threshold = threshold
        self.kept_maps = kept_maps
        self.min_inliers = min_inliers
        # Set while judging pairs that only regional descriptors made candidates: an
        # agreement that its map does not pin (``Agreement.pinned``) then counts only as
        # an unchanged crop (see ``_same``).
        self.crops_only = False
        self.crowded = crowded
        self.model = model
        # The captures and the local maps read one decode of an image (see _Decoded).
        self.decoded = _Decoded()
        self._maps: _MapCache | None = None
        # None marks an image that could not be decoded.
        self.captures: OrderedDict[int, Capture | None] = OrderedDict()
        # Files' thumbnails from the catalog (``use_thumbnails``), unit vectors by id.
        self.thumbs: dict[int, np.ndarray] = {}
        # The small grey views of the decoded captures, kept and dropped with them.
        self.glances: dict[int, Glance] = {}
        # Pairs settled ``near`` from their glances, without a dense comparison.
        self.settled = 0
        # Pairs whose glances showed the unmoved try hopeless, and pairs first tried from
        # the mirror map (``_first_try``).
        self.hopeless = 0
        self.mirrored = 0
        # Images known without a file (a query's), by id, for ``_one_piece``.
        self.images: dict[int, Image.Image] = {}

    @property
    def maps(self) -> _MapCache:
        """The local feature maps, made on first use: loading the model is only worth it
        for pairs that reach the geometric check."""
        if self._maps is None:
            self._maps = _MapCache(self.model.embedder, self.records, self.decoded, self.kept_maps)
        return self._maps

    def capture(self, i: int) -> Capture | None:
        if i in self.captures:
            self.captures.move_to_end(i)
            return self.captures[i]
        return self._keep(i, *self._made(i))

    def _made(self, i: int) -> tuple[Capture | None, Glance | None]:
        """File ``i``'s capture and glance, decoded now (None, None where it cannot be)."""
        try:
            image = self.decoded.image(self.records[i].path, DECODE_SIDE)
        except ImageRejected:
            return None, None
        return prepare_capture(image), Glance.of(image)

    def _keep(self, i: int, found: Capture | None, glance: Glance | None) -> Capture | None:
        self.captures[i] = found
        if glance is not None:
            self.glances[i] = glance
        if len(self.captures) > MAP_CACHE_IMAGES:
            gone, _ = self.captures.popitem(last=False)
            self.glances.pop(gone, None)
        return found

    def use_thumbnails(self, screens: Mapping[int, TurnScreen], side: int) -> None:
        """Keep the grey thumbnails of ``screens`` (the catalog's, made while indexing from
        a decode at ``side``) of the files whose captures would decode the same pixels: a
        crowded pair is then gated on them (:meth:`gated_out`) before either file is
        decoded. Among 1,000 synthetic images, 24,000 of 25,600 crowded pairs fail the
        gate, and 440 of the 990 files compared are in no pair that passes it."""
        for i, screen in screens.items():
            record = self.records.get(i)
            if record is None or len(screen.thumbnail) != THUMB_SIDE * THUMB_SIDE:
                continue
            size = (record.width, record.height)
            if decodes_alike(record.format, size, side, DECODE_SIDE):
                self.thumbs[i] = unit_thumb(np.frombuffer(screen.thumbnail, np.uint8))

    def gated_out(self, i: int, j: int) -> bool:
        """Whether ``i`` and ``j`` are a crowded pair whose catalog thumbnails
        (:meth:`use_thumbnails`) correlate under ``CROWDED_CORRELATION``: the captures' own
        thumbnails are the same, so the pair would not be compared; False where either
        thumbnail is missing."""
        if i not in self.crowded and j not in self.crowded:
            return False
        a, b = self.thumbs.get(i), self.thumbs.get(j)
        return a is not None and b is not None and float(a @ b) < CROWDED_CORRELATION

    def capture_ahead(self, ids: Sequence[int], threads: int) -> None:
        """Make the captures of ``ids`` not made yet (as many as are kept) on ``threads``
        threads, kept here in their order: for worker processes that all read them (a
        crowd's kept files share out its pairs, most of whose files each process meets)."""
        todo = [i for i in dict.fromkeys(ids) if i not in self.captures][:MAP_CACHE_IMAGES]
        with ThreadPoolExecutor(threads) as pool:
            for i, made in zip(todo, pool.map(self._made, todo), strict=True):
                self._keep(i, *made)

    def __call__(self, leader: int, others: Sequence[tuple[int, float]]) -> dict[int, str | None]:
        kept = self.records[leader]
        tiers: dict[int, str | None] = {}
        geometric: list[tuple[int, float]] = []
        # Pairs for a first dense try: (other, crowded, its capture, where the try starts).
        first: list[tuple[int, bool, Capture, str]] = []
        for j, score in others:
            other = self.records.get(j)
            if other is not None and kept.content_hash == other.content_hash:
                tiers[j] = "exact"
                continue
            tiers[j] = None
            crowded = leader in self.crowded or j in self.crowded
            if score < self.threshold and not crowded:
                # Under the threshold only a geometric match counts, and copies unmoved
                # (re-encodes, resizes) score above it: straight to the geometric check.
                geometric.append((j, score))
                continue
            if self.gated_out(leader, j):
                continue  # as below, without decoding either file
            a, b = self.capture(leader), self.capture(j)
            if a is None or b is None:
                continue
            if crowded and a.correlation(b) < CROWDED_CORRELATION:
                continue
            if settled := self._settled(leader, j, crowded):
                tiers[j] = settled
                continue
            start = self._first_try(leader, j, crowded)
            if start is None:
                if not crowded:
                    geometric.append((j, score))
                continue
            first.append((j, crowded, b, start))
        a = self.capture(leader) if first else None
        # One pair at a time: numpy's own threads already share out the larger steps, and
        # more threads on top of them only contend for the cores. A pair that fails its
        # first try goes on to the geometric check and is aligned again from its map,
        # unless it is crowded.
        checks = (
            [
                agreement(
                    a, b, _FIRST_MAPS[start], second_chance=not c, first_try=True, colours_early=c
                )
                for _, c, b, start in first
            ]
            if a is not None
            else []
        )
        scores = dict(others)
        for (j, crowded, _, start), check in zip(first, checks, strict=True):
            if self._same(check):
                # A mirror image is an edit, whatever else the map does; one that moves
                # otherwise than as one piece is another shot.
                if start == "unmoved" and check.is_whole():
                    tiers[j] = "near"
                else:
                    tiers[j] = "edited" if self._one_piece(leader, j, check) else SIMILAR
            elif not crowded:
                geometric.append((j, scores[j]))
        if geometric:
            with ThreadPoolExecutor(_workers()) as pool:
                self.maps.load({leader, *(j for j, _ in geometric)}, pool)
            decided = self._aligned(leader, geometric)
            tiers.update(zip((j for j, _ in geometric), decided, strict=True))
        return tiers

    def _settled(self, leader: int, j: int, crowded: bool) -> str | None:
        """The pair's tier on its glances alone (``ghostmatch.dupes.settle``), counted in
        ``settled``, or None. Never for a crowded file, where the descriptor cannot tell
        images apart, nor for a pair that only regional descriptors found."""
        kept, other = self.glances.get(leader), self.glances.get(j)
        if crowded or self.crops_only or kept is None or other is None:
            return None
        tier = settled_tier(kept, other)
        self.settled += tier is not None
        return tier

    def _first_try(self, leader: int, j: int, crowded: bool) -> str | None:
        """Where a pair's first dense try starts (``ghostmatch.dupes.settle.first_try``):
        ``unmoved``, ``mirrored``, or None when its glances show the unmoved try hopeless
        (counted in ``hopeless``; those tried mirrored in ``mirrored``)."""
        kept, other = self.glances.get(leader), self.glances.get(j)
        if kept is None or other is None:
            return "unmoved"
        start = first_try(kept, other, crowded)
        self.hopeless += start is None
        self.mirrored += start == "mirrored"
        return start

    def _same(self, found: Agreement) -> bool:
        if not found.same_capture:
            return False
        if found.pinned or not self.crops_only or found.distinct is None:
            return True
        # Nothing but flat areas holds the map, and no whole-image match backs the pair: it
        # counts only as a crop, which keeps its source's pixels, neither squashed nor
        # recoloured (between independent flat-shape pictures, region matches lined up by
        # a loose map gained or lost a third of the contrast).
        d = found.distinct
        return d.squash <= CROP_LOOSE_SQUASH and 1 / CROP_LOOSE_GAIN <= d.gain <= CROP_LOOSE_GAIN

    def _one_piece(self, leader: int, j: int, found: Agreement) -> bool:
        """Whether a pair that agrees through a map other than the identity moves as one
        piece under it (``ghostmatch.dupes.parallax``), as an edit of one capture does:
        another shot of a flat scene, one map away from a crop at the agreement's size,
        does not. Looked at on the captures first; decoded finer only where that look
        leaves it open."""
        if leader in self.crowded or j in self.crowded:
            return True
        a, b = self.capture(leader), self.capture(j)
        if a is None or b is None:
            return True
        coarse = parallax.coarse_spread(a, b, found.warp)
        if coarse is not None and coarse < parallax.COARSE_SPREAD:
            return True
        kept, other = self._fine_image(leader), self._fine_image(j)
        if kept is None or other is None:
            return True
        return parallax.one_piece(kept, other, found.warp)

    def _fine_image(self, i: int) -> Image.Image | None:
        """File ``i`` decoded for :func:`parallax.spread` (None where it cannot be)."""
        known = self.images.get(i)
        if known is not None:
            return known
        try:
            return self.decoded.image(self.records[i].path, parallax.DECODE_SIDE)
        except ImageRejected:
            return None

    def _aligned(self, leader: int, pairs: list[tuple[int, float]]) -> list[str | None]:
        """The tiers of pairs that the identity map does not align, in order."""
        base = self.maps.get(leader)
        if base is None:
            return [None] * len(pairs)
        return [self._geometric(leader, base, j, score) for j, score in pairs]

    def _geometric(self, leader: int, base: _MapsView, j: int, score: float) -> str | None:
        """One pair's tier from its geometric check (``scale_steps``). A fit found without
        the mirrored maps, with enough inliers, under which the pixels agree decides the
        pair a copy, so the mirrored maps are made only for pairs it leaves open (on the
        full ``benchmarks.othershots`` set every pair's tier is the one that trying every
        map first gives)."""
        other = self.maps.get(j)
        if other is None:
            return None
        tried: list[tuple[Verification, Agreement | None]] = []
        for check, final in self.maps.steps(leader, base, j, other, self.min_inliers):
            if final and not (check.inliers >= self.min_inliers or score >= self.threshold):
                return None
            # The full check often ends on a fit already compared without the mirrors.
            known = [found for fit, found in tried if _same_fit(fit, check)]
            found = known[0] if known else self._agreement(leader, j, check)
            tried.append((check, found))
            if found is not None and self._same(found):
                if check.is_identity():
                    return "near"
                return "edited" if self._one_piece(leader, j, found) else SIMILAR
            if final:
                # Another capture of the same scene: its local features agree on one
                # geometry. A pair that only its score brought here is not alike at all.
                alike = found is not None and check.inliers >= self.min_inliers
                return SIMILAR if alike else None
            if found is not None:
                # A fit that holds (enough inliers), under which the pixels disagree:
                # another capture, whose local features agree on that geometry. The other
                # maps are not made for it (on the full ``benchmarks.othershots`` set no
                # pair so left became a copy on a later fit).
                return SIMILAR
        return None

    def _agreement(self, leader: int, j: int, check: Verification) -> Agreement | None:
        """The dense agreement of a pair aligned by ``check``; None when either image
        cannot be decoded. Captures are only decoded for pairs that get this far."""
        a = self.capture(leader)
        b = self.capture(j) if a is not None else None
        if a is None or b is None:
            return None
        # The check maps the other's unit square to the kept one's; alignment needs the
        # other way round.
        warp = np.linalg.inv(np.vstack([check.affine, [0.0, 0.0, 1.0]]))[:2]
        return agreement(a, b, warp)

    def prefetch(
        self, leader: int, others: Sequence[tuple[int, float]], min_inliers: int | None = None
    ) -> None:
        """Start making, in the background, the maps that judging ``others`` with
        ``leader`` (with ``min_inliers``, by default this judge's) will read: those of pairs
        that go straight to the geometric check (under the threshold), as far as its first
        possible decision. A pair above it needs them only when the identity map does not
        align it, which only judging it tells."""
        ids = [
            j
            for j, score in others
            if (other := self.records.get(j)) is not None
            and other.content_hash != self.records[leader].content_hash
            and score < self.threshold
            and leader not in self.crowded
            and j not in self.crowded
        ]
        if ids:
            self.maps.prefetch(leader, ids, min_inliers or self.min_inliers)

    def close(self) -> None:
        """Stop the background work of :meth:`prefetch`."""
        if self._maps is not None:
            self._maps.close()


def _warm_kernels() -> None:
    """Load the dense comparison's compiled steps (``gaussnewton.warm``). Should it fail
    here (a head start only), the first comparison loads them, or the numpy steps run."""
    with contextlib.suppress(Exception):
        from ghostmatch.dupes import gaussnewton

        gaussnewton.warm()


def _same_fit(a: Verification, b: Verification) -> bool:
    return a.inliers == b.inliers and a.flipped == b.flipped and np.array_equal(a.affine, b.affine)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch (where it is loaded), the local maps' sessions and BLAS on one thread each
    for a while. Deciding pairs alternates small numpy steps with small forward passes;
    with a pool of threads each, idle threads spin between the steps, and on 2 busy cores
    that cost ten times the CPU of one thread (``python -m benchmarks.othershots
    --synthetic-only 200``: 54 CPU seconds, not 5)."""
    torch = sys.modules.get("torch")  # left unloaded where nothing needs it
    before = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with limited_threads(1), threadpool_limits(1, user_api="blas"):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def _cuda_initialized() -> bool:
    """Whether torch holds a CUDA context (never where torch is not loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def _workers() -> int:
    return min(8, max(2, os.cpu_count() or 2))


def _pair(scores: dict[tuple[int, int], float], i: int, j: int) -> float:
    return scores[(i, j)] if (i, j) in scores else scores[(j, i)]


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


# The local features a pair found through regional descriptors needs on one transform (a
# crop to 60% keeps about a third of its source's area, and as many of its features).
REGION_MIN_INLIERS = 24
# A pair found through regional descriptors alone whose map only flat areas hold
# (``Agreement.pinned`` false) must be an unchanged crop: squashed at most this much and
# its grey gain within this factor. Copies accepted through a loose map measured at most 1.03 and
# within 0.97-1.00 (``python -m benchmarks.othershots``, full set); two pairs of independent
# flat-shape pictures (``--synthetic-only 1000``) 1.07 and 1.15, gains 0.63 and 1.88.
CROP_LOOSE_SQUASH = 1.05
CROP_LOOSE_GAIN = 1.1
# Under this many candidate pairs the grouping runs in one process unless told otherwise.
# A worker process costs little CPU to start (the fork and its own session for the local
# maps: 0.03 CPU-seconds), but a third of a second passed on a busy machine before its
# first maps were made, while 200 pairs take about a second to decide (4 ms a pair on the
# full ``benchmarks.othershots`` set).
PARALLEL_PAIRS = 200
# One part's groups (kept file, [(other, score, tier), ...]), the turns of their copies by
# (kept file, copy), and the pairs settled from their glances meanwhile.
_Grouped = tuple[list[turns.Grouped], dict[tuple[int, int], int], int]
# Candidate pairs (file, file, score).
_Part = list[tuple[int, int, float]]
# Each kept file's decisions on its candidates.
_Tiers = dict[int, dict[int, str | None]]
# The decisions of some kept files made ahead, the turned pairs that passed meanwhile, and
# the pairs settled from their glances.
_Foreseen = tuple[_Tiers, dict[tuple[int, int], "turns.TurnedPair"], int]
# Slices of a large part's kept files per process (``_grouped_apart``): enough that one
# process that finishes first takes more of them. A crowded file's pairs cost far more
# than others (its first tries), so slices of equal pairs are not equal work: on two
# processes, 1,000 synthetic images (seeds 7 and 10, two runs each) were decided in 4.0
# and 5.0 s of wall clock with 32, against 4.2 and 5.3 s with 8.
FORESEEN_SLICES = 32
# A file keeps at most this many candidate partners (best first), besides byte-identical
# ones; a file with more is crowded (see PairJudge).
MAX_CANDIDATES = 16
# Thumbnail correlation below which a crowded pair is not compared at all: unrelated
# images correlate near 0, copies of one picture unmoved near 1.
CROWDED_CORRELATION = 0.5
# The maps a pair's first dense try starts from, by ``first_try``'s answer (unit squares:
# the mirror map sends x to 1 - x).
_FIRST_MAPS = {
    "unmoved": np.eye(2, 3),
    "mirrored": np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
}
# The key under which PairJudge knows an image that is not indexed (dupes --of).
_QUERY = -1
# Images whose local maps verify_pairs embeds together, and the most it holds at once.
MAP_BATCH = 32
MAP_CACHE_IMAGES = 4096
# Plain maps' prepared pixels kept for the mirrored maps, most of which are asked for by
# the pair whose check made the plain one (about 77 kB each).
PLAIN_PREPARED = 64
# Decoded pixels a search keeps for the next consumer of the same file (RGB bytes: a
# 320 x 240 decode is 0.23 MB, a phone photo's at the zoomed maps' size about 0.6 MB). On
# the full set of ``python -m benchmarks.othershots`` 90% of the files decoded again come
# back within 80 other files.
DECODED_BYTES = 48 << 20
# Maps made ahead in the background and not yet taken, at most (about 50 KB each), and
# checks started there and not yet gone on with (each holds its pair's maps, up to 1 MB).
PREFETCH_MAPS = 512
PREFETCH_CHECKS = 128


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


class _Decoded:
    """The images a duplicate search decoded last, by file, bounded to ``DECODED_BYTES`` of
    pixels (least recently used dropped first). A file asked for at another size is decoded
    again only where that gives other pixels (a JPEG's DCT scale, ``same_decode``): the
    captures (``DECODE_SIDE``) and the mirrored and zoomed maps, made later than the plain
    one, read one decode. ``decodes`` counts the decodes. Safe to share between the
    threads that decode (the maps' pool and background thread, the judging thread)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = DECODED_BYTES if budget is None else budget
        self.decodes = 0
        self._images: OrderedDict[str, tuple[DecodedImage, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def image(self, path: Path, min_side: int) -> Image.Image:
        """``load_image(path, min_side).image``, decoded once while it stays recent."""
        key = os.fspath(path)
        with self._lock:
            known = self._images.get(key)
            if known is not None and same_decode(known[0], known[1], min_side):
                self._images.move_to_end(key)
                return known[0].image
        # Decoded outside the lock: two threads asking for one file at once both decode
        # it, to the same pixels.
        decoded = load_image(path, min_side)
        image = decoded.image
        with self._lock:
            self.decodes += 1
            old = self._images.pop(key, None)
            if old is not None:
                self._bytes -= _pixel_bytes(old[0].image)
            self._images[key] = (decoded, min_side)
            self._bytes += _pixel_bytes(image)
            while self._bytes > self.budget and self._images:
                _, (gone, _) = self._images.popitem(last=False)
                self._bytes -= _pixel_bytes(gone.image)
        return image


def _mirrors_alike(image: Image.Image, card: ModelCard) -> bool:
    """Whether the model's input of ``image`` mirrored is its input mirrored: a squash
    (a centre crop of an odd margin is not symmetric) without Pillow's integer reduction
    first, whose blocks start at one edge (``reducing_gap`` 3: under 6 x the input size
    a side). Pillow's resampling weighs mirrored pixels alike (4,500 random sizes, bicubic
    and bilinear, equal to the bit; ``tests/test_maps.py``)."""
    limit = 6 * card.input_size
    return card.resize == "squash" and image.width < limit and image.height < limit


def _pixel_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class _Maps:
    """One image's cached local maps (fp16): at the input size, and mirrored and zoomed
    once a check has needed them (None until then)."""

    def __init__(
        self,
        base: np.ndarray,
        mirrored: np.ndarray | None = None,
        zoomed: np.ndarray | None = None,
    ) -> None:
        self.base, self.mirrored, self.zoomed = base, mirrored, zoomed


class _MapsView:
    """An image's maps as ``verify_scales`` reads them (float32), the mirrored and zoomed
    maps made by the cache when first read: a pair that the plain map settles never needs
    the mirrored one, nor one settled at equal scale the zoomed one."""

    def __init__(self, cache: _MapCache, i: int, maps: _Maps) -> None:
        self._cache, self._i, self._maps = cache, i, maps
        self.base = maps.base.astype(np.float32)

    @functools.cached_property
    def mirrored(self) -> np.ndarray:
        return self._cache.mirrored(self._i, self._maps).astype(np.float32)

    @functools.cached_property
    def zoomed(self) -> np.ndarray:
        return self._cache.zoomed(self._i, self._maps).astype(np.float32)


class _MapCache:
    """Local feature maps of recently used images, LRU-bounded. The plain maps at the input
    size are made in batches; the mirrored map only for an image whose pair the plain maps
    do not settle, and the zoomed map, more than half the cost of an image's maps, only for
    one whose pair the equal-scale check does not settle. ``made`` counts the maps made,
    by kind (``base``, ``mirrored``, ``zoomed``).

    :meth:`prefetch` makes, on one background thread, the maps that pairs about to be
    judged will read (decoding and ONNX Runtime release the GIL, so it runs beside the
    dense comparison on the main thread). It follows each pair's check only as far as its
    first possible decision, so every map it makes is one the main thread would make; the
    main thread takes them from it, waiting for one still being made. A map is the same
    whichever thread made it, so the decisions do not depend on timing.
    """

    def __init__(
        self,
        embedder: Embedder,
        records: dict[int, ImageRecord],
        decoded: _Decoded | None = None,
        kept_maps: KeptMaps | None = None,
    ) -> None:
        self.embedder = embedder
        self.records = records
        # The plain maps made while indexing, read where they are this search's own.
        self.kept_maps = kept_maps
        # Every kind of map, and the captures of a judge that shares it, read one decode.
        self.decoded = _Decoded() if decoded is None else decoded
        card = embedder.card
        self.card = card
        self.zoomed_card = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)
        # None marks an image that could not be decoded, so it is not tried again.
        self.maps: OrderedDict[int, _Maps | None] = OrderedDict()
        self.made: Counter[str] = Counter()
        # Maps made ahead, by (image, kind), None for an image that could not be decoded;
        # the ones being made; and the lock and signal both threads share for them.
        self._ready: OrderedDict[tuple[int, str], np.ndarray | None] = OrderedDict()
        self._working: set[tuple[int, str]] = set()
        self._lock = threading.Condition()
        # Checks the background started, by (kept image, other image, inliers enough),
        # None for one the main thread made itself; and the ones it is starting.
        self._started: OrderedDict[
            tuple[int, int, int], tuple[tuple[Verification, bool], Iterator[Any]] | None
        ] = OrderedDict()
        self._checking: set[tuple[int, int, int]] = set()
        # The plain maps' prepared pixels of the last few images, whose mirror is the
        # mirrored map's input (``_mirrors_alike``), by image.
        self._plain: OrderedDict[int, np.ndarray] = OrderedDict()
        self._background: ThreadPoolExecutor | None = None
        self._stopping = False

    def __contains__(self, i: int) -> bool:
        return i in self.maps

    def get(self, i: int) -> _MapsView | None:
        self.maps.move_to_end(i)
        maps = self.maps[i]
        return None if maps is None else _MapsView(self, i, maps)

    def _decode(self, i: int) -> Image.Image | None:
        try:
            # Decoded as for the zoomed map, so all scales see the same pixels.
            return self.decoded.image(self.records[i].path, self.zoomed_card.input_size)
        except ImageRejected:
            return None

    def _prepared(self, i: int, kind: str = "base") -> np.ndarray | None:
        image = self._decode(i)
        if image is None:
            return None
        if kind == "zoomed":
            return prepare(image, self.zoomed_card)
        if kind == "base":
            made = prepare(image, self.card)
            if _mirrors_alike(image, self.card):
                with self._lock:
                    self._plain[i] = made
                    while len(self._plain) > PLAIN_PREPARED:
                        self._plain.popitem(last=False)
            return made
        with self._lock:
            plain = self._plain.pop(i, None)
        if plain is not None:
            return np.ascontiguousarray(plain[:, ::-1])
        return prepare(ImageOps.mirror(image), self.card)

    def _embed(self, prepared: list[np.ndarray], kind: str) -> np.ndarray:
        """The maps (fp16) of images prepared for one kind, as one batch."""
        maps = local_features(self.embedder.local_maps_model, to_batch(prepared))
        with self._lock:
            self.made[kind] += len(prepared)
        return maps.astype(np.float16)

    def _make(self, i: int, kind: str) -> np.ndarray | None:
        """Image ``i``'s map of one kind, made now (or a plain one kept by indexing); None
        if it cannot be decoded."""
        if kind == "base" and (kept := self.kept([i])):
            return kept[i]
        prepared = self._prepared(i, kind)
        return None if prepared is None else self._embed([prepared], kind)[0]

    def _take(self, i: int, kind: str) -> tuple[bool, np.ndarray | None]:
        """A map made ahead, once it is done: (True, the map or None), else (False, None)."""
        with self._lock:
            while (i, kind) in self._working:
                self._lock.wait()
            if (i, kind) in self._ready:
                return True, self._ready.pop((i, kind))
        return False, None

    def _extra(self, i: int, kind: str, maps: _Maps) -> np.ndarray | None:
        """Image ``i``'s mirrored or zoomed map: made ahead, else made now."""
        found, made = self._take(i, kind)
        if found:
            return made
        # Made ahead straight into the cached maps while this thread waited for it.
        known: np.ndarray | None = getattr(maps, kind)
        return known if known is not None else self._make(i, kind)

    def mirrored(self, i: int, maps: _Maps) -> np.ndarray:
        """Image ``i``'s mirrored map (fp16), made on first call and kept in ``maps``."""
        if maps.mirrored is None:
            made = self._extra(i, "mirrored", maps)
            # Gone or changed since its plain map was made: a map that matches nothing
            # stands in, so the pair is judged on its plain maps alone.
            maps.mirrored = np.zeros_like(maps.base) if made is None else made
        return maps.mirrored

    def zoomed(self, i: int, maps: _Maps) -> np.ndarray:
        """Image ``i``'s zoomed map (fp16), made on first call and kept in ``maps``."""
        if maps.zoomed is None:
            made = self._extra(i, "zoomed", maps)
            # Gone or changed since its other maps were made: the equal-scale map stands
            # in, which can only find fewer matches.
            maps.zoomed = maps.base if made is None else made
        return maps.zoomed

    @functools.cached_property
    def _made_by(self) -> str | None:
        """What this search's own plain maps would be tagged with where kept
        (``local_maps_made_by``), None where kept maps cannot stand in for them."""
        return local_maps_made_by(self.embedder.local_maps_model)

    def kept(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The plain maps of those of ``ids`` that indexing kept (``Catalog.local_maps``)
        and that are the ones this search would make, to the bit: made by its own maps'
        runtime (``local_maps_made_by``) from the same pixels (a JPEG's DCT scale depends
        on the size it is decoded for: the index decoded it for the plain size, a search
        decodes it for the zoomed one). Counted in ``made["kept"]``."""
        if self.kept_maps is None or not ids or self._made_by is None:
            return {}
        plain, zoomed = self.card.input_size, self.zoomed_card.input_size
        alike = [
            i
            for i in ids
            if decodes_alike((r := self.records[i]).format, (r.width, r.height), plain, zoomed)
        ]
        found = self.kept_maps(alike, self._made_by) if alike else {}
        with self._lock:
            self.made["kept"] += len(found)
        return found

    def load(self, ids: set[int], pool: ThreadPoolExecutor) -> None:
        """Make sure every image in ``ids`` has its maps (or a failure mark) cached."""
        for i in ids & self.maps.keys():
            self.maps.move_to_end(i)
        for i in sorted(ids - self.maps.keys()):
            found, made = self._take(i, "base")
            if found:
                self.maps[i] = None if made is None else self._adopted(i, _Maps(made))
        for i, kept in self.kept(sorted(ids - self.maps.keys())).items():
            self.maps[i] = self._adopted(i, _Maps(kept))
        missing = sorted(ids - self.maps.keys())
        for start in range(0, len(missing), MAP_BATCH):
            chunk = missing[start : start + MAP_BATCH]
            prepared = list(pool.map(self._prepared, chunk))
            ok = [(i, a) for i, a in zip(chunk, prepared, strict=True) if a is not None]
            self.maps.update((i, None) for i, a in zip(chunk, prepared, strict=True) if a is None)
            if ok:
                made = self._embed([a for _, a in ok], "base")
                self.maps.update((i, _Maps(m)) for (i, _), m in zip(ok, made, strict=True))
        while len(self.maps) > max(MAP_CACHE_IMAGES, len(ids)):
            self.maps.popitem(last=False)

    def _adopted(self, i: int, maps: _Maps) -> _Maps:
        """``maps``, with image ``i``'s mirrored and zoomed maps made ahead moved into it: a
        check started ahead reads them without taking them, and left among the maps made
        ahead they would be dropped (``PREFETCH_MAPS``) and made again for a later pair."""
        with self._lock:
            for kind in ("mirrored", "zoomed"):
                if self._ready.get((i, kind)) is not None:
                    setattr(maps, kind, self._ready.pop((i, kind)))
        return maps

    def prefetch(self, leader: int, others: list[int], enough: int) -> None:
        """Start making, in the background, the maps that checking ``leader`` against each
        of ``others`` with ``enough`` inliers reads up to its first possible decision."""
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="ghostmatch-maps")
        self._background.submit(self._ahead, leader, others, enough)

    def _ahead(self, leader: int, others: list[int], enough: int) -> None:
        """The background work of :meth:`prefetch`: each pair's check taken to its first
        step, and kept for :meth:`steps` to go on with."""
        base = _AheadView(self, leader)
        for j in others:
            if self._stopping or base.missing:
                return
            key = (leader, j, enough)
            with self._lock:
                if key in self._started:
                    continue
                self._checking.add(key)
            try:
                other = _AheadView(self, j)
                if other.missing:
                    continue
                # The check reads these maps whatever happens after its first step.
                steps = scale_steps(base, other, enough)
                first = next(steps)
                with self._lock:
                    self._started[key] = (first, steps)
                    self._trim_started()
            finally:
                with self._lock:
                    self._checking.discard(key)
                    self._lock.notify_all()

    def steps(
        self, leader: int, base: _MapsView, j: int, other: _MapsView, enough: int
    ) -> Iterator[tuple[Verification, bool]]:
        """``scale_steps(base, other, enough)``, gone on with from where the background
        left it when it started it: its fits are the same whichever thread makes them."""
        key = (leader, j, enough)
        with self._lock:
            while key in self._checking:
                self._lock.wait()
            started = self._started.pop(key, None)
            if started is None:
                # Not started: the background, behind, leaves it alone from now on.
                self._started[key] = None
                self._trim_started()
        if started is None:
            return scale_steps(base, other, enough)
        first, rest = started
        return itertools.chain([first], rest)

    def _trim_started(self) -> None:
        while len(self._started) > PREFETCH_CHECKS:
            self._started.popitem(last=False)

    def _ahead_map(self, i: int, kind: str) -> np.ndarray | None:
        """Image ``i``'s map of one kind for a check started in the background: cached,
        made ahead already, or made now and kept for the main thread."""
        # Read without the main thread's lock: at worst a map is made twice, the same.
        cached = self.maps.get(i)
        if cached is not None and (known := getattr(cached, kind)) is not None:
            return known
        key = (i, kind)
        with self._lock:
            while key in self._working:
                self._lock.wait()
            if key in self._ready:
                return self._ready[key]
            self._working.add(key)
        made = None
        try:
            made = self._make(i, kind)
        finally:
            with self._lock:
                self._working.discard(key)
                # An image the main thread holds maps of gets it there (see ``_adopted``).
                cached = self.maps.get(i)
                if made is not None and kind != "base" and cached is not None:
                    setattr(cached, kind, made)
                else:
                    self._ready[key] = made
                    while len(self._ready) > PREFETCH_MAPS:
                        self._ready.popitem(last=False)
                self._lock.notify_all()
        return made

    def wait(self) -> None:
        """Wait until the maps asked for ahead so far are made."""
        if self._background is not None:
            self._background.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the background work: maps not started are not made."""
        if self._background is not None:
            self._stopping = True
            self._background.shutdown(wait=True, cancel_futures=True)
            self._background = None
            self._stopping = False
        self._ready.clear()
        self._started.clear()


class _AheadView:
    """An image's maps as the background thread reads them for ``scale_steps``, each made
    (or found) when first read; ``missing`` when the image cannot be decoded."""

    def __init__(self, cache: _MapCache, i: int) -> None:
        self._cache, self._i = cache, i
        found = cache._ahead_map(i, "base")
        self.missing = found is None
        self.base = np.zeros((1, 1, 1), np.float32) if found is None else found.astype(np.float32)

    @functools.cached_property
    def mirrored(self) -> np.ndarray:
        found = self._cache._ahead_map(self._i, "mirrored")
        # What the main thread's maps stand in with (see _MapCache.mirrored and zoomed).
        return np.zeros_like(self.base) if found is None else found.astype(np.float32)

    @functools.cached_property
    def zoomed(self) -> np.ndarray:
        found = self._cache._ahead_map(self._i, "zoomed")
        return self.base if found is None else found.astype(np.float32)
