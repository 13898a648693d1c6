"""One-command check of the CUDA paths against the CPU: ``python -m benchmarks.gpu_check``.

Checks, each against the CPU in the same run:
- the descriptor (folded, channels_last, fp16 autocast on CUDA) and the eager model: cosine
  of every image's descriptor with the CPU one;
- GhostNet against timm's ``ghostnet_100`` on CUDA, where timm imports;
- throughput at batch 256, CUDA against the CPU;
- faiss-gpu, where faiss sees a GPU: a Flat index searched on the GPU against the CPU (same
  ids) and the exact all-pairs search on the GPU against the CPU (same pairs).

Without a CUDA GPU it prints one line saying so and exits 0. Results go to
``--out`` (default ``benchmarks/results/gpu_check.json``); exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIN_COSINE = 0.999
BATCH = 256


def photos(n: int, size: int) -> list[np.ndarray]:
    """``n`` photo-like uint8 (size, size, 3) arrays: crops and flips of scikit-image's sample
    photos where it imports, smooth random fields otherwise."""
    rng = np.random.default_rng(0)
    sources: list[np.ndarray] = []
    try:
        from skimage import data

        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
            sources.append(np.asarray(getattr(data, name)())[..., :3])
    except Exception:  # any failure to load sample photos falls back to synthetic fields
        sources = []
    out = []
    for i in range(n):
        if sources:
            src = sources[i % len(sources)]
            h, w = src.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = src[top : top + side, left : left + side]
            if i % 2:
                crop = crop[:, ::-1]
        else:
            low = rng.random((8, 8, 3))
            crop = np.kron(low, np.ones((size // 8, size // 8, 1))) * 255
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(crop).astype(np.uint8)).convert("RGB")
        out.append(np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)))
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def check_descriptor(n: int) -> dict[str, Any]:
    from ghostmatch.model.embedder import Embedder
    from ghostmatch.model.weights import load_descriptor

    model = load_descriptor("bundled")
    arrays = photos(n, model.card.input_size)
    cpu = Embedder(load_descriptor("bundled"), runtime="torch", device="cpu").embed_arrays(arrays)
    result: dict[str, Any] = {"images": n, "weights": "bundled"}
    for runtime in ("torch", "eager"):
        gpu = Embedder(load_descriptor("bundled"), runtime=runtime, device="cuda")
        cos = _cosines(cpu, gpu.embed_arrays(arrays))
        result[runtime] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    result["ok"] = all(result[r]["min_cosine"] >= MIN_COSINE for r in ("torch", "eager"))
    return result


def check_timm() -> dict[str, Any]:
    try:
        import timm
    except Exception as err:  # timm is optional; any import failure means "not checked"
        return {"skipped": f"timm does not import ({type(err).__name__}: {err})"}
    from ghostmatch.model.ghostnet import GhostNet

    torch.manual_seed(0)
    reference = timm.create_model("ghostnet_100", pretrained=False).eval()
    ours = GhostNet(1.0).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(4, 3, 224, 224)
    result: dict[str, Any] = {"timm": timm.__version__}
    for device in ("cpu", "cuda"):
        with torch.no_grad():
            a, b = ours.to(device)(x.to(device)), reference.to(device)(x.to(device))
        result[f"{device}_max_abs_diff"] = float((a - b).abs().max())
    result["ok"] = max(result["cpu_max_abs_diff"], result["cuda_max_abs_diff"]) <= 1e-3
    return result


def check_throughput(cpu_images: int) -> dict[str, Any]:
    from ghostmatch.model.embedder import Embedder
    from ghostmatch.model.weights import load_descriptor

    card = load_descriptor("bundled").card
    arrays = photos(BATCH, card.input_size)
    gpu = Embedder(load_descriptor("bundled"), runtime="torch", device="cuda")
    cpu = Embedder(load_descriptor("bundled"), runtime="torch", device="cpu")
    gpu.embed_arrays(arrays)  # warm-up: cuDNN autotuning and the first allocations
    torch.cuda.synchronize()
    rounds = 10
    start = time.perf_counter()
    for _ in range(rounds):
        gpu.embed_arrays(arrays)
    torch.cuda.synchronize()
    gpu_rate = rounds * BATCH / (time.perf_counter() - start)
    small = arrays[:cpu_images]
    cpu.embed_arrays(small)
    start = time.perf_counter()
    cpu.embed_arrays(small)
    cpu_rate = len(small) / (time.perf_counter() - start)
    return {
        "batch": BATCH,
        "cuda_images_per_s": round(gpu_rate, 1),
        "cpu_images_per_s": round(cpu_rate, 1),
        "cpu_threads": torch.get_num_threads(),
        "speedup": round(gpu_rate / cpu_rate, 1),
        "note": "includes host-to-device copies of uint8 photos made float32 on the CPU",
    }


def check_faiss_gpu(n: int, dim: int) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss does not import"}
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        return {"skipped": "faiss sees no GPU (a faiss-cpu build): install faiss-gpu"}
    from ghostmatch.indexes.allpairs import brute_force_pairs, similar_pairs
    from ghostmatch.indexes.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 20, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    cpu, gpu = VectorIndex(dim, "Flat", device="cpu"), VectorIndex(dim, "Flat", device="cuda")
    cpu.add(ids, x)
    gpu.add(ids, x)
    _, cpu_ids = cpu.search(x[:1000], 10)
    _, gpu_ids = gpu.search(x[:1000], 10)
    same_ids = float(np.mean(cpu_ids == gpu_ids))
    # With a GPU visible, similar_pairs runs its exact search there; numpy is the reference.
    cpu_pairs = brute_force_pairs(x, 0.8)
    gpu_pairs = similar_pairs(x, 0.8)
    same_pairs = set(zip(cpu_pairs[0].tolist(), cpu_pairs[1].tolist(), strict=True)) == set(
        zip(gpu_pairs[0].tolist(), gpu_pairs[1].tolist(), strict=True)
    )
    return {
        "vectors": n,
        "on_gpu": gpu.on_gpu,
        "knn_same_ids": same_ids,
        "pairs": len(cpu_pairs[0]),
        "allpairs_same_as_brute_force": same_pairs,
        "ok": same_ids >= 0.999 and same_pairs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="photos for the cosine check")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped: torch sees no CUDA GPU on this machine")
        return 0
    report: dict[str, Any] = {
        "command": "python -m benchmarks.gpu_check",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "descriptor": check_descriptor(args.images),
        "timm_parity": check_timm(),
        "throughput": check_throughput(cpu_images=64),
        "faiss_gpu": check_faiss_gpu(20_000, 256),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print("gpu_check: " + ("FAILED: " + ", ".join(failed) if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
