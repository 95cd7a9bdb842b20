"""Reading tab-separated KG files with errors that point at the bad line.

Every reader returns rows of strings plus the 1-based line number of each row,
so that later checks (unknown entity, bad id) can still name the line.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kgtok.data.errors import HeaderLineWarning, KGFormatError, LineEndingWarning, WhitespaceWarning


@dataclass(frozen=True)
class Table:
    """Rows of a tab-separated file: ``columns[j][i]`` is field j of row i."""

    path: Path
    columns: list[list[str]]
    line_numbers: np.ndarray  # (rows,) int64, 1-based line of each row
    crlf: bool
    blank_lines: int
    header_line: int | None = None  # 1-based line of a header that was skipped
    stripped_ids: int = 0  # id fields whose surrounding whitespace was stripped

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


def read_table(
    path: str | Path,
    fields: tuple[int, ...],
    what: str,
    *,
    id_columns: int = 0,
    is_header: Callable[[str], bool] | None = None,
    skip_header: bool = False,
    strip_whitespace: bool = False,
) -> Table:
    """Read a tab-separated file whose rows have one of the allowed field counts.

    Parameters
    ----------
    path : the file.
    fields : allowed numbers of tab-separated fields per row, e.g. ``(3,)``.
    what : what a row should look like, for the error message; its
        ``<TAB>``-separated words name the columns (``head<TAB>relation<TAB>tail``).
    id_columns : the first ``id_columns`` fields are ids: an empty one is an
        error, and so is one with leading or trailing whitespace (``'a '`` and
        ``'a'`` would otherwise be two entities), unless ``strip_whitespace``.
    is_header : predicate on the first non-blank line: does it look like a
        column header (``head<TAB>relation<TAB>tail``)?  Such a line is an
        error naming it, or is dropped with a warning when ``skip_header``.
    strip_whitespace : strip whitespace around ids, with a warning, instead of
        refusing them.
    """
    # Over 60 lines on purpose: one pass over the file, every check naming file:line as it meets the line.
    path = Path(path)
    if not path.exists():
        raise KGFormatError(path, None, "file not found")
    text, crlf = read_text(path)
    with _no_gc():  # millions of small lists: the cyclic collector's passes cost 6x the parsing (1M entities)
        return _parse_table(path, text, crlf, fields, what, id_columns, is_header, skip_header, strip_whitespace)


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (as it was before, after): the rows hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_table(path: Path, text: str, crlf: bool, fields: tuple[int, ...], what: str, id_columns: int,
                 is_header: Callable[[str], bool] | None, skip_header: bool, strip_whitespace: bool) -> Table:
    """read_table's checks on the decoded text (see there)."""
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
    header_line = None
    if is_header is not None and is_header(lines[0]):
        header_line = int(numbers[0])
        if not skip_header:
            raise KGFormatError(
                path, header_line,
                f"{lines[0][:120]!r} looks like a column header, not a row of {what}; delete the line, "
                "or skip it with skip_header=True in load_kg (--skip-header in kgtok data info and the stage "
                "commands, load.skip_header=true in kgtok run)",
            )
        warnings.warn(f"{path}:{header_line}: skipped the header line {lines[0][:120]!r}", HeaderLineWarning,
                      stacklevel=3)
        lines, numbers = lines[1:], numbers[1:]
        if not lines:
            raise KGFormatError(path, None, f"file holds only a header line; expected lines of {what}")
    columns = (_uniform_columns(text, lines, fields, skip=bool(blank.any()) or header_line is not None)
               or _columns_by_line(path, lines, numbers, fields, what))
    stripped = _check_ids(path, columns[:id_columns], numbers, lines, what, strip_whitespace)
    return Table(path=path, columns=columns, line_numbers=numbers, crlf=crlf, blank_lines=int(blank.sum()),
                 header_line=header_line, stripped_ids=stripped)


def _columns_by_line(path: Path, lines: list[str], numbers: np.ndarray, fields: tuple[int, ...],
                     what: str) -> list[list[str]]:
    """The columns, line by line: the first line with a field count not in ``fields`` is an error naming it."""
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
    return [list(col) for col in zip(*rows)]


def _uniform_columns(text: str, lines: list[str], fields: tuple[int, ...], *, skip: bool) -> list[list[str]] | None:
    """The columns of a file whose every line has the same allowed number of fields, by one split of the text.

    Splitting each line into its own list cost 8 s for 6M triples (51 s with the garbage collector on);
    one flat split and strided slices cost 3 s. Counting tabs per line on the bytes is exact (tab and
    newline never occur inside a multi-byte UTF-8 character). Files with blank or skipped lines, or
    mixed field counts, return None and take the line-by-line path, which names the bad line.
    """
    if skip or not lines:
        return None
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    if len(ends) < len(lines):  # the last line has no newline
        ends = np.append(ends, len(data))
    tabs = np.searchsorted(np.flatnonzero(data == 9), ends)  # tabs before each line's end
    per_line = np.diff(tabs, prepend=0)
    count = int(per_line[0]) + 1
    if count not in fields or not (per_line == count - 1).all():
        return None
    flat = text.replace("\n", "\t").split("\t")
    if len(flat) == count * len(lines) + 1:
        flat.pop()  # after the final newline
    columns = [flat[j::count] for j in range(count)]
    width = max(fields)
    return columns + [[""] * len(lines) for _ in range(width - count)]  # short rows padded, as line by line


def _column_names(what: str, count: int) -> list[str]:
    """Names of the first ``count`` columns: the words of ``what`` when it spells them out."""
    words = what.split("<TAB>")
    return words[:count] if len(words) >= count else [f"field {j + 1}" for j in range(count)]


def _check_ids(
    path: Path, columns: list[list[str]], numbers: np.ndarray, lines: list[str], what: str, strip: bool
) -> int:
    """Refuse empty ids and ids with surrounding whitespace (or strip them); return how many were stripped.

    Checks each distinct value once, so a 300k-line split costs a set of a
    few thousand names, not a pass over every field.
    """
    names = _column_names(what, len(columns))
    stripped = 0
    first_stripped: tuple[int, str] | None = None  # (row, value) of the first one, for the warning
    for j, column in enumerate(columns):
        padded = {value for value in set(column) if value != value.strip()}
        if padded and strip:
            fixed = {value: value.strip() for value in padded}
            row = next(i for i, value in enumerate(column) if value in padded)
            if first_stripped is None or row < first_stripped[0]:
                first_stripped = (row, column[row])
            stripped += sum(value in padded for value in column)
            column[:] = [fixed.get(value, value) for value in column]
            padded = set()
        if "" in column:
            row = column.index("")
            raise KGFormatError(
                path, int(numbers[row]),
                f"{names[j]} is empty (field {j + 1} of {what}): {lines[row][:120]!r}; fill it in or delete the line",
            )
        if padded:
            row = next(i for i, value in enumerate(column) if value in padded)
            others = sum(value in padded for value in column) - 1
            raise KGFormatError(
                path, int(numbers[row]),
                f"{names[j]} {column[row]!r} has leading or trailing whitespace"
                + (f" ({others} more such field(s) in this column)" if others else "")
                + "; remove it, or strip ids with strip_whitespace=True in load_kg "
                "(--strip-whitespace in kgtok data info and the stage commands, load.strip_whitespace=true "
                "in kgtok run)",
            )
    if stripped and first_stripped is not None:
        row, value = first_stripped
        warnings.warn(
            f"{path}:{int(numbers[row])}: stripped whitespace around {stripped} id field(s), e.g. {value!r}",
            WhitespaceWarning, stacklevel=4,
        )
    return stripped
