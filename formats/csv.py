"""CSV: UTF-8, a header row, RFC 4180 quoting, ``\\r\\n`` line endings.

The stdlib ``csv`` module (C) does the quoting; it writes into one reused ``StringIO`` per batch.
It already writes ``None`` as an empty field, ``int`` with ``str`` and ``float`` with ``repr``
(the shortest text that reads back to the same float), so only two kinds of column need work
in Python, and the work is done column-wise so that every other column pays nothing:

* boolean columns: ``True``/``False`` become ``true``/``false`` (the JSON spelling);
* string columns, when the formula guard is on: text a spreadsheet would run as a formula gets a
  leading ``'``. Numbers and dates are never touched, so ``-1.5`` stays a number.

The guard is lossless: text that already starts with quotes followed by a trigger character
(``'=x``) gets one more quote, so ``unguard`` (used by imports) can always drop exactly one and
a round trip restores the original text.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator, Sequence

from sources.base import Column, Row

# A spreadsheet treats text starting with one of these as a formula (tab and CR can hide one).
GUARD_TRIGGERS = "=+-@\t\r"
_NEEDS_GUARD = re.compile(r"'*[=+\-@\t\r]").match
_IS_GUARDED = re.compile(r"'+[=+\-@\t\r]").match
_ANY_NEEDS_GUARD = re.compile(r"\0'*[=+\-@\t\r]").search


def guard(text: str) -> str:
    """``text`` made safe to open in a spreadsheet: a leading ``'`` if it could run as a formula."""
    return "'" + text if _NEEDS_GUARD(text) else text


def unguard(text: str) -> str:
    """The inverse of ``guard``: drop the one leading ``'`` that ``guard`` added, nothing else."""
    return text[1:] if _IS_GUARDED(text) else text


def guard_column(cells: Sequence) -> Sequence:
    """``guard`` over one column of cells; ``None`` passes through."""
    # Most batches have no cell to guard: one regex over the joined column finds that out in C.
    # A NUL inside a cell can only cause a false alarm, which the exact per-cell pass settles.
    try:
        joined = "\0" + "\0".join(filter(None, cells))
    except TypeError:  # not all text: let the per-cell pass sort it out
        joined = "\0="
    if _ANY_NEEDS_GUARD(joined) is None:
        return cells
    return ["'" + v if v.__class__ is str and _NEEDS_GUARD(v) else v for v in cells]


_BOOL_TEXT = {True: "true", False: "false"}


def bool_column(cells: Sequence) -> list:
    """``true``/``false`` as JSON spells them; ``None`` passes through."""
    return list(map(_BOOL_TEXT.get, cells, cells))


def column_fixes(
    columns: Sequence[Column], formula_guard: bool
) -> list[tuple[int, Callable[[Sequence], Sequence]]]:
    """(index, transform) for the columns whose cells need Python-side work before encoding."""
    fixes: list[tuple[int, Callable[[Sequence], Sequence]]] = []
    for i, column in enumerate(columns):
        if column.type == "boolean":
            fixes.append((i, bool_column))
        elif column.type == "string" and formula_guard:
            fixes.append((i, guard_column))
    return fixes


class CsvWriter:
    extension = "csv"
    content_type = "text/csv; charset=utf-8"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.columns = tuple(columns)
        self.formula_guard = formula_guard
        self._fixes = column_fixes(self.columns, formula_guard)
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)

    def begin(self) -> bytes:
        names = [c.name for c in self.columns]
        self._csv.writerow(guard_column(names) if self.formula_guard else names)
        return self._drain()

    def write(self, rows: Sequence[Row]) -> bytes:
        if not rows:
            return b""
        if self._fixes:
            # Transpose, fix the few columns that need it, transpose back: cheaper than
            # looking at every cell of every row.
            cells = list(zip(*rows, strict=True))
            for i, fix in self._fixes:
                cells[i] = fix(cells[i])
            rows = zip(*cells, strict=True)  # type: ignore[assignment]
        self._csv.writerows(rows)
        return self._drain()

    def finish(self) -> Iterator[bytes]:
        return iter(())

    def _drain(self) -> bytes:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text.encode("utf-8")
