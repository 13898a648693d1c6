"""Which model an index uses: the card recorded in its catalog, the weights a caller asks
for, and the embedder loaded to match, so that vectors of two models are never mixed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.model.card import NAMED_WEIGHTS, ModelCard
from ghostmatch.model.download import sha256_of
from ghostmatch.pathtext import path_text

if TYPE_CHECKING:
    from ghostmatch.model.descriptor import Descriptor
    from ghostmatch.model.embedder import Embedder
    from ghostmatch.model.exports import ExportedModel
    from ghostmatch.store.catalog import Catalog

CARD_META = "model_card"
WEIGHTS_META = "weights_spec"

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray


class ModelBinding:
    """The model of the index whose catalog is ``catalog``.

    ``weights`` names the model for a new index; an existing index always uses the model
    recorded in it, and naming a different one is refused (:meth:`check_request`).
    ``preloaded`` is ``weights`` already loaded (a new index checks the name before it
    creates anything).
    """

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        weights: str | None,
        *,
        runtime: str = "auto",
        device: str = "auto",
        preloaded: Descriptor | None = None,
    ) -> None:
        self.path = path
        self.catalog = catalog
        self.weights = weights
        self._runtime, self._device = runtime, device
        self._model = preloaded
        self._embedder: Embedder | None = None

    @property
    def card(self) -> ModelCard | None:
        """The model card of the vectors in this index (None before the first image)."""
        data = self.catalog.get_meta(CARD_META)
        return ModelCard.from_dict(data) if data else None

    def check_request(self) -> None:
        """Refuse weights other than the index's: a file counts as the same only when it
        is the recorded file or has the recorded sha256, never for its name alone."""
        stored = self.card
        if stored is None or self.weights is None:
            return
        spec = self.weights
        if spec in NAMED_WEIGHTS:
            if spec == stored.weights:
                return
        else:
            file = Path(spec).expanduser()
            recorded = self.catalog.get_meta(WEIGHTS_META)
            if recorded not in (None, *NAMED_WEIGHTS) and os.path.realpath(
                file
            ) == os.path.realpath(recorded):
                return
            try:
                digest = sha256_of(file) if file.is_file() else None
            except OSError as error:
                raise GhostmatchError(
                    f"cannot read weights file {path_text(file)}: {error.strerror}"
                ) from error
            if digest == stored.weights_sha256:
                return
        raise GhostmatchError(
            f"index {self.path} was built with weights {stored.weights!r} (sha256 "
            f"{stored.weights_sha256[:12]}), not {path_text(spec)!r}; "
            "leave weights unset to use the index's own model, or use another index for "
            "the other model"
        )

    @property
    def embedder(self) -> Embedder:
        """The model, loaded on first use with the index's own weights and preprocessing:
        on the CPU, from its cached exports where it can (``ghostmatch.model.exports``)."""
        if self._embedder is None:
            from ghostmatch.model.embedder import Embedder

            stored = self.card
            spec = self.weights
            if stored is not None:
                spec = self.catalog.get_meta(WEIGHTS_META) or stored.weights
                exported = self._exported(spec, stored)
                if exported is not None:
                    self._embedder = Embedder(exported, runtime=self._runtime, device="cpu")
                    return self._embedder
            preloaded = self._model if stored is None else None
            model = preloaded if preloaded is not None else self._loaded(spec, stored)
            self._model = None
            self._embedder = Embedder(model, runtime=self._runtime, device=self._device)
            if stored is None:
                with self.catalog.transaction() as tx:
                    tx.set_meta(CARD_META, model.card.to_dict())
                    tx.set_meta(WEIGHTS_META, weights_spec(spec, model.card))
        return self._embedder

    def _exported(self, spec: str, stored: ModelCard) -> ExportedModel | None:
        """The index's model run from its cached exports, without torch, where it runs on
        the CPU on ONNX Runtime (asked for, or the only device here: ``no_cuda_here``) and
        they are there (``exported_model``); else None."""
        from ghostmatch.model.exports import exported_model, no_cuda_here

        on_cpu = self._device == "cpu" or (self._device == "auto" and no_cuda_here())
        if not on_cpu or self._runtime not in ("auto", "onnx"):
            return None
        return exported_model(spec, stored, lambda: self._loaded(spec, stored))

    def _loaded(self, spec: str | None, stored: ModelCard | None) -> Descriptor:
        """The model ``spec`` names, loaded, which must be the one of the index's card
        ``stored`` (where it has one)."""
        from ghostmatch.model.weights import load_descriptor

        model = load_descriptor(spec)
        if stored is not None and only_learnt_p_differs(stored, model.card):
            stored = model.card
        if stored is not None and model.card.fingerprint != stored.fingerprint:
            raise GhostmatchError(
                f"the weights {spec!r} no longer match index {self.path} (its card: "
                f"{stored.describe()}; found: {model.card.describe()}); rebuild the "
                "index or restore the original weights file"
            )
        return model

    @contextlib.contextmanager
    def on_cpu(self) -> Iterator[bool]:
        """Within, the model runs on the CPU unless it is loaded already (yields whether it
        runs on the CPU). Loaded here where another device may be the one asked for, it is
        dropped after, so that later work loads it on that device (:func:`_drop`)."""
        if self._embedder is not None:
            yield self._embedder.device == "cpu"
            return
        asked = self._device
        self._device = "cpu"
        try:
            yield True
        finally:
            self._device = asked
            embedder = self._embedder
            if asked != "cpu" and embedder is not None and _drop(embedder, asked):
                self._embedder = None

    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Unit descriptors (n, dim) float32 for paths, PIL images or arrays."""
        from ghostmatch.model.embedder import prepare

        embedder = self.embedder
        arrays = [prepare(self._to_image(x), embedder.card) for x in images]
        return embedder.embed_arrays(arrays)

    def _to_image(self, x: ImageLike) -> Image.Image:
        if isinstance(x, Image.Image):
            return to_rgb(x)
        if isinstance(x, np.ndarray):
            return image_from_array(x)
        try:
            return load_image(x, min_side=self.embedder.card.input_size).image
        except ImageRejected as err:
            raise GhostmatchError(f"cannot read {os.fsdecode(x)}: {err}") from err


def _drop(embedder: Embedder, asked: str) -> bool:
    """Whether an embedder loaded on the CPU is dropped for work on device ``asked``."""
    from ghostmatch.model.exports import no_cuda_here

    if asked == "cuda":
        return True
    if no_cuda_here():
        return False
    if embedder.exported:
        return True  # torch is not loaded to tell
    import torch

    return bool(torch.cuda.is_available())


def only_learnt_p_differs(stored: ModelCard, loaded: ModelCard) -> bool:
    """True when ``loaded`` is ``stored``'s very file, whose card now reports GeM's learnt p
    instead of the starting value an older ghostmatch recorded: the vectors are the same,
    since p was always loaded from the file's bytes."""
    return (
        stored.weights_sha256 == loaded.weights_sha256
        and stored.gem_p != loaded.gem_p
        and stored.with_changes(gem_p=loaded.gem_p).fingerprint == loaded.fingerprint
    )


def weights_spec(spec: str | None, card: ModelCard) -> str:
    """What to load next time: a name, or the absolute path of a weights file."""
    if spec is None or spec in NAMED_WEIGHTS:
        return card.weights
    return os.path.abspath(spec)
