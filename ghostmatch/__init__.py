"""ghostmatch: image retrieval and duplicate matching with GhostNet descriptors."""

from __future__ import annotations

__version__ = "0.1.0"

from ghostmatch.errors import GhostmatchError
from ghostmatch.library import IndexReport, Library, Match, open

__all__ = ["GhostmatchError", "IndexReport", "Library", "Match", "__version__", "open"]
