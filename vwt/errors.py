"""One-line errors for bad input. A leaf module: every part of ``vwt`` and every script may import it."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line (``error: ...``), exit code 2, no traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (beyond ``limit`` characters, cut after a whole word,
    marked " ..."), or its type name when it has none: what a one-line error quotes of the cause."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
