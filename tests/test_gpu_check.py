"""The GPU check runs unchanged everywhere: on a machine without CUDA it says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# pytest puts tests/ on sys.path, not the checkout root that holds benchmarks/.
sys.path.insert(0, str(ROOT))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check runs")
def test_gpu_check_skips_in_one_line_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [
        "gpu_check: skipped: torch sees no CUDA GPU on this machine"
    ]
    assert not out.exists()


def test_gpu_check_photos_are_photo_sized_and_deterministic() -> None:
    from benchmarks.gpu_check import photos

    first, second = photos(6, 160), photos(6, 160)
    assert [p.shape for p in first] == [(160, 160, 3)] * 6
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    assert len({p.tobytes() for p in first}) == 6
