"""Can the stored descriptor tell which way up a photo is? If it could, ``dupes`` would
search only the images that look turned through turned views. A softmax over the four
quarter-turns on the bundled descriptor, trained on caltech101 *train* photos and their
quarter-turns, measured on caltech101 test photos and ukbench-dev (held out).

Reported, on the training photos and on both held-out sets: the share of turned photos
it flags (recall, its cut set for ``TARGET_RECALL`` on the training photos) and of upright
photos it flags too (each flagged image would be searched turned), and the views a
flagged image would get.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.data import CALTECH, caltech_test, missing_caltech_note
from benchmarks.othershots import UKBENCH
from benchmarks.report import Figure, Report, environment, save
from benchmarks.settings import RESULTS
from ghostmatch.dupes.turns import turn_array
from ghostmatch.ingest.images import ImageRejected, load_image
from ghostmatch.model.embedder import Embedder, prepare
from ghostmatch.model.weights import load_descriptor

SEED = 5
TRAIN, TRAIN_QUICK = 2000, 600
HELD_OUT, HELD_OUT_QUICK = 600, 200
# The share of turned training photos the probe must flag: its cut is set there.
TARGET_RECALL = 0.97
WEIGHT_DECAY = 1e-3
STEPS = 500
# A flagged image's views undo each turn the probe gives at least this probability, and
# always its likeliest one.
VIEW_PROBABILITY = 0.1


@dataclass(frozen=True)
class OrientationProbe:
    """Which way up a photo is, from its descriptor: a softmax over its clockwise turn
    from upright (0, 90, 180, 270), ``weights`` (4, dim) and ``bias`` (4,), for the model
    whose weights have ``weights_sha256``. An image is flagged as turned, and searched
    turned, when its probability of being upright is under ``cut``."""

    weights: np.ndarray
    bias: np.ndarray
    cut: float
    weights_sha256: str

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(n, 4) probabilities of each descriptor's turn from upright."""
        logits = vectors.astype(np.float64) @ self.weights.T.astype(np.float64) + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def turns_of(self, vectors: np.ndarray) -> list[tuple[int, ...]]:
        """For each descriptor, the clockwise turns its image is searched with: none when
        it looks upright, else those that undo its likely turns, likeliest first."""
        found: list[tuple[int, ...]] = []
        for p in self.probabilities(vectors):
            if p[0] >= self.cut:
                found.append(())
                continue
            order = [c for c in np.argsort(-p[1:]) + 1]
            keep = [c for n, c in enumerate(order) if n == 0 or p[c] >= VIEW_PROBABILITY]
            found.append(tuple((360 - 90 * int(c)) % 360 for c in keep))
        return found

    def with_recall(
        self, vectors: np.ndarray, labels: np.ndarray, recall: float
    ) -> OrientationProbe:
        """This probe with its cut set so that ``recall`` of the turned ``vectors``
        (``labels`` > 0) are flagged."""
        upright = self.probabilities(vectors[labels > 0])[:, 0]
        return replace(self, cut=float(np.quantile(upright, recall)))


def embed_turns(embedder: Embedder, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of each photo at 0, 90, 180 and 270 degrees clockwise, and each one's
    turn as a class (0-3)."""
    card = embedder.card
    vectors, labels = [], []
    for start in range(0, len(paths), 64):
        arrays = []
        for path in paths[start : start + 64]:
            try:
                upright = prepare(load_image(path, card.input_size).image, card)
            except ImageRejected:
                continue
            arrays += [turn_array(upright, t) for t in (0, 90, 180, 270)]
            labels += [0, 1, 2, 3]
        if arrays:
            vectors.append(embedder.embed_arrays(arrays))
    return np.vstack(vectors), np.array(labels)


def train(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression (4 classes) with weight decay: its weights (4, dim) and biases."""
    torch.manual_seed(SEED)
    x, y = torch.from_numpy(vectors), torch.from_numpy(labels)
    layer = torch.nn.Linear(vectors.shape[1], 4)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=WEIGHT_DECAY)
    for _ in range(STEPS):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        loss.backward()
        optimiser.step()
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


def rates(probe: OrientationProbe, vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Turned photos flagged (recall), upright ones flagged (false alarms), and turned
    photos whose own turn is among the views a flagged image gets."""
    turns = probe.turns_of(vectors)
    flagged = np.array([bool(t) for t in turns])
    undo = {1: 270, 2: 180, 3: 90}
    right = [undo[int(c)] in t for t, c in zip(turns, labels, strict=True) if c]
    return {
        "recall": float(flagged[labels > 0].mean()),
        "false_alarms": float(flagged[labels == 0].mean()),
        "right_view": float(np.mean(right)),
        "views_per_image": float(np.mean([len(t) for t in turns])),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orientation", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer photos")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = Report("orientation", args.quick)
    start = time.perf_counter()
    test = caltech_test()
    listing = CALTECH / "train.txt"
    if test is None or not listing.is_file():
        report.notes.append(missing_caltech_note("orientation probe"))
        save(report, args.out)
        return 0
    rng = random.Random(SEED)
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    n_train, n_held = (TRAIN_QUICK, HELD_OUT_QUICK) if args.quick else (TRAIN, HELD_OUT)
    train_paths = [CALTECH / line for line in rng.sample(lines, min(n_train, len(lines)))]
    test_paths = [p.path for p in rng.sample(test, min(n_held, len(test)))]
    uk_paths = sorted(UKBENCH.glob("ukbench*.jpg"))[:n_held]
    embedder = Embedder(load_descriptor("bundled"), device="cpu")
    sets = {"caltech train": train_paths, "caltech test": test_paths, "ukbench-dev": uk_paths}
    embedded = {name: embed_turns(embedder, paths) for name, paths in sets.items() if paths}
    weights, bias = train(*embedded["caltech train"])
    probe = OrientationProbe(weights, bias, 0.5, embedder.card.weights_sha256)
    probe = probe.with_recall(*embedded["caltech train"], TARGET_RECALL)
    for name, (vectors, labels) in embedded.items():
        found = rates(probe, vectors, labels)
        held = "" if name == "caltech train" else " (held out)"
        report.add(Figure(f"{name}{held}: turned photos flagged", found["recall"], "", "", 1.0))
        report.add(
            Figure(f"{name}{held}: upright photos flagged", found["false_alarms"], "", "", 0.0)
        )
        report.details[name] = {"photos": int((labels == 0).sum()), **found}
    report.details.update({"seed": SEED, "cut": probe.cut, "target_recall": TARGET_RECALL})
    report.notes.append(
        f"softmax over the four quarter-turns on the bundled descriptor; cut set for "
        f"{TARGET_RECALL} recall on the training photos; flagged = searched turned"
    )
    report.seconds = time.perf_counter() - start
    report.command = " ".join(["python -m benchmarks.orientation", *(argv or sys.argv[1:])])
    report.environment = environment()
    save(report, args.out)
    for f in report.figures:
        print(f"{f.name}: {f.value:.4g}")
    for name, found in report.details.items():
        print(name, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
