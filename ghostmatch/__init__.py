"""ghostmatch: image retrieval and duplicate matching with GhostNet descriptors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ghostmatch.errors import GhostmatchError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
    from ghostmatch.library import IndexReport, Library, Match, open

__all__ = [
    "DuplicateGroup",
    "DuplicateMember",
    "GhostmatchError",
    "IndexReport",
    "Library",
    "Match",
    "__version__",
    "open",
]

_LAZY = {
    "DuplicateGroup": "ghostmatch.dupes.groups",
    "DuplicateMember": "ghostmatch.dupes.groups",
    "IndexReport": "ghostmatch.library",
    "Library": "ghostmatch.library",
    "Match": "ghostmatch.library",
    "open": "ghostmatch.library",
}


def __getattr__(name: str) -> Any:
    # torch, faiss and onnxruntime load only when the library is used, so the CLI answers
    # --help and user mistakes without seconds of imports.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ghostmatch' has no attribute {name!r}")
