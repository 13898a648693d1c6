"""Where labels come from: a CSV of ``path,label`` rows or a folder of class sub-folders,
and what setting them did."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostmatch.errors import GhostmatchError
from ghostmatch.pathtext import path_text

# What recognize answers when the evidence is too weak; no photo may carry it as a label.
UNKNOWN = "unknown"

# path -> its labels, as set_labels takes them (one label may be given as a plain string).
LabelMap = Mapping[Path, str | Iterable[str]]


class NoLabelsError(GhostmatchError):
    """Recognition was asked of an index where no indexed photo carries a label."""

    def __init__(self) -> None:
        super().__init__("no indexed photo carries a label; label some with set_labels first")


@dataclass(frozen=True)
class LabelReport:
    """What ``set_labels`` did: ``photos`` indexed files named, ``added`` labels new to
    them, ``removed`` labels dropped (``replace``), and the ``not_indexed`` paths left out."""

    photos: int
    added: int
    removed: int = 0
    not_indexed: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "photos": self.photos,
            "added": self.added,
            "removed": self.removed,
            "not_indexed": [os.fsdecode(p) for p in self.not_indexed],
        }


def check_label(label: object) -> str:
    """A label as stored: text with its outer whitespace removed, not empty, not ``unknown``."""
    if not isinstance(label, str):
        raise GhostmatchError(f"a label is text, not {label!r}")
    text = label.strip()
    if not text:
        raise GhostmatchError("a label must not be empty")
    if text == UNKNOWN:
        raise GhostmatchError(
            f"{UNKNOWN!r} is what recognition answers for a photo of no known label; "
            "give those photos no label, or another name"
        )
    return text


def labels_of(value: str | Iterable[str]) -> list[str]:
    """The checked labels of one photo, each once, in the order given."""
    values = [value] if isinstance(value, str) else list(value)
    return list(dict.fromkeys(check_label(v) for v in values))


def read_label_csv(file: Path) -> dict[Path, list[str]]:
    """Rows ``path,label`` after a ``path,label`` header; a path may come on several rows
    (several labels). Relative paths are relative to the CSV's folder."""
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GhostmatchError(f"{path_text(file)} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise GhostmatchError(f"cannot read {path_text(file)}: {exc.strerror or exc}") from exc
    base = Path(os.path.abspath(file)).parent
    reader = csv.reader(io.StringIO(text))
    labels: dict[Path, list[str]] = {}
    header_seen = False
    try:
        for row in reader:
            fields = [f.strip() for f in row]
            if not any(fields) or fields[0].startswith("#"):
                continue
            if not header_seen:
                if [f.lower() for f in fields] != ["path", "label"]:
                    raise GhostmatchError(
                        f"{path_text(file)} line {reader.line_num}: the first row must be the "
                        "header path,label"
                    )
                header_seen = True
                continue
            if len(fields) != 2 or not fields[0]:
                raise GhostmatchError(
                    f"{path_text(file)} line {reader.line_num}: expected path,label, got "
                    f"{len(fields)} fields"
                )
            try:
                label = check_label(fields[1])
            except GhostmatchError as exc:
                raise GhostmatchError(f"{path_text(file)} line {reader.line_num}: {exc}") from exc
            path = Path(fields[0]).expanduser()
            path = Path(os.path.abspath(path if path.is_absolute() else base / path))
            found = labels.setdefault(path, [])
            if label not in found:
                found.append(label)
    except csv.Error as exc:
        raise GhostmatchError(f"{path_text(file)} line {reader.line_num}: {exc}") from exc
    if not labels:
        raise GhostmatchError(f"{path_text(file)} has no rows; write one path,label row per photo")
    return labels


def labels_from_folders(root: Path, indexed: Iterable[Path]) -> dict[Path, list[str]]:
    """Each of the ``indexed`` photos below ``root`` labelled by the first sub-folder of
    ``root`` that holds it; photos directly in ``root`` have no class and are left out."""
    top = Path(os.path.abspath(root))
    labels: dict[Path, list[str]] = {}
    for path in indexed:
        parts = path.relative_to(top).parts
        if len(parts) > 1:
            labels[path] = [check_label(parts[0])]
    return labels
