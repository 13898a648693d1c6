"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


class GhostmatchError(Exception):
    """A user-caused error (missing file, wrong model, bad option).

    The message says what to do; the CLI prints it on one line without a traceback and
    exits with ``exit_code``.
    """

    exit_code = 2
