"""Errors and warnings of the data layer: each names the file and the line."""

from __future__ import annotations

from pathlib import Path


class KGFormatError(ValueError):
    """A KG file cannot be read as the expected layout.

    The message starts with ``path:line:`` (line numbers start at 1) so that
    editors and terminals can jump to the offending line.
    """

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {message}")


class KGDataWarning(UserWarning):
    """Base class of the data layer's warnings: input was adjusted, not rejected."""


class DuplicateTripleWarning(KGDataWarning):
    """A split lists the same triple more than once; one copy is kept."""


class UnseenEntityWarning(KGDataWarning):
    """valid/test mention entities or relations absent from train; they are kept."""


class LineEndingWarning(KGDataWarning):
    """A file uses Windows (CRLF) line endings; they are read as plain newlines."""


class SplitOverlapWarning(KGDataWarning):
    """A triple occurs in more than one split (test leakage); it is kept in each."""


class MissingTextWarning(KGDataWarning):
    """Entities without a label or description; their id stands in for the label."""


class HeaderLineWarning(KGDataWarning):
    """A header line (``head<TAB>relation<TAB>tail``) was skipped because ``skip_header`` was set."""


class WhitespaceWarning(KGDataWarning):
    """Whitespace around ids was stripped because ``strip_whitespace`` was set."""
