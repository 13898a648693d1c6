"""What ghostmatch uses when nothing is named: the bundled weights, and the index folder
``$GHOSTMATCH_INDEX``, else the per-user data folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from platformdirs import user_data_dir

from ghostmatch.model.weights import default_weights, load_descriptor


def test_default_weights_are_the_measured_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Online too: ImageNet weights have no measured duplicate rule, so they are never
    # picked unasked.
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    assert default_weights() == "bundled"
    assert load_descriptor().card.weights == "bundled"
    monkeypatch.setenv("GHOSTMATCH_WEIGHTS", "random")
    assert default_weights() == "random"


def _index(folder: Path, env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "ghostmatch.cli.app", "index", str(folder), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_index_without_options_uses_the_default_folder_and_weights(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(GHOSTMATCH_OFFLINE="1", GHOSTMATCH_CACHE=str(tmp_path / "cache"))
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    # platformdirs decides where the per-user data folder is on each system.
    monkeypatch.setenv("XDG_DATA_HOME", env["XDG_DATA_HOME"])
    per_user = Path(user_data_dir("ghostmatch")) / "default"

    data = _index(folder, env)
    assert Path(data["index"]) == per_user
    assert (per_user / "catalog.db").is_file()
    assert "weights bundled" in data["model"] and data["added"] == 1

    configured = tmp_path / "configured"
    data = _index(folder, {**env, "GHOSTMATCH_INDEX": str(configured)})
    assert Path(data["index"]) == configured
    assert (configured / "catalog.db").is_file()
    assert "weights bundled" in data["model"] and data["added"] == 1
