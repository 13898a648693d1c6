"""``ghostmatch serve``: the query engine over HTTP (JSON API) and a web page to search and
review duplicates. ``create_app`` builds the FastAPI app; the CLI runs it on uvicorn."""

from __future__ import annotations
