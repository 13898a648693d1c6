"""Query descriptors averaged over views of the query image: its mirror image and, for
``multiscale``, the image at other input sizes (the indexed vectors stay as they are)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ghostmatch.model.embedder import Embedder, prepare, to_batch

# Input sizes of the extra views, as multiples of the model's own; rounded to the stride.
SCALES = (0.8, 1.3)


def augmented(embedder: Embedder, image: Image.Image, vector: np.ndarray, how: str) -> np.ndarray:
    """``vector`` (the image's own descriptor) averaged with the descriptors of the views
    ``how`` names (``flip`` or ``multiscale``), as a unit vector."""
    if how == "none":
        return vector
    views = [vector, embedder.embed_arrays([prepare(ImageOps.mirror(image), embedder.card)])[0]]
    if how == "multiscale":
        # The exported runtimes are fixed to the input size; GeM pooling is not, so the
        # torch model takes the other sizes.
        import torch

        model = embedder.local_model
        device = next(model.parameters()).device
        for scale in SCALES:
            size = max(32, round(embedder.card.input_size * scale / 32) * 32)
            pixels = to_batch([prepare(image, embedder.card.with_changes(input_size=size))])
            with torch.inference_mode():
                out = model(torch.from_numpy(pixels).to(device)).float().cpu().numpy()
            views.append(out[0])
    total = np.sum(views, axis=0)
    return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)
