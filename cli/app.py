"""The ``ghostmatch`` command: parses options, opens the library, prints what it returns.

Exit codes: 0 success (bad files are reported, not fatal), 1 an unexpected internal error,
2 a mistake the user can fix (message on one line, no traceback), 130 interrupted (work
done so far is kept).
"""

from __future__ import annotations

import atexit
import errno
import gc
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    Progress,
    TaskID,
)
from rich.table import Table
from rich.text import Text

from ghostmatch.cli.opening import open_library as _open
from ghostmatch.cli.output import (
    CatalogOpt,
    IndexOpt,
    JsonOpt,
    err,
    out,
    print_json,
    progress_columns,
)
from ghostmatch.errors import GhostmatchError, IndexBusyError, NoIndexError
from ghostmatch.pathtext import path_text

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find matching and duplicate photos with GhostNet descriptors and FAISS.",
)
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="imagenet, bundled, random or a checkpoint file (.pth/.pt/.safetensors). "
        "Default: $GHOSTMATCH_WEIGHTS, else bundled.",
    ),
]
RuntimeOpt = Annotated[
    str, typer.Option("--runtime", help="auto, torch, onnx or eager (the model as loaded).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


@contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Any]:
    """A rich progress bar with rate and ETA on stderr; a no-op callback when disabled."""
    if not enabled:
        yield None
        return
    with Progress(*progress_columns(), console=err, transient=False) as bar:
        task: TaskID | None = None

        def update(stage: str, done: int, total: int | None) -> None:
            nonlocal task
            if stage == "scanned":
                err.print(f"found {done} image files")
                return
            if task is None:
                task = bar.add_task(label, total=total, rate="")
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or files) to index.")],
    index: IndexOpt = None,
    catalog: CatalogOpt = None,
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Decoding threads; with --ray, Ray actors."),
    ] = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "auto",
    max_megapixels: Annotated[float, typer.Option("--max-megapixels", min=0.01)] = 100.0,
    index_type: Annotated[
        str | None,
        typer.Option("--index-type", help="FAISS index_factory string, e.g. Flat, IVF1024,Flat"),
    ] = None,
    no_prune: Annotated[
        bool, typer.Option("--no-prune", help="Keep files that disappeared from the folders.")
    ] = False,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Fail at once if another process is writing the index."),
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="Decode and embed on Ray actors, one per CPU of the cluster: alone, on a "
            "cluster started here for the run; auto, the running one; or its address "
            "(HOST:PORT, ray://HOST:PORT). Needs the ray extra.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add the images under FOLDERS to the index, or bring it up to date."""
    for folder in folders:
        if not folder.exists():
            raise GhostmatchError(f"{path_text(folder)} does not exist")
    lib = _open(
        index,
        catalog=catalog,
        weights=weights,
        runtime=runtime,
        device=device,
        index_type=index_type,
        wait=not no_wait,
    )
    try:
        if not quiet and not as_json:
            err.print(f"index {path_text(lib.path)}", markup=False)
        show = not quiet and err.is_terminal
        with _progress(show, "indexing") as progress:
            report = lib.index(
                folders,
                batch_size=batch_size,
                workers=workers,
                max_megapixels=max_megapixels,
                prune=not no_prune,
                progress=progress,
                ray=ray,
            )
        card = lib.card
    finally:
        lib.close()
    if as_json:
        data = report.to_dict()
        data["index"] = str(lib.path)
        data["model"] = card.describe() if card else None
        print_json(data)
    elif not quiet:
        if card is not None:
            err.print(f"model: {card.describe()}")
        _print_report(report)
    if report.interrupted:
        raise typer.Exit(130)


def _print_report(report: Any) -> None:
    failed = sum(report.failed.values())
    out.print(
        f"added {report.added}, updated {report.updated}, moved {report.moved}, "
        f"removed {report.removed}, unchanged {report.unchanged}, failed {failed}"
        + (f", skipped {report.known_bad} known bad" if report.known_bad else "")
        + f" in {report.seconds:.1f} s ({report.images_per_s:.1f} images/s)"
    )
    if report.failed:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.failed.items()))
        out.print(f"failed by reason: {reasons}")
        for path, reason, detail in report.failures[:20]:
            out.print(f"  {path_text(path)}: {reason}: {detail}", markup=False)
        if len(report.failures) > 20:
            out.print(f"  ... and {len(report.failures) - 20} more (see ghostmatch info)")
    if report.interrupted:
        out.print("interrupted: the work done so far is saved; run the command again to resume")


@app.command()
def query(
    images: Annotated[list[Path], typer.Argument(help="Query images (need not be indexed).")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Matches per query.")] = 10,
    index: IndexOpt = None,
    catalog: CatalogOpt = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Only matches scoring at least this.")
    ] = None,
    under: Annotated[
        Path | None, typer.Option("--under", help="Only matches below this folder.")
    ] = None,
    rotations: Annotated[
        bool,
        typer.Option(
            "--rotations", help="Also search each IMAGE turned by 90, 180 and 270 degrees."
        ),
    ] = False,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "auto",
    plain: Annotated[
        bool, typer.Option("--plain", help="A plain cosine search: no refinement at all.")
    ] = False,
    whiten: Annotated[
        str | None,
        typer.Option("--whiten", help="none, training or collection (default none)."),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            "--augment", help="none, flip or multiscale views of the query (default none)."
        ),
    ] = None,
    dba: Annotated[
        int | None,
        typer.Option(
            "--dba", min=0, help="Database-side augmentation neighbours (default 2; 0 off)."
        ),
    ] = None,
    qe: Annotated[
        int | None,
        typer.Option("--qe", min=0, help="Alpha query expansion neighbours (default 2; 0 off)."),
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(
            "--rerank", min=0, help="Top results re-ranked by local features (default 20; 0 off)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the indexed images most like each IMAGE (cosine score, higher = more alike)."""
    from ghostmatch.retrieval.refine import DEFAULT, PLAIN

    changes = {
        name: value
        for name, value in (
            ("whiten", whiten),
            ("augment", augment),
            ("dba", dba),
            ("expand", qe),
            ("rerank", rerank),
        )
        if value is not None
    }
    refine = (PLAIN if plain else DEFAULT).with_changes(**changes)
    lib = _open(index, catalog=catalog, runtime=runtime, device=device, create=False)
    try:
        results = [
            (
                image,
                lib.query(
                    image, k, min_score=min_score, under=under, rotations=rotations, refine=refine
                ),
            )
            for image in images
        ]
    finally:
        lib.close()
    if as_json:
        print_json(
            [
                {"query": os.fsdecode(image), "matches": [m.to_dict() for m in matches]}
                for image, matches in results
            ]
        )
        return
    for image, matches in results:
        # Text, not markup: a file name may hold brackets.
        table = Table(title=Text(path_text(image)), title_justify="left")
        columns = ("rank", "score", "path", "width", "height", "bytes")
        for column in columns + (("turn",) if rotations else ()):
            justify = "left" if column == "path" else "right"
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for m in matches:
            table.add_row(
                str(m.rank),
                f"{m.score:.4f}",
                Text(path_text(m.path)),
                str(m.width),
                str(m.height),
                str(m.bytes),
                *([str(m.turn)] if rotations else []),
            )
        out.print(table)
        if not matches:
            out.print("no matches")


@app.command()
def info(index: IndexOpt = None, catalog: CatalogOpt = None, as_json: JsonOpt = False) -> None:
    """Images, folders, model, index type, sizes on disk and failures of an index."""
    lib = _open(index, catalog=catalog, create=False)
    try:
        data = lib.info()
    finally:
        lib.close()
    if as_json:
        print_json(data)
        return
    out.print(f"index        {path_text(data['index'])}", markup=False)
    out.print(f"catalog      {path_text(data['catalog'])}", markup=False)
    out.print(f"images       {data['images']}")
    out.print(f"model        {data['model_summary']}")
    out.print(f"index type   {data['index_type']}")
    size = (data["catalog_bytes"] or 0) + data["index_bytes"]
    out.print(f"on disk      {size / 1e6:.1f} MB")  # a server's catalog: its tables there
    for folder in data["folders"]:
        out.print(f"folder       {path_text(Path(folder))}", markup=False)
    for reason, count in sorted(data["failures"].items()):
        out.print(f"failed       {count} {reason}")
    labels = sorted(data.get("labels", {}).items(), key=lambda item: -item[1]["indexed"])
    for name, count in labels[:20]:  # the most used; info --json lists them all
        out.print(f"label        {count['indexed']} {name}", markup=False)
    if len(labels) > 20:
        out.print(f"label        ... and {len(labels) - 20} more (info --json lists them)")


@app.command()
def remove(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to forget.")],
    index: IndexOpt = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove files (or everything under folders) from the index; the files stay on disk."""
    lib = _open(index, catalog=catalog, create=False)
    try:
        removed = lib.remove(paths)
    finally:
        lib.close()
    if as_json:
        print_json({"removed": removed})
    else:
        out.print(f"removed {removed} images from the index")


@app.command("make-copies")
def make_copies_cmd(
    source: Annotated[Path, typer.Argument(help="A folder of photos.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the test set.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Use at most N photos.")] = None,
) -> None:
    """Make a near-duplicate test set (originals, transformed copies, truth.json)."""
    from ghostmatch.eval.copies import make_copies
    from ghostmatch.ingest.scan import scan

    sources = sorted(entry.path for entry in scan([source]))
    if limit is not None:
        sources = sources[:limit]
    truth = make_copies(sources, out_dir, seed)
    out.print(f"wrote {truth}")


@app.command()
def train(
    folder: Annotated[Path, typer.Argument(help="Training photos (sub-folders = classes).")],
    out_file: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    mode: Annotated[str, typer.Option("--mode", help="ssl or supervised.")] = "ssl",
    init: Annotated[
        str, typer.Option("--init", help="imagenet, bundled, random or a checkpoint.")
    ] = "random",
    width: Annotated[float, typer.Option("--width")] = 1.0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    image_size: Annotated[int, typer.Option("--image-size", min=32)] = 160,
    dim: Annotated[int, typer.Option("--dim", min=8)] = 256,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    list_file: Annotated[
        Path | None, typer.Option("--list", help="Only the images listed (relative paths).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt.")] = False,
    background: Annotated[
        int,
        typer.Option(
            "--background",
            min=0,
            help="Training photos whose descriptors normalise duplicate scores (0: none).",
        ),
    ] = 2000,
    grey: Annotated[
        float, typer.Option("--grey", min=0.0, max=1.0, help="Probability of a grey view.")
    ] = 0.1,
    blur: Annotated[
        float, typer.Option("--blur", min=0.0, max=1.0, help="Probability of a blurred view.")
    ] = 0.2,
    pooling: Annotated[
        str, typer.Option("--pooling", help="gem or avg over the 960 channels, or head (1280-d).")
    ] = "gem",
    neighbour_groups: Annotated[
        int,
        typer.Option(
            "--neighbour-groups",
            min=0,
            help="ssl: batches of groups of N look-alike photos (hard negatives); 0: random.",
        ),
    ] = 0,
) -> None:
    """Train a descriptor (self-supervised copy detection, or supervised classes)."""
    import torch

    from ghostmatch.train.training import TrainConfig
    from ghostmatch.train.training import train as run_training

    if threads is not None:
        torch.set_num_threads(threads)
    config = TrainConfig(
        mode=mode,
        init=init,
        width=width,
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        dim=dim,
        seed=seed,
        background=background,
        grey=grey,
        blur=blur,
        pooling=pooling,
        neighbour_groups=neighbour_groups,
    )

    def report(event: str, data: dict[str, Any]) -> None:
        if event == "step":
            if data["step"] % 10 == 0 or data["step"] == data["steps"]:
                err.print(
                    f"epoch {data['epoch'] + 1}/{epochs} step {data['step']}/{data['steps']} "
                    f"loss {data['loss']:.4f} {data['images_per_s']:.1f} img/s"
                )
        elif event == "epoch":
            knn = f" knn-top1 {data['knn_top1']:.3f}" if data.get("knn_top1") is not None else ""
            out.print(
                f"epoch {data['epoch'] + 1}/{epochs}: loss {data['loss']:.4f}, "
                f"{data['images_per_s']:.1f} img/s, {data['seconds']:.0f} s{knn}"
            )
        else:
            err.print(f"{event}: {data}")

    run_training(folder, out_file, config, list_file=list_file, resume=resume, report=report)
    out.print(f"wrote {path_text(out_file)}", markup=False)


# A full disk or quota, a file over the size limit (RLIMIT_FSIZE: what a full disk looks like
# to a process limited that way), and a place the user may not write: the machine's state,
# not a bug, so one line that says what to do rather than a traceback.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_ACCESS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _os_error_message(error: OSError) -> str | None:
    """The one-line message for an OSError the user can fix, else None."""
    where = f" {path_text(os.fsdecode(error.filename))}" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        return (
            f"cannot write{where}: {reason}; free some disk space (or raise the quota) and "
            "run the command again (work committed so far is kept)"
        )
    if error.errno in _NO_ACCESS:
        return (
            f"no access to{where} ({reason}); check its permissions (a command that changes "
            "the index needs write access to its folder), or run as a user who has access"
        )
    return None


def _message(error: GhostmatchError) -> str:
    """The library's message, with the command line's own answer where it has one."""
    if isinstance(error, NoIndexError):
        where = path_text(error.path)
        if error.catalog:
            return (
                f"no index in the catalog {error.catalog}; create one with: ghostmatch index "
                f"DIR --index {where} --catalog URL"
            )
        return f"no index at {where}; create one with: ghostmatch index DIR --index {where}"
    if isinstance(error, IndexBusyError):  # only index --no-wait asks not to wait
        return f"{error}, or leave out --no-wait to wait for it"
    return str(error)


# What ``--ray`` takes as its value: Ray's words for a new local cluster and the running one,
# or an address. Anything else after a bare ``--ray`` is a folder or another option.
_RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|\S+:\d+")


def _with_option_values(args: list[str]) -> list[str]:
    """``args`` with ``local`` after a bare ``--ray``: the parser has no options whose
    value may be left out."""
    end = args.index("--") if "--" in args else len(args)
    given: list[str] = []
    for i, arg in enumerate(args[:end]):
        given.append(arg)
        following = args[i + 1] if i + 1 < end else ""
        if arg == "--ray" and not _RAY_ADDRESS.fullmatch(following):
            given.append("local")
    return given + args[end:]


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    # At exit the interpreter's last garbage collections walk every object left: with
    # torch loaded, 0.6 s of an index's 0.95 s teardown, 1.0 s of a duplicate search's
    # 1.45 s. Frozen, the objects are left to the process's end (the system frees its
    # memory). Only cycles go uncollected: nothing this package writes waits on one, and
    # the exit handlers (logging's flush among them) still run.
    atexit.register(gc.freeze)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = lambda message, *args, **kwargs: err.print(f"warning: {message}")
    try:
        # Not standalone, click returns the code of a typer.Exit instead of exiting with it.
        status = app(args=_with_option_values(sys.argv[1:]), standalone_mode=False)
    except GhostmatchError as error:
        err.print(f"error: {_message(error)}", markup=False, highlight=False)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort
        err.print("interrupted")
        sys.exit(130)
    except OSError as error:
        message = _os_error_message(error)
        if message is None:
            raise
        err.print(f"error: {message}", markup=False, highlight=False)
        sys.exit(GhostmatchError.exit_code)
    except Exception as error:
        from ghostmatch.store.catalog import user_error

        # The catalog turns database failures into GhostmatchError; this catches any other.
        database = user_error(error)
        if database is not None:
            err.print(f"error: {database}", markup=False, highlight=False)
            sys.exit(database.exit_code)
        # Usage errors (click's, vendored by newer typer) carry a message and an exit code.
        code = getattr(error, "exit_code", None)
        describe = getattr(error, "format_message", None)
        if not isinstance(code, int) or describe is None:
            raise
        message = " ".join(str(describe()).split())
        err.print(f"error: {message} (see --help)", markup=False, highlight=False)
        sys.exit(code)
    sys.exit(status if isinstance(status, int) else 0)


def _register_commands() -> None:
    from ghostmatch.cli import dupes_cmd, eval_cmd, recognize_cmd, serve_cmd

    dupes_cmd.register(app)
    eval_cmd.register(app)
    recognize_cmd.register(app)
    serve_cmd.register(app)


_register_commands()


if __name__ == "__main__":
    main()
