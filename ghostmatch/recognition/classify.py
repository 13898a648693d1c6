"""The ImageNet classifier's own answer: the top ImageNet-1k classes of a photo, by name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.model.binding import ImageLike

# The 1000 ImageNet-1k class names in the order of the classifier's outputs (the list
# torchvision ships as its ImageNet categories), one per line.
CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
DEFAULT_TOP = 5


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The ImageNet-1k class names, index = classifier output."""
    names = tuple(CLASSES_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != 1000:
        raise GhostmatchError(f"{CLASSES_FILE} lists {len(names)} classes, not 1000")
    return names


@dataclass(frozen=True)
class ClassScore:
    """One class of a photo: its index in the classifier, name and softmax probability."""

    index: int
    name: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.index, "name": self.name, "probability": round(self.probability, 6)}


class Classifier:
    """A GhostNet with its ImageNet classifier head, run on CPU or CUDA with the
    preprocessing of its weights (224 px, bicubic, centre crop 0.875)."""

    def __init__(self, weights: str | os.PathLike[str] = "imagenet", device: str = "auto") -> None:
        import torch

        from ghostmatch.model.embedder import resolve_device
        from ghostmatch.model.weights import load_classifier

        network, self.card = load_classifier(os.fspath(weights))
        self.device = resolve_device(device)
        self.network = network.to(self.device).eval()
        self._torch = torch
        head = network.classifier
        outputs = head.out_features if isinstance(head, torch.nn.Linear) else 0
        if outputs != len(imagenet_classes()):
            raise GhostmatchError(
                f"the weights {os.fspath(weights)!r} classify into {outputs} classes, not the "
                "1000 ImageNet classes whose names ghostmatch knows"
            )

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(n, 1000) float32 classifier outputs before the softmax."""
        from ghostmatch.model.descriptor import Normalize
        from ghostmatch.model.embedder import prepare, to_batch

        torch = self._torch
        if not images:
            return np.zeros((0, len(imagenet_classes())), np.float32)
        batch = to_batch([prepare(self._image(x), self.card) for x in images])
        normalize = Normalize(self.card.mean, self.card.std).to(self.device)
        with torch.inference_mode():
            x = normalize(torch.from_numpy(batch).to(self.device))
            out = self.network(x).float().cpu().numpy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def classify(
        self, images: Sequence[ImageLike], top: int = DEFAULT_TOP
    ) -> list[list[ClassScore]]:
        """Each image's ``top`` classes, most probable first (ties: lower index)."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise GhostmatchError(f"the number of classes must be a whole number >= 1, not {top!r}")
        names = imagenet_classes()
        logits = self.logits(images).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        results: list[list[ClassScore]] = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[: min(top, len(names))]
            results.append([ClassScore(int(i), names[int(i)], float(row[i])) for i in order])
        return results

    @staticmethod
    def _image(x: ImageLike) -> Any:
        if isinstance(x, np.ndarray):
            return image_from_array(x)
        if not isinstance(x, str | os.PathLike):
            return to_rgb(x)
        try:
            # The centre crop's shorter side before cutting: input size / crop fraction.
            return load_image(x, min_side=256).image
        except ImageRejected as err:
            raise GhostmatchError(f"cannot read {os.fsdecode(x)}: {err}") from err
