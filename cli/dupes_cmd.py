"""``ghostmatch dupes`` and ``ghostmatch undo``: find duplicate groups and act on them safely."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ghostmatch.cli.output import CatalogOpt, err, out, print_json
from ghostmatch.errors import GhostmatchError
from ghostmatch.pathtext import path_text


def dupes(
    index: Annotated[Path | None, typer.Option("--index", help="Index folder.")] = None,
    catalog: CatalogOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Lowest duplicate score that counts (default: calibrated, else the model's).",
        ),
    ] = None,
    keep: Annotated[
        str,
        typer.Option(
            "--keep", help="Which file of a group to keep: pixels, size, oldest, newest, path."
        ),
    ] = "pixels",
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Skip the local-feature geometric check (faster, less precise).",
        ),
    ] = False,
    similar: Annotated[
        bool,
        typer.Option(
            "--similar",
            help="Also list other captures of the same scene (tier similar, never acted on).",
        ),
    ] = False,
    turned: Annotated[
        bool,
        typer.Option(
            "--turned/--no-turned",
            help="Also find copies turned by 90, 180 or 270 degrees or tilted.",
        ),
    ] = True,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Processes deciding pairs (default: the cores)."),
    ] = None,
    of: Annotated[
        list[Path] | None,
        typer.Option("--of", help="Only: is this image a duplicate of anything indexed?"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write an HTML page.")] = None,
    move_to: Annotated[
        Path | None, typer.Option("--move-to", help="Move non-kept copies into this folder.")
    ] = None,
    delete: Annotated[
        bool,
        typer.Option(
            "--delete",
            help="Move non-kept copies to the trash folder <journal>.trash (undoable).",
        ),
    ] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="Really act (otherwise a dry run).")
    ] = False,
    journal: Annotated[
        Path | None,
        typer.Option(
            "--journal",
            help="Journal for --apply (default: ./ghostmatch-journal-<time>.jsonl).",
        ),
    ] = None,
    protect: Annotated[
        list[Path] | None,
        typer.Option("--protect", help="Never move or delete files under this folder."),
    ] = None,
    not_dup: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--not-dup", help="Record that A and B are not duplicates."),
    ] = None,
) -> None:
    """Find groups of duplicate photos; optionally move or delete the copies (dry run first)."""
    import ghostmatch

    if as_json and as_csv:
        raise GhostmatchError("choose one of --json and --csv")
    if move_to is not None and delete:
        raise GhostmatchError("choose one of --move-to and --delete")
    if (apply or journal is not None or protect) and move_to is None and not delete:
        raise GhostmatchError(
            "--apply, --journal and --protect act on copies: add --move-to DIR or --delete"
        )
    lib = ghostmatch.open(index, catalog=catalog, create=False)
    try:
        if not_dup is not None:
            lib.mark_not_duplicate(*not_dup)
            out.print(
                f"recorded: {path_text(not_dup[0])} and {path_text(not_dup[1])} are not duplicates",
                markup=False,
            )
            return
        if of:
            _report_of(lib, of, threshold, as_json, similar, turned)
            return
        used = lib.duplicate_threshold() if threshold is None else threshold
        from ghostmatch.cli.app import _progress

        show = not as_json and not as_csv and err.is_terminal
        with _progress(show, "verifying") as progress:
            groups = lib.find_duplicates(
                threshold,
                keep=keep,
                verify=not no_verify,
                similar=similar,
                progress=progress,
                turned=turned,
                workers=workers,
            )
    finally:
        lib.close()
    if html is not None:
        from ghostmatch.dupes.report import write_html

        write_html(groups, html)
        err.print(f"wrote {path_text(html)}", markup=False)
    if as_json:
        data: dict[str, Any] = {"threshold": used, "groups": [g.to_dict() for g in groups]}
        print_json(data)
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["group", "role", "path", "score", "tier", "width", "height", "bytes"])
        for n, g in enumerate(groups, start=1):
            rows = [("keep", g.keep)] + [("copy", m) for m in g.members]
            rows += [("similar", m) for m in g.similar]
            for role, m in rows:
                tier = m.tier if role != "keep" else ""
                row = [n, role, path_text(m.path), f"{m.score:.6f}", tier]
                writer.writerow([*row, m.width, m.height, m.bytes])
    else:
        _print_groups(groups, used)
    if move_to is not None or delete:
        # With --json or --csv, stdout holds only that output; the plan goes to stderr.
        say = err if as_json or as_csv else out
        op = "move" if move_to else "delete"
        _act(groups, op, move_to, protect or [], apply, journal, say=say)


def _print_groups(groups: list[Any], threshold: float) -> None:
    copies = sum(len(g.members) for g in groups)
    reclaim = sum(m.bytes for g in groups for m in g.members)
    for n, g in enumerate(groups, start=1):
        table = Table(title=f"group {n}", title_justify="left")
        for column in ("", "score", "tier", "path", "size", "bytes"):
            justify = "left" if column in ("path", "tier") else "right"
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        # Text, not markup: a file name may hold brackets.
        keep = Text(path_text(g.keep.path))
        table.add_row("keep", "", "", keep, _dims(g.keep), str(g.keep.bytes))
        for m in g.members:
            path = Text(path_text(m.path))
            table.add_row("", f"{m.score:.4f}", m.tier, path, _dims(m), str(m.bytes))
        # Other captures are shown apart, under their own heading: they are never acted on.
        if g.similar:
            table.add_section()
        for m in g.similar:
            path = Text(path_text(m.path))
            table.add_row("similar", f"{m.score:.4f}", m.tier, path, _dims(m), str(m.bytes))
        out.print(table)
    alike = sum(len(g.similar) for g in groups)
    listed = f", {alike} similar (other captures, never acted on)" if alike else ""
    out.print(
        f"{len(groups)} groups, {copies} copies{listed}, {reclaim / 1e6:.1f} MB reclaimable "
        f"(threshold {threshold:.4f})"
    )


def _dims(m: Any) -> str:
    return f"{m.width}x{m.height}"


def _report_of(
    lib: Any,
    images: list[Path],
    threshold: float | None,
    as_json: bool,
    similar: bool,
    turned: bool = True,
) -> None:
    from ghostmatch.dupes.groups import SIMILAR

    results = []
    for image in images:
        found = lib.duplicates_of(image, threshold, similar=similar, turned=turned)
        copies = [m for m in found if m.tier != SIMILAR]
        results.append((image, copies, [m for m in found if m.tier == SIMILAR]))
    if as_json:
        data = []
        for image, copies, alike in results:
            row: dict[str, Any] = {
                "query": os.fsdecode(image),
                "duplicates": [m.to_dict() for m in copies],
            }
            if similar:
                row["similar"] = [m.to_dict() for m in alike]
            data.append(row)
        print_json(data)
        return
    for image, copies, alike in results:
        if not copies:
            out.print(f"{path_text(image)}: no duplicates in the index", markup=False)
        else:
            out.print(f"{path_text(image)}: {len(copies)} duplicate(s)", markup=False)
        for m in copies:
            out.print(f"  {m.score:.4f} {m.tier:7} {path_text(m.path)}", markup=False)
        if alike:
            out.print(f"{path_text(image)}: {len(alike)} similar (another capture)", markup=False)
        for m in alike:
            out.print(f"  {m.score:.4f} {m.tier:7} {path_text(m.path)}", markup=False)


def _act(
    groups: list[Any],
    op: str,
    move_to: Path | None,
    protect: list[Path],
    apply: bool,
    journal: Path | None,
    say: Console = out,
) -> None:
    from ghostmatch.dupes.actions import apply_actions, plan_actions

    actions, skipped = plan_actions(groups, op, move_to=move_to, protect=protect)
    for path, reason in skipped:
        err.print(f"skip {path_text(path)}: {reason}", markup=False)
    if journal is None:
        journal = Path(f"ghostmatch-journal-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    report = apply_actions(actions, journal, dry_run=not apply)
    for action, reason in report.failed:
        err.print(f"cannot {op} {path_text(action.source)}: {reason}", markup=False)
    if apply:
        say.print(f"{op}d {len(report.done)} files ({report.bytes / 1e6:.1f} MB)")
        say.print(
            f"journal: {path_text(journal)} (undo with: ghostmatch undo {path_text(journal)})",
            markup=False,
        )
    else:
        say.print(
            f"would {op} {len(report.done)} files ({report.bytes / 1e6:.1f} MB); "
            "dry run, add --apply to do it"
        )
    if report.failed:
        raise typer.Exit(1)


def undo(
    journal: Annotated[Path, typer.Argument(help="Journal written by dupes --apply.")],
    index: Annotated[
        Path | None,
        typer.Option(
            "--index",
            help="Index the duplicates were found in; files go back only into its folders.",
        ),
    ] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Put back every file that a dupes --apply run moved or deleted."""
    import ghostmatch
    from ghostmatch.dupes.actions import undo as undo_journal

    # The indexed folders come from the catalog, never from the journal: a journal is data.
    lib = ghostmatch.open(index, catalog=catalog, create=False)
    try:
        roots = lib.catalog.roots()
    finally:
        lib.close()
    report = undo_journal(journal, roots)
    out.print(f"restored {len(report.restored)} files", markup=False)
    if report.already_undone:
        out.print(f"{report.already_undone} were restored by an earlier undo")
    for path, reason in report.rejected:
        err.print(f"rejected {path_text(path)}: {reason}", markup=False)
    for path, reason in report.skipped:
        err.print(f"not restored {path_text(path)}: {reason}", markup=False)
    if report.skipped or report.rejected:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("dupes")(dupes)
    app.command("undo")(undo)
