"""The duplicate review page: well-formed, self-contained, one row per group, kept file
marked, every path escaped."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
from ghostmatch.dupes.report import write_html
from ghostmatch.errors import GhostmatchError

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
SCRIPT_NAME = "<script>alert(1)<script>.jpg"
ODD_NAME = os.fsdecode(b"caf\xe9 & co.jpg")


class Page(HTMLParser):
    """Checks that every element closes in order, and collects rows, figures and images."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()
        self.rows: list[list[dict]] = []
        self.in_path = False
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = {k: v or "" for k, v in attrs}
        classes = attributes.get("class", "").split()
        if tag not in VOID:
            self.open.append(tag)
        if tag == "tr" and "group" in classes:
            self.rows.append([])
        elif tag == "figure":
            self.rows[-1].append({"keep": "keep" in classes, "path": "", "img": None})
        elif tag == "img":
            self.rows[-1][-1]["img"] = attributes["src"]
        elif tag == "span" and "path" in classes:
            self.in_path = True

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()
        if tag == "span":
            self.in_path = False

    def handle_data(self, data: str) -> None:
        self.text += data
        if self.in_path:
            self.rows[-1][-1]["path"] += data


def entry(path: Path, score: float = 1.0, tier: str = "exact") -> DuplicateMember:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError:
        width = height = 0
    return DuplicateMember(path, score, tier, width, height, path.stat().st_size, 0)


@pytest.fixture
def groups(tmp_path: Path) -> list[DuplicateGroup]:
    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut = Image.fromarray(data.astronaut()).resize((200, 100))
    astronaut.save(folder / "astronaut.jpg", quality=90)
    astronaut.save(folder / SCRIPT_NAME, quality=90)
    # Stored wide, shown tall: EXIF orientation 6 means "rotate 90° clockwise".
    exif = Image.Exif()
    exif[0x0112] = 6
    astronaut.save(folder / "rotated.jpg", quality=80, exif=exif)
    coffee = Image.fromarray(data.coffee()).resize((120, 80))
    coffee.save(folder / "coffee.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    members = [entry(folder / SCRIPT_NAME), entry(folder / "rotated.jpg", 0.93, "edited")]
    second = [entry(folder / "broken.jpg", 0.91, "near")]
    try:
        coffee.save(folder / ODD_NAME, quality=70)
        second.append(entry(folder / ODD_NAME, 0.97, "near"))
    except (OSError, UnicodeEncodeError):
        pass  # a filesystem that only takes UTF-8 names
    return [
        DuplicateGroup(entry(folder / "astronaut.jpg"), members),
        DuplicateGroup(entry(folder / "coffee.jpg"), second),
    ]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_the_page_is_well_formed_with_one_row_per_group(
    groups: list[DuplicateGroup], tmp_path: Path
) -> None:
    out = write_html(groups, tmp_path / "dupes.html")
    assert out == tmp_path / "dupes.html" and not (tmp_path / "dupes.html.part").exists()
    page = parse(out)
    assert page.errors == [] and page.open == []
    assert len(page.rows) == len(groups)
    assert [len(row) for row in page.rows] == [1 + len(g.members) for g in groups]
    # Self-contained: no scripts, no external resources.
    assert "script" not in page.tags and "link" not in page.tags


def test_the_kept_file_is_marked(groups: list[DuplicateGroup], tmp_path: Path) -> None:
    page = parse(write_html(groups, tmp_path / "dupes.html"))
    for row, group in zip(page.rows, groups, strict=True):
        kept = [figure for figure in row if figure["keep"]]
        assert len(kept) == 1 and kept[0] is row[0]
        assert kept[0]["path"] == str(group.keep.path)
    assert "keep" in page.text


def test_thumbnails_are_upright_jpeg_data_uris(
    groups: list[DuplicateGroup], tmp_path: Path
) -> None:
    page = parse(write_html(groups, tmp_path / "dupes.html", thumb_size=64))
    figures = [figure for row in page.rows for figure in row]
    for figure in figures:
        if figure["path"].endswith("broken.jpg"):
            assert figure["img"] is None  # a placeholder, not a broken image
            continue
        prefix = "data:image/jpeg;base64,"
        assert figure["img"].startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(figure["img"][len(prefix) :])))
        assert image.format == "JPEG" and max(image.size) <= 64
        if figure["path"].endswith("rotated.jpg"):
            assert image.height > image.width
        else:
            assert image.width > image.height
    assert "cannot show: corrupt" in page.text or "cannot show: truncated" in page.text


def test_paths_are_escaped(groups: list[DuplicateGroup], tmp_path: Path) -> None:
    out = write_html(groups, tmp_path / "dupes.html")
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text
    paths = [figure["path"] for row in parse(out).rows for figure in row]
    assert any(path.endswith(SCRIPT_NAME) for path in paths)
    if any(m.path.name == ODD_NAME for g in groups for m in g.members):
        # Undecodable bytes are shown as escapes, never dropped or fatal.
        assert any(path.endswith("caf\\xe9 & co.jpg") for path in paths)
        assert "caf%E9%20%26%20co.jpg" in text  # the file:// link keeps the real bytes


def test_the_summary_counts_groups_files_and_reclaimable_bytes(
    groups: list[DuplicateGroup], tmp_path: Path
) -> None:
    text = write_html(groups, tmp_path / "dupes.html").read_text(encoding="utf-8")
    files = sum(1 + len(g.members) for g in groups)
    reclaimable = sum(m.bytes for g in groups for m in g.members)
    assert f"<b>{len(groups)}</b> groups, <b>{files}</b> files" in text
    assert f'title="{reclaimable} bytes"' in text


def test_an_empty_list_and_bad_arguments(tmp_path: Path) -> None:
    page = parse(write_html([], tmp_path / "empty.html"))
    assert page.errors == [] and page.rows == []
    with pytest.raises(GhostmatchError):
        write_html([], tmp_path / "no-such-folder" / "dupes.html")
    with pytest.raises(GhostmatchError):
        write_html([], tmp_path / "dupes.html", thumb_size=4)
