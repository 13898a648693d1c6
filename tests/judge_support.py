"""What tests of the pair judge read off an indexed library."""

from __future__ import annotations

from ghostmatch import Library
from ghostmatch.store.catalog import ImageRecord


def records_by_name(lib: Library) -> tuple[dict[int, ImageRecord], dict[str, int]]:
    """``lib``'s catalog records by id, and their ids by file name."""
    records = {r.id: r for r in lib.catalog.get(lib.catalog.ids().tolist())}
    return records, {r.path.name: i for i, r in records.items()}
