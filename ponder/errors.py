"""User-facing errors.

A ``PonderError`` is a mistake the user can fix (bad model name, bad file, bad parameter). The CLI prints its
message on one line and exits non-zero; it never shows a traceback for one. Anything else is a bug in ponder.
"""

from __future__ import annotations


class PonderError(Exception):
    """A problem with the user's input, with a message that says what was wrong and what to do."""


class UnsupportedArchitecture(PonderError):
    """The checkpoint's architecture is not one ponder implements."""
