"""``ghostmatch label``, ``recognize``, ``classify`` and ``eval recognition`` run as the
real command on real photos with the random model, and the ImageNet classifier's code path
on random weights (never the network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_support import ok, run_cli
from sqlalchemy import URL

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import load_image
from ghostmatch.model.descriptor import Normalize
from ghostmatch.model.embedder import prepare, to_batch
from ghostmatch.model.ghostnet import GhostNet
from ghostmatch.recognition.classify import CLASSES_FILE, Classifier, imagenet_classes

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]

CLASSES = {
    "cats": ("chelsea.jpg", "cat.jpg"),
    "space": ("astronaut.jpg", "rocket.jpg", "hubble_deep_field.jpg"),
    "things": ("coffee.jpg", "camera.png"),
}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def classes(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    for cls, names in CLASSES.items():
        (root / cls).mkdir()
        for name in names:
            shutil.copy2(photos / name, root / cls / name)
    return root


def test_label_recognize_info_and_clear(
    classes: Path, tmp_path: Path, model_cache: Path, photos: Path
) -> None:
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="random") as lib:  # in process: one start-up less
        lib.index([classes])
    # Nothing labelled yet: one line that says what to do.
    line = one_line_error(run_cli(["recognize", photos / "cat.jpg", "--index", index], model_cache))
    assert "label" in line

    labelled = json.loads(
        ok(
            run_cli(["label", "--from-folders", classes, "--index", index, "--json"], model_cache)
        ).stdout
    )
    # skimage's cat is chelsea: one content, one label for both files.
    assert labelled["photos"] == 7 and labelled["added"] == 6
    assert labelled["labels"]["space"] == {"photos": 3, "indexed": 3}
    assert labelled["calibration"]["n_labelled"] == 7

    csv_file = tmp_path / "more.csv"
    csv_file.write_text(f"path,label\n{classes / 'cats' / 'cat.jpg'},pet\nmissing.jpg,pet\n")
    more = ok(run_cli(["label", "--csv", csv_file, "--index", index], model_cache)).stdout
    assert "4 labels, given 7 times to indexed photos" in more
    assert "labelled 1 photos: 1 new labels" in more
    assert "1 paths are not in the index" in more and "missing.jpg" in more

    queries = [classes / "cats" / "cat.jpg", photos / "coffee.jpg"]
    answers = json.loads(
        ok(
            run_cli(
                ["recognize", *queries, "-k", "3", "--index", index, "--json"],
                model_cache,
            )
        ).stdout
    )
    assert [a["query"] for a in answers] == [
        os.fsdecode(classes / "cats" / "cat.jpg"),
        os.fsdecode(photos / "coffee.jpg"),
    ]
    for answer in answers:
        assert set(answer) >= {"query", "label", "confidence", "alternatives", "neighbours"}
        assert len(answer["neighbours"]) == 3
        assert all(set(n) >= {"path", "label", "score"} for n in answer["neighbours"])
        assert all(set(a) == {"label", "score"} for a in answer["alternatives"])
        # Neither the indexed query nor coffee.jpg's indexed copy votes for itself.
        assert answer["query"].rsplit("/", 1)[-1] not in {
            n["path"].rsplit("/", 1)[-1] for n in answer["neighbours"]
        }
    table = ok(run_cli(["recognize", photos / "rocket.jpg", "--index", index], model_cache)).stdout
    assert "confidence" in table

    text = ok(run_cli(["info", "--index", index], model_cache)).stdout
    assert "label        1 pet" in text and "label        3 space" in text

    cleared = ok(run_cli(["label", "--clear", "--index", index, "--json"], model_cache)).stdout
    assert json.loads(cleared)["removed"] == 7 and json.loads(cleared)["labels"] == {}


def test_label_recognize_and_classify_on_a_shared_catalog(
    classes: Path, tmp_path: Path, model_cache: Path, photos: Path, catalog_url: URL
) -> None:
    """Folders that never indexed anything reach the index through the catalog named by
    --catalog or $GHOSTMATCH_CATALOG, as every other command does."""
    url = catalog_url.render_as_string(hide_password=False)
    with ghostmatch.open(tmp_path / "indexer", catalog=url, weights="random") as lib:
        lib.index([classes])
    labelled = ok(
        run_cli(
            [
                "label",
                "--from-folders",
                classes,
                "--json",
                "--index",
                tmp_path / "a",
                "--catalog",
                url,
            ],
            model_cache,
        )
    )
    assert json.loads(labelled.stdout)["labels"]["space"] == {"photos": 3, "indexed": 3}
    answers = json.loads(
        ok(
            run_cli(
                [
                    "recognize",
                    photos / "rocket.jpg",
                    "-k",
                    "3",
                    "--index",
                    tmp_path / "b",
                    "--json",
                ],
                model_cache,
                GHOSTMATCH_CATALOG=url,
            )
        ).stdout
    )
    assert answers[0]["best"] in CLASSES and len(answers[0]["neighbours"]) == 3
    # classify runs the index's own weights (here random ones, which have a classifier).
    [classified] = json.loads(
        ok(
            run_cli(
                ["classify", photos / "coffee.jpg", "--index", tmp_path / "c", "--json"],
                model_cache,
                GHOSTMATCH_CATALOG=url,
            )
        ).stdout
    )
    assert len(classified["classes"]) == 5
    # Without the catalog, a new folder holds no index: the option is what found it.
    line = one_line_error(
        run_cli(["recognize", photos / "rocket.jpg", "--index", tmp_path / "b2"], model_cache)
    )
    assert "no index at" in line


def test_label_mistakes_are_one_line(tmp_path: Path, model_cache: Path, classes: Path) -> None:
    line = one_line_error(run_cli(["label", "--index", tmp_path / "none"], model_cache))
    assert "nothing to do" in line
    both = ["label", "--from-folders", classes, "--csv", tmp_path / "x.csv"]
    assert "one of" in one_line_error(run_cli(both, model_cache))


SPLIT = ("--unknown-classes", "1", "--json")


def test_eval_recognition_reports_open_set_figures(classes: Path, model_cache: Path) -> None:
    result = ok(
        run_cli(
            [*("eval", "recognition", classes, "--weights", "random", "-k", "2"), *SPLIT],
            model_cache,
        )
    )
    data = json.loads(result.stdout)
    assert len(data["known_classes"]) == 2 and len(data["unknown_classes"]) == 1
    assert data["n_labelled"] + data["n_known_queries"] + data["n_unknown_queries"] == 7
    for key in ("top1", "coverage", "auroc", "known_accuracy_at_95", "threshold"):
        assert key in data


# ---------------------------------------------------------------------------- classify


def test_the_class_list_is_imagenet_s_thousand_names_in_order() -> None:
    names = imagenet_classes()
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[1], names[281], names[999]) == (
        "tench",
        "goldfish",
        "tabby",
        "toilet tissue",
    )
    assert CLASSES_FILE.read_text(encoding="utf-8").endswith("toilet tissue\n")


def test_classify_gives_the_network_s_top_classes_by_name(photos: Path) -> None:
    classifier = Classifier("random", device="cpu")
    images = [photos / "chelsea.jpg", photos / "camera.png"]
    results = classifier.classify(images, top=5)
    assert [len(r) for r in results] == [5, 5]
    # The same logits as the network itself on the preprocessed batch.
    batch = to_batch([prepare(load_image(p, min_side=256).image, classifier.card) for p in images])
    with torch.inference_mode():
        logits = classifier.network(
            Normalize(classifier.card.mean, classifier.card.std)(torch.from_numpy(batch))
        )
    assert tuple(logits.shape) == (2, 1000)
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    for row, classes in zip(probabilities, results, strict=True):
        top = np.argsort(-row, kind="stable")[:5]
        assert [c.index for c in classes] == top.tolist()
        assert [c.name for c in classes] == [imagenet_classes()[i] for i in top]
        np.testing.assert_allclose([c.probability for c in classes], row[top], rtol=1e-5)
        assert [c.probability for c in classes] == sorted(
            (c.probability for c in classes), reverse=True
        )
    assert classifier.card.input_size == 224 and classifier.card.resize == "center-crop"


def test_weights_without_a_classifier_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GhostmatchError, match="without a classifier"):
        Classifier("bundled")
    headless = tmp_path / "headless.pth"
    state = GhostNet(1.0, num_classes=1000).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, headless)
    with pytest.raises(GhostmatchError, match="no classifier head"):
        Classifier(headless)


def test_a_timm_checkpoint_file_classifies_with_its_own_head(tmp_path: Path, photos: Path) -> None:
    # The layout of timm's ghostnet_100 file, which weights imagenet downloads.
    torch.manual_seed(3)
    network = GhostNet(1.0, num_classes=1000).eval()
    file = tmp_path / "ghostnet_100.pth"
    torch.save({"state_dict": network.state_dict()}, file)
    classifier = Classifier(file, device="cpu")
    assert classifier.card.weights == file.name and classifier.card.crop_fraction == 0.875
    image = photos / "rocket.jpg"
    with torch.inference_mode():
        expected = network(
            torch.from_numpy(
                to_batch([prepare(load_image(image, min_side=256).image, classifier.card)])
            )
            .sub(torch.tensor(classifier.card.mean).view(1, 3, 1, 1))
            .div(torch.tensor(classifier.card.std).view(1, 3, 1, 1))
        )
    np.testing.assert_allclose(classifier.logits([image]), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_classify_command_prints_json(photos: Path, model_cache: Path) -> None:
    result = ok(
        run_cli(
            ["classify", photos / "coffee.jpg", "--weights", "random", "-k", "3", "--json"],
            model_cache,
        )
    )
    [answer] = json.loads(result.stdout)
    assert answer["query"] == os.fsdecode(photos / "coffee.jpg")
    assert [set(c) for c in answer["classes"]] == [{"class", "name", "probability"}] * 3
    assert all(c["name"] == imagenet_classes()[c["class"]] for c in answer["classes"])


def test_imagenet_classify_downloads_the_pinned_file_and_keeps_its_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photos: Path
) -> None:
    # The hub served locally, as the weights tests do, with a made timm-layout file.
    import hashlib
    from dataclasses import replace

    from safetensors.torch import save_file
    from test_weights import _Hub

    import ghostmatch.model.weights as weights

    torch.manual_seed(7)
    network = GhostNet(1.0, num_classes=1000).eval()
    file = tmp_path / "made.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(file))
    payload = file.read_bytes()
    pinned = weights.IMAGENET.file
    server = _Hub(pinned.repo_id, pinned.revision, pinned.filename, payload)
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(
        weights, "IMAGENET", replace(weights.IMAGENET, file=replace(pinned, sha256=digest))
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    try:
        classifier = Classifier("imagenet", device="cpu")
    finally:
        server.close()
    assert classifier.card.weights == "imagenet" and classifier.card.weights_sha256 == digest
    assert torch.equal(classifier.network.classifier.weight, network.classifier.weight)
    [classes] = classifier.classify([photos / "coffee.jpg"])
    assert len(classes) == 5
