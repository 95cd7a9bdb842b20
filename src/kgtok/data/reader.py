"""Reading tab-separated KG files with errors that point at the bad line.

Every reader returns rows of strings plus the 1-based line number of each row,
so that later checks (unknown entity, bad id) can still name the line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kgtok.data.errors import KGFormatError, LineEndingWarning


@dataclass(frozen=True)
class Table:
    """Rows of a tab-separated file: ``columns[j][i]`` is field j of row i."""

    path: Path
    columns: list[list[str]]
    line_numbers: np.ndarray  # (rows,) int64, 1-based line of each row
    crlf: bool
    blank_lines: int

    def __len__(self) -> int:
        return len(self.line_numbers)


def read_text(path: Path) -> tuple[str, bool]:
    """Decode a file as UTF-8; report the line of the first undecodable byte.

    Returns the text with CRLF turned into LF and whether CRLF was seen (the
    shared FB15k-237 copy uses CRLF: it is read, with a warning, not refused).
    """
    try:
        data = path.read_bytes()
    except IsADirectoryError as e:
        raise KGFormatError(path, None, "expected a file, found a directory") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start : e.end].hex(" ")
        raise KGFormatError(
            path, line, f"byte(s) 0x{bad} at column {column} are not valid UTF-8; re-encode the file as UTF-8"
        ) from None
    crlf = "\r\n" in text
    if crlf:
        text = text.replace("\r\n", "\n")
        warnings.warn(
            f"{path}: Windows (CRLF) line endings; reading them as plain newlines",
            LineEndingWarning,
            stacklevel=3,
        )
    if "\r" in text:
        line = text.count("\n", 0, text.index("\r")) + 1
        raise KGFormatError(path, line, "stray carriage return (\\r) inside a line")
    return text, crlf


def read_table(path: str | Path, fields: tuple[int, ...], what: str) -> Table:
    """Read a tab-separated file whose rows have one of the allowed field counts.

    Parameters
    ----------
    path : the file.
    fields : allowed numbers of tab-separated fields per row, e.g. ``(3,)``.
    what : what a row should look like, for the error message.
    """
    path = Path(path)
    if not path.exists():
        raise KGFormatError(path, None, "file not found")
    text, crlf = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines or all(not line.strip() for line in lines):
        raise KGFormatError(path, None, f"file is empty; expected lines of {what}")
    numbers = np.arange(1, len(lines) + 1, dtype=np.int64)
    blank = np.fromiter((not line.strip() for line in lines), dtype=bool, count=len(lines))
    if blank.any():  # blank lines carry no triple; skip them but count them
        lines = [line for line, b in zip(lines, blank) if not b]
        numbers = numbers[~blank]
    rows = [line.split("\t") for line in lines]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    bad = ~np.isin(counts, fields)
    if bad.any():
        i = int(np.argmax(bad))
        allowed = " or ".join(map(str, fields))
        hint = ""
        if counts[i] == 1 and " " in lines[i]:
            hint = " (fields look space-separated; kgtok expects tabs)"
        raise KGFormatError(
            path,
            int(numbers[i]),
            f"expected {allowed} tab-separated fields ({what}), found {counts[i]}{hint}: {lines[i][:120]!r}"
            + (f"; {int(bad.sum())} such lines in the file" if bad.sum() > 1 else ""),
        )
    width = max(fields)
    if len(fields) > 1:  # pad short rows (e.g. a text line without description)
        rows = [row + [""] * (width - len(row)) for row in rows]
    columns = [list(col) for col in zip(*rows)]
    return Table(path=path, columns=columns, line_numbers=numbers, crlf=crlf, blank_lines=int(blank.sum()))
