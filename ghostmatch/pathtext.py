"""How a file path is written in output: faithfully, and printable on any terminal or file.

On Linux a file name is any bytes; Python keeps bytes that are not UTF-8 as lone surrogates
(``b"caf\\xe9"`` becomes ``"caf\\udce9"``), which cannot be encoded to print. Human output
(tables, CSV, HTML) shows such a byte as the escape ``\\xe9``; JSON keeps the surrogate as
the string escape ``\\udce9``, which ``os.fsencode(json.loads(...))`` turns back into the
original bytes.
"""

from __future__ import annotations

import os


def path_text(path: str | os.PathLike[str]) -> str:
    """``path`` for people: every valid character as it is, each undecodable byte as
    ``\\xNN`` (rather than failing to encode, or U+FFFD, which would hide which byte)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
