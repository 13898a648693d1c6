"""A review page for duplicate groups: one self-contained HTML file (inline CSS, thumbnails
embedded as JPEG data URIs), one row per group with the kept file marked."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, load_image
from ghostmatch.pathtext import path_text

THUMB_QUALITY = 80
# Groups whose thumbnails are made (in parallel) and written at a time: keeps memory flat
# for a page with thousands of groups.
_CHUNK = 64

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
.summary { margin: 0 0 .3em; font-size: 1.1em; }
.legend { margin: 0 0 1.2em; color: #555; }
table.groups { border-collapse: collapse; width: 100%; }
tr.group { border-top: 1px solid #ddd; vertical-align: top; }
tr.group > th { padding: .8em .8em 0 0; text-align: right; color: #777; font-weight: normal; }
tr.group > td { padding: .6em 0; }
.reclaim { color: #777; margin-bottom: .3em; }
.files { display: flex; flex-wrap: wrap; gap: .8em; }
figure { margin: 0; padding: 6px; width: var(--thumb); background: #fff;
  border: 3px solid #ddd; border-radius: 6px; }
figure.keep { border-color: #2e7d32; background: #f1f8f1; }
.frame { height: var(--thumb); display: flex; align-items: center; justify-content: center; }
.frame img { max-width: 100%; max-height: 100%; }
.placeholder { width: 100%; height: 100%; display: flex; align-items: center;
  justify-content: center; text-align: center; background: repeating-linear-gradient(
  45deg, #eee, #eee 8px, #e4e4e4 8px, #e4e4e4 16px); color: #a33; font-size: .9em; }
figcaption { margin-top: 4px; font-size: .85em; }
.badge { display: inline-block; padding: 0 .4em; border-radius: 3px; color: #fff;
  font-weight: 600; }
.badge.keep { background: #2e7d32; }
.badge.exact { background: #c62828; }
.badge.near { background: #ef6c00; }
.badge.edited { background: #6a1b9a; }
.path { display: block; word-break: break-all; color: #444; font-family: ui-monospace, monospace;
  font-size: .95em; }
"""


def write_html(groups: Sequence[DuplicateGroup], path: Path, thumb_size: int = 160) -> Path:
    """Write the review page of ``groups`` to ``path`` and return ``path``.

    Thumbnails fit a ``thumb_size`` square, EXIF orientation applied; a file that cannot
    be decoded gets a placeholder saying why. Each file shows its duplicate score with the
    kept file (``DuplicateMember.score``), tier, size and dimensions; the header sums
    groups, files and the bytes that removing every non-kept file would reclaim. The page
    is written to a temporary name and renamed, so a failed run never leaves half a page.
    """
    if thumb_size < 16:
        raise GhostmatchError(f"thumbnail size must be at least 16 pixels, got {thumb_size}")
    path = Path(path)
    temporary = path.with_name(path.name + ".part")
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            for text in _page(groups, thumb_size):
                out.write(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise GhostmatchError(f"cannot write {path_text(path)}: {error.strerror}") from error
    return path


def thumbnail_uri(path: Path, size: int) -> tuple[str | None, str]:
    """(JPEG data URI of the upright image shrunk to fit ``size``, "") or (None, why not)."""
    try:
        # min_side lets JPEGs decode at a reduced DCT scale: much faster for big photos.
        decoded = load_image(path, min_side=size)
    except ImageRejected as rejected:
        return None, rejected.reason
    image = decoded.image
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


def _page(groups: Sequence[DuplicateGroup], size: int) -> Iterator[str]:
    files = sum(1 + len(group.members) for group in groups)
    reclaimable = sum(member.bytes for group in groups for member in group.members)
    yield (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>ghostmatch duplicates</title>\n"
        f"<style>{_CSS}:root {{ --thumb: {size}px; }}\n</style>\n</head>\n<body>\n"
        "<h1>ghostmatch duplicates</h1>\n"
        f'<p class="summary"><b>{len(groups)}</b> {_plural(len(groups), "group")}, '
        f"<b>{files}</b> {_plural(files, 'file')}, "
        f'<b title="{reclaimable} bytes">{_human_bytes(reclaimable)}</b> reclaimable</p>\n'
        '<p class="legend">The kept file of each group has a green frame and a '
        "<b>keep</b> badge; the score of every other file is its duplicate score with the "
        "kept one (higher = more alike). Click a thumbnail to open the file."
        "</p>\n"
        '<table class="groups">\n<tbody>\n'
    )
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(groups), _CHUNK):
            chunk = groups[start : start + _CHUNK]
            paths = list({m.path: None for g in chunk for m in (g.keep, *g.members, *g.similar)})
            made = pool.map(lambda p: thumbnail_uri(p, size), paths)
            thumbs = dict(zip(paths, made, strict=True))
            for number, group in enumerate(chunk, start + 1):
                yield _row(number, group, thumbs)
    yield "</tbody>\n</table>\n</body>\n</html>\n"


def _row(number: int, group: DuplicateGroup, thumbs: dict[Path, tuple[str | None, str]]) -> str:
    reclaim = sum(member.bytes for member in group.members)
    figures = [_figure(group.keep, thumbs[group.keep.path], kept=True)]
    figures += [_figure(m, thumbs[m.path], kept=False) for m in group.members]
    # Other captures of the scene, apart from the copies: never counted as reclaimable.
    similar = ""
    if group.similar:
        alike = "".join(_figure(m, thumbs[m.path], kept=False) for m in group.similar)
        similar = (
            f'<div class="similar">{len(group.similar)} similar '
            f"(another capture, never moved or deleted)</div>"
            f'<div class="files similar">\n{alike}</div>'
        )
    return (
        f'<tr class="group" id="g{number}"><th scope="row">{number}</th><td>'
        f'<div class="reclaim">{len(group.members)} '
        f"{_plural(len(group.members), 'duplicate')}, "
        f"{_human_bytes(reclaim)} reclaimable</div>"
        f'<div class="files">\n{"".join(figures)}</div>{similar}</td></tr>\n'
    )


def _figure(member: DuplicateMember, thumb: tuple[str | None, str], kept: bool) -> str:
    text = path_text(member.path)
    name = _escape(os.path.basename(text))
    uri, reason = thumb
    if uri is None:
        picture = f'<div class="placeholder">cannot show: {_escape(reason)}</div>'
    else:
        picture = f'<img src="{uri}" alt="{name}">'
    link = _file_uri(member.path)
    if link is not None:
        picture = f'<a href="{_escape(link)}" title="{_escape(text)}">{picture}</a>'
    if kept:
        badge = '<span class="badge keep">keep</span>'
    else:
        tier = _escape(member.tier)
        badge = f'<span class="badge {tier}">{tier}</span> score {member.score:.4f}'
    return (
        f'<figure class="{"file keep" if kept else "file"}">'
        f'<div class="frame">{picture}</div><figcaption>{badge}<br>'
        f"{member.width} × {member.height}, "
        f'<span title="{member.bytes} bytes">{_human_bytes(member.bytes)}</span>'
        f'<span class="path">{_escape(text)}</span></figcaption></figure>\n'
    )


def _file_uri(path: Path) -> str | None:
    """A file:// link to ``path`` (non-UTF-8 bytes percent-encoded), or None."""
    try:
        return Path(os.path.abspath(path)).as_uri()
    except ValueError:
        return None


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _human_bytes(count: int) -> str:
    if count < 1000:
        return f"{count} bytes"
    size = count / 1000
    for unit in ("kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
