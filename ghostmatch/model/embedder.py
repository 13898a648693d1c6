"""Images in, unit descriptors out: preprocessing by the model card and a fast runtime."""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.card import ModelCard
from ghostmatch.model.exports import (
    ExportedModel,
    export_path,
    local_maps_tag,
    no_cuda_here,
    onnx_available,
)

if TYPE_CHECKING:
    from torch import nn

    from ghostmatch.model.descriptor import Descriptor
    from ghostmatch.model.scorenorm import ScoreNorm

RUNTIMES = ("auto", "torch", "onnx", "eager")
DEVICES = ("auto", "cpu", "cuda")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


def prepare(image: Image.Image, card: ModelCard) -> np.ndarray:
    """An RGB image as the uint8 (size, size, 3) array the model with ``card`` expects."""
    size = card.input_size
    resample = _RESAMPLE[card.interpolation]
    if card.resize == "squash":
        return np.asarray(image.resize((size, size), resample, reducing_gap=3.0))
    scaled = size / card.crop_fraction
    w, h = image.size
    ratio = scaled / min(w, h)
    new_w, new_h = max(size, round(w * ratio)), max(size, round(h * ratio))
    resized = image.resize((new_w, new_h), resample, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def to_batch(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack uint8 HWC arrays into the float32 NCHW batch in [0, 1] the model takes."""
    batch = np.stack(arrays).astype(np.float32) / 255.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def fuse_batchnorm(model: Descriptor) -> Descriptor:
    """A copy of ``model`` with every BatchNorm folded into the conv before it (eval only)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ghostmatch.model.ghostnet import ConvBnAct, GhostBottleneck, GhostNet

    fused = copy.deepcopy(model).eval()

    def fold_sequential(seq: nn.Sequential) -> None:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()

    for module in fused.modules():
        if isinstance(module, nn.Sequential):
            fold_sequential(module)
        elif isinstance(module, GhostNet):
            module.conv_stem = fuse_conv_bn_eval(module.conv_stem, module.bn1)
            module.bn1 = nn.Identity()  # type: ignore[assignment]
        elif isinstance(module, ConvBnAct):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn1)
            module.bn1 = nn.Identity()  # type: ignore[assignment]
        elif isinstance(module, GhostBottleneck) and module.conv_dw is not None:
            assert isinstance(module.conv_dw, nn.Conv2d)
            assert isinstance(module.bn_dw, nn.BatchNorm2d)
            module.conv_dw = fuse_conv_bn_eval(module.conv_dw, module.bn_dw)
            module.bn_dw = nn.Identity()
    return fused


def channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=...)``, which torch's type stubs do not declare."""
    import torch

    for param in model.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return model


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise GhostmatchError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu" or (device == "auto" and no_cuda_here()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise GhostmatchError("device cuda: torch sees no CUDA GPU; use device cpu")
    return device


class Embedder:
    """Runs a descriptor model on images with the card's preprocessing.

    Runtimes: ``eager`` (the model as loaded), ``torch`` (BatchNorm folded, channels_last,
    fp16 autocast on CUDA), ``onnx`` (ONNX Runtime on the exported folded model, cached by
    card), ``auto`` (onnx on CPU when onnxruntime imports, else torch).

    ``model`` may be an :class:`~ghostmatch.model.exports.ExportedModel` (an index's model
    whose exports are cached): it then runs on ONNX Runtime on the CPU, and torch is only
    loaded, with the model, for what the exports do not cover.
    """

    def __init__(
        self,
        model: Descriptor | ExportedModel,
        runtime: str = "auto",
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise GhostmatchError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.card: ModelCard = model.card
        self.device = resolve_device(device)
        self._exported: ExportedModel | None = None
        # The eager model, for what the runtimes do not export (local maps), and the copy
        # the runtimes run (folded and channels_last, but for ``eager``); made on first use
        # for an exported model.
        self._eager: Descriptor | None = None
        self._runtime_model: nn.Module | None = None
        if isinstance(model, ExportedModel):
            if self.device != "cpu" or runtime not in ("auto", "onnx"):
                raise GhostmatchError("an exported model runs on ONNX Runtime on the CPU only")
            self._exported, runtime = model, "onnx"
        else:
            self._eager = model
        if runtime == "auto":
            runtime = "onnx" if self.device == "cpu" and onnx_available() else "torch"
        if runtime == "onnx" and self.device != "cpu":
            runtime = "torch"
        self.runtime = runtime
        self.threads = threads or os.cpu_count() or 1
        self._session = None
        # Sessions on fewer threads, by their number (``embed_arrays``), made on first use.
        self._narrow_sessions: dict[int, Any] = {}
        self._narrow_lock = threading.Lock()
        # Made on first use: only indexing needs regions.
        self._regional_session: Any = None
        if self._exported is None:
            self._runtime_model = self._prepared(model)  # type: ignore[arg-type]
        if runtime == "onnx":
            self._session = self._onnx_session()

    def _prepared(self, model: Descriptor) -> nn.Module:
        """The copy of ``model`` this embedder's runtime runs, on its device."""
        if self.runtime == "eager":
            return model.to(self.device).eval()
        return channels_last(fuse_batchnorm(model).to(self.device))

    @property
    def exported(self) -> bool:
        """Whether this runs an exported model (see the class), torch loaded or not."""
        return self._exported is not None

    @property
    def model(self) -> Descriptor:
        """The eager model (loaded now for an exported one)."""
        if self._eager is None:
            assert self._exported is not None
            self._eager = self._exported.load()
        return self._eager

    @property
    def _model(self) -> nn.Module:
        """The copy of the model the runtime runs (made now for an exported one)."""
        if self._runtime_model is None:
            self._runtime_model = self._prepared(self.model)
        return self._runtime_model

    @property
    def score_norm(self) -> ScoreNorm | None:
        """The model's score background, if its file carries one (``model.scorenorm``)."""
        if self._exported is not None:
            return self._exported.score_norm
        return self.model.score_norm

    def _onnx_session(  # type: ignore[no-untyped-def]
        self, regional: bool = False, threads: int | None = None
    ):
        import onnxruntime as ort

        path = export_path(self.card, "regional" if regional else "descriptors")
        if not path.exists():
            if regional:
                from ghostmatch.model.regions import RegionalDescriptor

                regional_model = RegionalDescriptor(self._model, maps=True)  # type: ignore[arg-type]
                export_onnx(regional_model, self.card, path, ["descriptors", "regions", "maps"])
            else:
                export_onnx(self._model, self.card, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @property
    def local_model(self) -> Descriptor:
        """The torch model for local feature maps (which the descriptor's export leaves
        out): the folded, channels_last copy unless the runtime is ``eager``."""
        return self.model if self.runtime == "eager" else self._model  # type: ignore[return-value]

    @property
    def local_maps_model(self) -> Descriptor | ExportedModel:
        """:attr:`local_model`, or for an exported model not loaded yet, that model as an
        exported one, loaded only if the local maps' export must be made: what
        ``ghostmatch.dupes.verify.local_features`` takes."""
        if self._exported is not None and self._runtime_model is None:
            return replace(self._exported, load=lambda: self.local_model)
        return self.local_model

    @property
    def dim(self) -> int:
        return self.card.dim

    def embed_arrays(
        self, arrays: Sequence[np.ndarray], *, threads: int | None = None
    ) -> np.ndarray:
        """Descriptors (n, dim) float32 for uint8 HWC arrays from :func:`prepare`.
        ``threads``: run ONNX Runtime on at most this many (a session of its own, made on
        first use): for a few images at a time between other work, where idle threads
        would spin (on one thread of two busy cores the CPU time halves)."""
        if not arrays:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = to_batch(arrays)
        if self._session is not None:
            session = self._session
            if threads is not None and threads < self.threads:
                with self._narrow_lock:  # threads may ask for the same one at once
                    if threads not in self._narrow_sessions:
                        self._narrow_sessions[threads] = self._onnx_session(threads=threads)
                    session = self._narrow_sessions[threads]
            out = session.run(None, {"images": batch})[0]
            return np.ascontiguousarray(out, dtype=np.float32)
        import torch

        with torch.inference_mode():
            y = torch.nn.functional.normalize(self._run(self._model, batch).float(), dim=1)
        return np.ascontiguousarray(y.cpu().numpy(), dtype=np.float32)

    def _run(self, model: nn.Module, batch: np.ndarray) -> Any:
        """``model`` on ``batch`` (NCHW float32) on this embedder's device, channels-last
        unless eager, in fp16 autocast on CUDA; call under ``torch.inference_mode``."""
        import torch

        x = torch.from_numpy(batch).to(self.device)
        if self.runtime != "eager":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return model(x)
        return model(x)

    def embed_with_regions(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors (n, dim) and regional descriptors (n, REGIONS, dim), float32, from one
        pass of the model (``ghostmatch.model.regions``), for uint8 HWC arrays."""
        whole, parts, _ = self.embed_for_index(arrays)
        return whole, parts

    def embed_for_index(
        self, arrays: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`embed_with_regions`, and from the same pass the local maps (n, h, w, c)
        in float16 that a duplicate search would make of the same pixels on this machine
        (``ghostmatch.dupes.verify.local_features``): on the ONNX runtime, whose maps are
        those of the search's own session to the bit. None on the others."""
        from ghostmatch.model.regions import REGIONS

        if not arrays:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, np.zeros((0, REGIONS, self.dim), dtype=np.float32), None
        batch = to_batch(arrays)
        maps = None
        if self.runtime == "onnx":
            if self._regional_session is None:
                self._regional_session = self._onnx_session(regional=True)
            whole, parts, maps = self._regional_session.run(None, {"images": batch})
            maps = maps.astype(np.float16)
        else:
            import torch

            from ghostmatch.model.regions import RegionalDescriptor

            model = RegionalDescriptor(self._model)  # type: ignore[arg-type]
            with torch.inference_mode():
                w, r = self._run(model, batch)
                # Normalised again in fp32, as embed_arrays does (fp16 under autocast).
                whole = torch.nn.functional.normalize(w.float(), dim=1).cpu().numpy()
                parts = torch.nn.functional.normalize(r.float(), dim=2).cpu().numpy()
        return (
            np.ascontiguousarray(whole, dtype=np.float32),
            np.ascontiguousarray(parts, dtype=np.float32),
            maps,
        )

    @property
    def maps_made_by(self) -> str | None:
        """What :meth:`embed_for_index`'s local maps are tagged with where they are kept
        (``local_maps_tag``), None where it makes none."""
        return local_maps_tag(self.card) if self.runtime == "onnx" else None


def export_onnx(
    model: nn.Module,
    card: ModelCard,
    path: Path,
    outputs: Sequence[str] = ("descriptors",),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export ``model`` (the whole descriptor, normalise ... L2, unless another network is
    given) atomically, traced at the card's input size; ``outputs`` names the model's
    outputs (the regional model has two); ``dynamic_axes`` which axes may vary (default:
    the batch axis of the input and of each output)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    example = torch.zeros(2, 3, card.input_size, card.input_size)
    cpu_model = copy.deepcopy(model).cpu().float()
    for param in cpu_model.parameters():
        param.data = param.data.contiguous()
    with warnings.catch_warnings():
        # The regional model reads its map's size as plain ints: constants, as meant.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            cpu_model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=list(outputs),
            dynamic_axes=dynamic_axes
            or {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path
