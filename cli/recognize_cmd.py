"""``ghostmatch label``, ``recognize`` and ``classify``: parse, wire, print.

Labels and recognition live in ``ghostmatch.recognition``. This module does not import
``app`` (which imports it to register the commands); the consoles come from
``ghostmatch.cli.output``, the opening of an index from ``ghostmatch.cli.opening``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import (
    Progress,
)
from rich.table import Table
from rich.text import Text

from ghostmatch.cli.opening import open_library
from ghostmatch.cli.output import (
    CatalogOpt,
    IndexOpt,
    JsonOpt,
    err,
    out,
    print_json,
    progress_columns,
)
from ghostmatch.errors import GhostmatchError
from ghostmatch.pathtext import path_text

T = TypeVar("T")


@contextmanager
def _each(items: Sequence[Path], label: str, show: bool) -> Iterator[Callable[[], None]]:
    """A progress bar with rate and ETA on stderr over ``items``; ``advance()`` per item."""
    if not show or len(items) < 2:
        yield lambda: None
        return
    with Progress(*progress_columns(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=len(items), rate="")

        def advance() -> None:
            bar.advance(task)
            elapsed = bar.tasks[task].elapsed or 0.0
            done = bar.tasks[task].completed
            bar.update(task, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")

        yield advance


def _map(items: Sequence[Path], work: Callable[[Path], T], label: str, show: bool) -> list[T]:
    results: list[T] = []
    with _each(items, label, show) as advance:
        for item in items:
            results.append(work(item))
            advance()
    return results


# Photos embedded at once by ``recognize``: most of one model call's overhead shared,
# while the progress bar still moves.
RECOGNIZE_BATCH = 16


def _batched(
    items: Sequence[Path], work: Callable[[Sequence[Path]], list[T]], show: bool
) -> list[T]:
    results: list[T] = []
    with _each(items, "recognising", show) as advance:
        for start in range(0, len(items), RECOGNIZE_BATCH):
            chunk = items[start : start + RECOGNIZE_BATCH]
            results.extend(work(chunk))
            for _ in chunk:
                advance()
    return results


def label(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Photos (or folders) to give --label, or with --clear to unlabel."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--label", help="The label for PATHS; with --clear, drop only this label."),
    ] = None,
    from_folders: Annotated[
        Path | None,
        typer.Option(
            "--from-folders",
            help="Label each indexed photo under DIR by its first sub-folder there.",
        ),
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="CSV with a path,label header (paths relative to the CSV or absolute; a "
            "path on several rows gets several labels).",
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Named photos lose the labels they had first.")
    ] = False,
    clear: Annotated[
        bool,
        typer.Option("--clear", help="Remove labels: of PATHS, or of every photo."),
    ] = False,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate", help="Choose the unknown threshold again (done on every change)."
        ),
    ] = False,
    precision: Annotated[
        float | None,
        typer.Option(
            "--precision",
            help="Precision the unknown threshold aims at, leave-one-out (default: as "
            "stored, else 0.95); recalibrates.",
        ),
    ] = None,
    index: IndexOpt = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Label indexed photos (by content: labels survive re-indexing and moves)."""
    from ghostmatch.recognition.labels import read_label_csv

    sources = [bool(paths) and not clear, from_folders is not None, csv_file is not None, clear]
    if sum(sources) > 1:
        raise GhostmatchError("give one of PATHS --label NAME, --from-folders, --csv or --clear")
    if sum(sources) == 0 and not (recalibrate or precision is not None):
        raise GhostmatchError(
            "nothing to do: give PATHS --label NAME, --from-folders DIR, --csv FILE, --clear "
            "or --recalibrate"
        )
    if paths and not clear and name is None:
        raise GhostmatchError("give the label for these photos with --label NAME")
    if name is not None and not paths and not clear:
        raise GhostmatchError(
            "--label names the label of PATHS (or, with --clear, the one to drop)"
        )
    if from_folders is not None and not from_folders.is_dir():
        raise GhostmatchError(f"{path_text(from_folders)} is not a folder")
    lib = open_library(index, catalog=catalog, create=False)
    result: dict[str, Any] = {"index": os.fsdecode(lib.path)}
    try:
        if clear:
            result["removed"] = lib.remove_labels(paths or None, name)
        elif from_folders is not None or csv_file is not None or paths:
            if csv_file is not None:
                wanted: Any = read_label_csv(csv_file)
            elif from_folders is not None:
                wanted = from_folders
            else:
                wanted = {path: [name] for path in paths or []}
            result.update(lib.set_labels(wanted, replace=replace).to_dict())
        if recalibrate or precision is not None:
            with _labels_needed(lib.path):
                lib.calibrate_recognition(precision)
        counts = lib.info()["labels"]
        calibration = lib.recognizer.calibration() if counts and _any_indexed(counts) else None
    finally:
        lib.close()
    result["labels"] = counts
    result["calibration"] = calibration.to_dict() if calibration is not None else None
    if as_json:
        print_json(result)
        return
    if clear:
        out.print(f"removed {result['removed']} labels")
    if "photos" in result:
        out.print(
            f"labelled {result['photos']} photos: {result['added']} new labels"
            + (f", {result['removed']} replaced" if result.get("removed") else "")
        )
        missing = result["not_indexed"]
        if missing:
            out.print(f"{len(missing)} paths are not in the index (index them first):")
            for path in missing[:20]:
                out.print(f"  {path_text(path)}", markup=False)
            if len(missing) > 20:
                out.print(f"  ... and {len(missing) - 20} more")
    out.print(f"{len(counts)} labels, given {_total(counts)} times to indexed photos")
    if calibration is not None:
        _print_calibration(calibration)


@contextmanager
def _labels_needed(index: Path) -> Iterator[None]:
    """The command line's own answer when nothing is labelled yet."""
    from ghostmatch.recognition.labels import NoLabelsError

    try:
        yield
    except NoLabelsError:
        raise GhostmatchError(
            f"no photo of {path_text(index)} carries a label; label some first, e.g. "
            "ghostmatch label --from-folders DIR (one sub-folder per class)"
        ) from None


def _any_indexed(counts: dict[str, dict[str, int]]) -> bool:
    return any(c["indexed"] for c in counts.values())


def _total(counts: dict[str, dict[str, int]]) -> int:
    return sum(c["indexed"] for c in counts.values())


def _print_calibration(c: Any) -> None:
    out.print(
        f"unknown below confidence {c.threshold:.4f}: leave-one-out on {c.n_queries} of the "
        f"{c.n_labelled} labelled photos it answers {c.coverage:.0%} of them and "
        f"{c.unknown_accepted:.0%} of them posing as an unknown class, with precision "
        f"{c.precision:.3f} (target {c.target_precision:.3f}); top-1 without it {c.top1:.3f}"
    )
    if not c.met:
        out.print(
            f"the target precision {c.target_precision:.3f} is out of reach on these labels; "
            "this is the most precise threshold (label more photos, or lower --precision)"
        )


def recognize(
    images: Annotated[
        list[Path], typer.Argument(help="Photos to recognise (need not be indexed).")
    ],
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, help="Nearest labelled photos that vote.")
    ] = 20,
    index: IndexOpt = None,
    catalog: CatalogOpt = None,
    runtime: Annotated[
        str, typer.Option("--runtime", help="auto, torch, onnx or eager (the model as loaded).")
    ] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    neighbours: Annotated[
        int, typer.Option("--neighbours", min=0, help="Neighbours shown per photo (table).")
    ] = 3,
    as_json: JsonOpt = False,
) -> None:
    """What each IMAGE shows, by a vote of its nearest labelled photos (or `unknown`)."""
    for image in images:
        if not image.exists():
            raise GhostmatchError(f"{path_text(image)} does not exist")
    lib = open_library(index, catalog=catalog, runtime=runtime, device=device, create=False)
    try:
        show = not as_json and err.is_terminal
        with _labels_needed(lib.path):
            results = _batched(images, lambda chunk: lib.recognize_many(chunk, k), show)
    finally:
        lib.close()
    if as_json:
        print_json(
            [
                {"query": os.fsdecode(image), **r.to_dict()}
                for image, r in zip(images, results, strict=True)
            ]
        )
        return
    table = Table()
    for column in ("query", "label", "confidence", "runner-up", "nearest labelled photos"):
        justify = "right" if column == "confidence" else "left"
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for image, r in zip(images, results, strict=True):
        runner = ", ".join(f"{name} {score:.2f}" for name, score in r.alternatives[:2])
        near = Text()
        for i, n in enumerate(r.neighbours[:neighbours]):
            near.append(("\n" if i else "") + f"{n.score:.3f} {'/'.join(n.labels)} ")
            near.append(path_text(n.path))
        shown = r.label if r.label == r.best else f"{r.label} ({r.best}?)"
        table.add_row(Text(path_text(image)), shown, f"{r.confidence:.3f}", runner, near)
    out.print(table)


def classify(
    images: Annotated[list[Path], typer.Argument(help="Photos to classify.")],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="imagenet or a timm GhostNet checkpoint with its classifier (default: the "
            "weights of the index named by --index or --catalog, else imagenet).",
        ),
    ] = None,
    top: Annotated[int, typer.Option("-k", "--top", min=1, help="Classes per photo.")] = 5,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Classify with this index's weights (see --weights)."),
    ] = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The top ImageNet-1k classes of each IMAGE by the network's own classifier."""
    from ghostmatch.recognition.classify import Classifier

    for image in images:
        if not image.exists():
            raise GhostmatchError(f"{path_text(image)} does not exist")
    if weights is None and (index is not None or catalog is not None):
        # Only an index named here: one that happens to sit at the default place may
        # hold a descriptor without a classifier, and classify needs no index.
        lib = open_library(index, catalog=catalog, create=False)
        try:
            weights = lib.classifier_weights()
        finally:
            lib.close()
    classifier = Classifier(weights or "imagenet", device=device)
    show = not as_json and err.is_terminal
    results = _map(images, lambda image: classifier.classify([image], top)[0], "classifying", show)
    if as_json:
        print_json(
            [
                {"query": os.fsdecode(image), "classes": [c.to_dict() for c in classes]}
                for image, classes in zip(images, results, strict=True)
            ]
        )
        return
    for image, classes in zip(images, results, strict=True):
        table = Table(title=Text(path_text(image)), title_justify="left")
        for column in ("rank", "probability", "class"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for rank, c in enumerate(classes, start=1):
            table.add_row(str(rank), f"{c.probability:.3f}", f"{c.name} ({c.index})")
        out.print(table)


def register(app: typer.Typer) -> None:
    """Add ``label``, ``recognize`` and ``classify`` to the main command."""
    app.command("label")(label)
    app.command("recognize")(recognize)
    app.command("classify")(classify)
