"""What a set of descriptor weights needs to be used correctly; stored with every index."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How an image becomes the square model input:
#   "squash": resize the whole image to input_size x input_size (aspect changes, nothing is cut;
#             best for copy detection, where a crop would hide borders and overlays);
#   "center-crop": resize the shorter side to input_size / crop_fraction, then cut the centre
#             (the ImageNet evaluation protocol, best for recognition with ImageNet weights).
RESIZE_RULES = ("squash", "center-crop")
# Weights named rather than given as a file (``ghostmatch.model.weights.load_descriptor``).
NAMED_WEIGHTS = ("imagenet", "bundled", "random")
POOLINGS = ("gem", "avg", "head")
# The card extras of a model file that carries a score background (ghostmatch.model.scorenorm
# reads them; they live here so that this light module can tell without importing faiss).
SCORE_NORM_RANK_KEY = "score_norm_rank"
SCORE_NORM_BETA_KEY = "score_norm_beta"


@dataclass(frozen=True)
class ModelCard:
    """Architecture, weights and preprocessing of a descriptor model.

    Two descriptors are comparable only when their cards have the same ``fingerprint``;
    the runtime (torch, ONNX) is deliberately not part of it.
    """

    weights: str
    weights_sha256: str
    architecture: str = "ghostnet"
    width: float = 1.0
    input_size: int = 224
    resize: str = "squash"
    crop_fraction: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "gem"
    gem_p: float = 3.0
    projection: str = "none"
    dim: int = 960
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, not {self.resize!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short hash of everything that changes the vectors (made once: every local map
        asks for it, and copying ``extra``, a score background among others, cost
        a millisecond each time)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))

    @property
    def normalised_scores(self) -> bool:
        """Whether the model file carries a score background (``ghostmatch.model.scorenorm``), so
        that duplicate scores are background-normalised rather than plain cosines."""
        return SCORE_NORM_RANK_KEY in self.extra

    def describe(self) -> str:
        """One line for humans: which weights and how they see an image."""
        scores = ", background-normalised duplicate scores" if self.normalised_scores else ""
        return (
            f"{self.architecture} {self.width}x, weights {self.weights} "
            f"({self.weights_sha256[:12]}), {self.input_size}px {self.resize}, "
            f"{self.pooling} pooling, {self.dim}-d{scores}"
        )

    def with_changes(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)
