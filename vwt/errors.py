"""One-line errors for bad input. A leaf module: every part of ``vwt`` and every script may import it."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line (``error: ...``), exit code 2, no traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (at most ``limit`` characters), or its type name
    when it has none: what a one-line error quotes of the cause."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
