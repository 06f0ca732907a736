"""Error types. Every user-facing failure is a :class:`LoraSurgeryError` with one clear paragraph.

The CLI prints the message and exits with status 1 (no traceback unless ``--debug``).
"""
from __future__ import annotations

from pathlib import Path


class LoraSurgeryError(Exception):
    """A user-facing error: the message names the file (if any) and says what is wrong and what to do."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)


class InputError(LoraSurgeryError):
    """A file that cannot be read as what it is supposed to be (corrupt, truncated, wrong kind)."""


class PlanError(LoraSurgeryError):
    """An operation that cannot be planned: unmatched keys, wrong architecture, bad options."""


class OutputError(LoraSurgeryError):
    """An output that must not be written (exists without --overwrite, equals an input)."""
