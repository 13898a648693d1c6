"""``ghostmatch eval retrieval|dupes|recognition`` and ``ghostmatch calibrate``: parse, wire, print.

The measuring lives in ``ghostmatch.eval.evaluation``. This module does not import ``app`` (which
imports it to register the commands); the consoles come from ``ghostmatch.cli.output``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ghostmatch.cli.output import CatalogOpt, JsonOpt, err, out, print_json
from ghostmatch.errors import GhostmatchError
from ghostmatch.pathtext import path_text

if TYPE_CHECKING:
    from ghostmatch.library import Library

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure retrieval and duplicate detection on labelled photos.",
)

FolderArg = Annotated[Path, typer.Argument(help="The labelled photos.")]
IndexOpt = Annotated[
    Path | None,
    typer.Option(
        "--index", help="Index folder to create or reuse (default: a temporary one, deleted)."
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="imagenet, bundled, random or a checkpoint file, for a new index "
        "(default: as `ghostmatch index`).",
    ),
]


@eval_app.command("retrieval")
def retrieval(
    folder: FolderArg,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV of path,label (paths relative to the CSV) "
            "(default: the first folder below FOLDER is the class).",
        ),
    ] = None,
    index: IndexOpt = None,
    weights: WeightsOpt = None,
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, help="Neighbours voting for k-NN top-1.")
    ] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Query each labelled photo against the others: mAP, recall@1/5/10, k-NN top-1."""
    from ghostmatch.eval.evaluation import evaluate_retrieval, labels_from_folders, read_labels_csv

    _check_folder(folder)
    truth = read_labels_csv(labels) if labels is not None else labels_from_folders(folder)
    if not truth:
        raise GhostmatchError(
            f"no labelled photos in {folder}: put them in one sub-folder per class, or pass "
            "--labels CSV"
        )
    with _indexed(folder, index, weights, as_json) as lib:
        result = evaluate_retrieval(lib, truth, knn_k=k)
    if as_json:
        print_json(result.to_dict())
        return
    m = result.metrics
    table = Table(title=f"retrieval on {escape(path_text(folder))}", title_justify="left")
    for column in ("class", "images", "mAP", "R@1", "R@5", "R@10", f"{k}-NN top-1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, c in result.per_class.items():
        table.add_row(
            name,
            str(c.n_items),
            *map(_rate, (c.map, c.recall_at_1, c.recall_at_5, c.recall_at_10, c.knn_top1)),
        )
    table.add_section()
    table.add_row(
        "all",
        str(result.n_items),
        *map(_rate, (m.map, m.recall_at_1, m.recall_at_5, m.recall_at_10, m.knn_top1)),
        style="bold",
    )
    out.print(table)
    if result.depth < result.n_items - 1:
        out.print(f"each query ranked its top {result.depth}; mAP is a lower bound")
    if result.n_unindexed:
        out.print(f"{result.n_unindexed} labelled files are not in the index (unreadable?)")


@eval_app.command("recognition")
def recognition(
    folder: FolderArg,
    index: IndexOpt = None,
    weights: WeightsOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Labelled photos that vote.")] = 20,
    unknown_classes: Annotated[
        int | None,
        typer.Option(
            "--unknown-classes",
            min=0,
            help="Classes held out whole as unknowns (default: a third of them).",
        ),
    ] = None,
    precision: Annotated[
        float,
        typer.Option("--precision", help="Precision the unknown threshold is calibrated to."),
    ] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Recognition by labelled photos, sub-folders = classes: a seeded half of each known
    class labelled, the rest recognised; held-out classes as unknowns."""
    from ghostmatch.eval.evaluation import labels_from_folders
    from ghostmatch.eval.recognition import evaluate_recognition

    _check_folder(folder)
    truth = labels_from_folders(folder)
    if not truth:
        raise GhostmatchError(
            f"no labelled photos in {folder}: put them in one sub-folder per class"
        )
    with _indexed(folder, index, weights, as_json) as lib:
        result = evaluate_recognition(
            lib, truth, unknown_classes=unknown_classes, k=k, precision=precision, seed=seed
        )
    if as_json:
        print_json(result.to_dict())
        return
    r = result
    out.print(
        f"{len(r.known_classes)} known classes: {r.n_labelled} labelled photos, "
        f"{r.n_known_queries} held out; {len(r.unknown_classes)} unknown classes: "
        f"{r.n_unknown_queries} photos (seed {r.seed}, k {r.k})"
    )
    out.print(f"top-1 on held-out photos        {_rate(r.top1)}")
    out.print(
        f"at the calibrated threshold     {_score(r.threshold)} (precision "
        f"{r.target_precision:.2f} leave-one-out): answers {_rate(r.coverage)} of the known "
        f"photos, accuracy {_rate(r.accuracy_at_coverage)}; answers "
        f"{_rate(r.unknown_accepted)} of the unknowns"
    )
    out.print(f"known/unknown AUROC             {_rate(r.auroc)}")
    out.print(
        f"accuracy on knowns at 95% of unknowns rejected  {_rate(r.known_accuracy_at_95)} "
        f"(threshold {_score(r.threshold_at_95)})"
    )
    if r.n_unindexed:
        out.print(f"{r.n_unindexed} labelled files are not in the index (unreadable?)")


@eval_app.command("dupes")
def dupes(
    folder: FolderArg,
    truth: Annotated[
        Path,
        typer.Option(
            "--truth",
            help="truth.json from `ghostmatch make-copies`, or a CSV of group_id,path.",
        ),
    ],
    index: IndexOpt = None,
    weights: WeightsOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Duplicate threshold to report precision/recall at "
            "(default: as `ghostmatch dupes`: calibrated, else the model's, else the default).",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a precision-recall plot (PNG).")
    ] = None,
    finder: Annotated[
        bool,
        typer.Option(
            "--finder",
            help="Also run the duplicate finder over the index as `ghostmatch dupes` does "
            "(both stages, grouping) and score its groups against the truth, whose first "
            "path of each group is the original.",
        ),
    ] = False,
    no_verify: Annotated[
        bool,
        typer.Option("--no-verify", help="With --finder: stage 1 only, as `dupes --no-verify`."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Score each photo's nearest neighbours as duplicate pairs against the truth groups.

    Measures descriptor scores: stage 1 of `ghostmatch dupes`, before verification;
    --finder also measures the groups `ghostmatch dupes` reports.
    """
    from ghostmatch.eval.evaluation import (
        dupe_threshold,
        evaluate_duplicates,
        evaluate_groups,
        read_truth_any,
    )

    if no_verify and not finder:
        raise GhostmatchError("--no-verify applies to --finder; add --finder")
    _check_folder(folder)
    groups = read_truth_any(truth)
    found = None
    with _indexed(folder, index, weights, as_json) as lib:
        cut, source = dupe_threshold(lib, threshold)
        result = evaluate_duplicates(lib, groups, cut, under=folder)
        if finder:
            found = evaluate_groups(lib.find_duplicates(threshold, verify=not no_verify), groups)
    if plot is not None:
        _plot(result.curve, plot, f"duplicates in {folder.name}")
    if as_json:
        data = result.to_dict()
        data["threshold_source"] = source
        if found is not None:
            data["finder"] = {**found.to_dict(), "verify": not no_verify}
        if plot is not None:
            data["plot"] = os.fsdecode(plot)
        print_json(data)
        return
    p = result.pairs
    out.print(
        f"{result.n_images} images, {result.n_groups} truth groups, {p.n_positive} true "
        f"pairs; {p.n_pairs} candidate pairs ({result.k} nearest each) hold "
        f"{p.n_positive_retrieved} of them"
    )
    out.print(f"micro-AP            {_rate(p.micro_ap)}")
    out.print(
        f"recall @ P=0.99     {_rate(p.recall_at_p99)}  (threshold {_score(p.threshold_at_p99)})"
    )
    out.print(
        f"recall @ P=0.90     {_rate(p.recall_at_p90)}  (threshold {_score(p.threshold_at_p90)})"
    )
    out.print(
        f"at threshold {_score(cut)} ({source}): precision {_rate(p.precision)}, "
        f"recall {_rate(p.recall)}"
    )
    if result.per_transform:
        table = Table(title=f"recall by transform at {_score(cut)}", title_justify="left")
        for column in ("transform", "pairs", "found", "recall"):
            table.add_column(column, justify="left" if column == "transform" else "right")
        for name, t in result.per_transform.items():
            table.add_row(name, str(t.n_pairs), str(t.n_found), _rate(t.recall))
        out.print(table)
    if found is not None:
        how = "--no-verify" if no_verify else "both stages"
        out.print(
            f"`ghostmatch dupes` ({how}): precision {_rate(found.precision)} over "
            f"{found.reported_pairs} reported pairs, recall {_rate(found.recall)} of the "
            "copies grouped with their original"
        )
    if result.n_unindexed:
        out.print(
            f"{result.n_unindexed} truth files are not in the index; their pairs count as missed"
        )
    if plot is not None:
        out.print(f"wrote {path_text(plot)}", markup=False)


def calibrate_cmd(
    pairs: Annotated[
        Path,
        typer.Option(
            "--pairs",
            help="CSV of path,path,same|different (paths relative to the CSV); a few dozen.",
        ),
    ],
    precision: Annotated[
        float, typer.Option("--precision", help="Precision the threshold must reach.")
    ] = 0.99,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Index folder (default: $GHOSTMATCH_INDEX or user data dir)"),
    ] = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pick the duplicate threshold from labelled pairs and store it in the index."""
    import ghostmatch
    from ghostmatch.eval.evaluation import (
        CONFIDENCE,
        calibrate,
        precision_lower_bound,
        read_pairs_csv,
    )

    labelled = read_pairs_csv(pairs)
    lib = ghostmatch.open(index, catalog=catalog, create=False)
    try:
        choice = calibrate(lib, labelled, precision)
        where = lib.path
    finally:
        lib.close()
    bound = precision_lower_bound(choice)
    same_above = round(choice.recall * choice.n_same)
    if as_json:
        print_json(
            {
                "index": os.fsdecode(where),
                "threshold": choice.threshold,
                "target_precision": precision,
                "precision": choice.precision,
                "recall": choice.recall,
                "support": choice.support,
                "same_at_or_above": same_above,
                "n_pairs": choice.n_same + choice.n_different,
                "n_same": choice.n_same,
                "n_different": choice.n_different,
                "precision_lower_bound": bound,
                "confidence": CONFIDENCE,
            }
        )
        return
    out.print(
        f"duplicate threshold {choice.threshold:.4f} stored in {path_text(where)}", markup=False
    )
    out.print(
        f"chosen from {choice.n_same + choice.n_different} labelled pairs ({choice.n_same} same, "
        f"{choice.n_different} different); {choice.support} pairs score at or above it, "
        f"{same_above} of them the same (precision {choice.precision:.3f}, recall "
        f"{choice.recall:.3f})"
    )
    out.print(
        f"with this few pairs the precision has a {CONFIDENCE:.0%} lower bound of {bound:.3f}"
        + ("; label more pairs to tighten it" if bound < precision else "")
    )


@contextmanager
def _indexed(
    folder: Path, index: Path | None, weights: str | None, quiet: bool
) -> Iterator[Library]:
    """An index of ``folder`` brought up to date: ``index`` if given, else a temporary one
    deleted afterwards."""
    import ghostmatch

    with ExitStack() as cleanup:
        if index is None:
            index = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ghostmatch-")))
        lib = ghostmatch.open(index, weights=weights)
        cleanup.callback(lib.close)
        if not quiet:
            err.print(f"indexing {path_text(folder)} into {path_text(lib.path)}", markup=False)
        report = lib.index([folder])
        if report.interrupted:
            raise KeyboardInterrupt
        failed = sum(report.failed.values())
        if failed and not quiet:
            err.print(f"{failed} files could not be read and are left out")
        yield lib


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise GhostmatchError(f"{path_text(folder)} is not a folder")


def _plot(curve: Any, path: Path, title: str) -> None:
    from ghostmatch.eval.metrics import plot_pr

    try:
        plot_pr({"all pairs": curve}, path, title=title)
    except ImportError as exc:
        raise GhostmatchError(
            f"--plot needs matplotlib ({exc.name} is missing); pip install 'ghostmatch[bench]'"
        ) from exc
    except OSError as exc:
        raise GhostmatchError(f"cannot write {path_text(path)}: {exc.strerror or exc}") from exc


def _rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _score(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def register(app: typer.Typer) -> None:
    """Add ``eval retrieval``, ``eval dupes``, ``eval recognition`` and ``calibrate``."""
    app.add_typer(eval_app, name="eval")
    app.command("calibrate")(calibrate_cmd)
