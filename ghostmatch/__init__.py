"""ghostmatch: image retrieval and duplicate matching with GhostNet descriptors."""

from __future__ import annotations

__version__ = "0.1.0"
