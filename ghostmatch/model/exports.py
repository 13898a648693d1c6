"""A model's cached ONNX exports, and the model run from them alone: a duplicate search or
a query on the CPU of an index whose exports are cached needs no torch, whose import is
2.2-3.4 seconds of their start-up here (``README.md``, Duplicates and Query).

Nothing here imports torch: the torch model behind an export is loaded only when asked
for (``ExportedModel.load``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from platformdirs import user_cache_dir

from ghostmatch.model.card import NAMED_WEIGHTS, ModelCard

if TYPE_CHECKING:
    from ghostmatch.model.descriptor import Descriptor
    from ghostmatch.model.scorenorm import ScoreNorm

# Bumped whenever the exported graph changes but not its maths, so that a cached export of
# the same model is made again: 2 holds no whole-tensor Slice after a Ghost module's Concat
# (ONNX Runtime copies one: a 256 px local map took 11.5 ms with them, 10.3 without).
EXPORT_VERSION = 2
# Stage of GhostNet after which the feature map has stride 16 (10 x 10 at 160 px).
STRIDE16_STAGE = 7
# Bumped whenever the regional windows change (``ghostmatch.model.regions``): stored
# regional vectors of another version are not comparable, and a cached ONNX export of the
# regional model is named by it.
REGION_VERSION = 1
BUNDLED_PATH = Path(__file__).parent / "bundled.safetensors"
# The parts of a model exported on their own (``export_path``), and what each one's file
# adds to the export's name.
_PARTS = {
    "descriptors": "",
    "regional": f"-regions{REGION_VERSION}-local{STRIDE16_STAGE}",
    "local": f"-local{STRIDE16_STAGE}",
}


def cache_dir() -> Path:
    """Where downloaded weights and exports live (``GHOSTMATCH_CACHE`` overrides)."""
    return Path(os.environ.get("GHOSTMATCH_CACHE") or user_cache_dir("ghostmatch"))


def no_cuda_here() -> bool:
    """Whether this machine certainly has no CUDA device, told without importing torch:
    macOS never has one, and Linux none without the NVIDIA driver (``/dev/nvidiactl``,
    ``/proc/driver/nvidia``). Elsewhere, and wherever the driver is, torch is asked."""
    if sys.platform == "darwin":
        return True
    if sys.platform.startswith("linux"):
        return not any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia"))
    return False


def onnx_available() -> bool:
    """Whether ONNX Runtime imports here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_name(card: ModelCard) -> str:
    """The stem of a cached ONNX export of the model with ``card``."""
    return f"{card.fingerprint}-x{EXPORT_VERSION}"


def local_maps_tag(card: ModelCard) -> str:
    """Names the local maps of the model with ``card`` as ONNX Runtime makes them on the CPU,
    at the card's input size: a kept map stands in for a duplicate search's own only where
    the search would make it there too."""
    return f"{export_name(card)}-local{STRIDE16_STAGE}-onnx"


def export_path(card: ModelCard, part: str = "descriptors") -> Path:
    """Where the export of one part of the model with ``card`` is cached: ``descriptors``
    (the whole descriptor), ``regional`` (the regional model with its local maps, for
    indexing) or ``local`` (the local maps alone, the duplicate check's geometric stage)."""
    return cache_dir() / "onnx" / f"{export_name(card)}{_PARTS[part]}.onnx"


@dataclass(frozen=True, eq=False)
class ExportedModel:
    """A descriptor model known by its card and score background, run from its cached
    exports; ``load`` gives the torch model it stands for, for what they do not cover."""

    card: ModelCard
    score_norm: ScoreNorm | None
    load: Callable[[], Descriptor]


def exported_model(
    spec: str, card: ModelCard, load: Callable[[], Descriptor]
) -> ExportedModel | None:
    """The model of an index with ``card``, whose weights ``spec`` names, run from its
    exports without torch: only where ONNX Runtime is installed, the descriptor's export
    is cached, and ``spec`` is a safetensors file (or the bundled model) whose bytes are
    those the card was made from (its sha256), so that loading it would give this very
    card. None otherwise: the caller loads the model itself. (A part not exported yet,
    the local maps before a first duplicate search, loads torch and the model to export
    it, once.)"""
    from safetensors import SafetensorError

    from ghostmatch.model.download import sha256_of

    if spec == "bundled":
        path = BUNDLED_PATH
    elif spec in NAMED_WEIGHTS:
        return None
    else:
        path = Path(spec).expanduser()
    if path.suffix != ".safetensors" or not onnx_available():
        return None
    if not export_path(card).is_file():
        return None
    try:
        if not path.is_file() or sha256_of(path) != card.weights_sha256:
            return None
        score_norm = _score_norm(path, card)
    except (OSError, ValueError, TypeError, SafetensorError):
        return None  # loaded the usual way, which says what is wrong with the file
    return ExportedModel(card, score_norm, load)


def _score_norm(path: Path, card: ModelCard) -> ScoreNorm | None:
    """The score background a ghostmatch safetensors file carries, as loading the model
    reads it (``ghostmatch.model.weights.load_descriptor``), or None."""
    import numpy as np
    from safetensors import safe_open

    from ghostmatch.model.scorenorm import BACKGROUND_KEY, from_tensors

    with safe_open(str(path), framework="numpy") as f:
        if BACKGROUND_KEY not in f.keys():  # noqa: SIM118 - a safetensors handle
            return None
        background = f.get_tensor(BACKGROUND_KEY)
    return from_tensors(np.asarray(background, np.float32), card.extra)
