"""The cells of an XLSX sheet as SpreadsheetML, rendered a column at a time in C where it can be.

``SheetRows.render(rows)`` turns a batch of rows into ``<row>`` elements. As in ``formats.csv``,
the work is done per column, not per cell: a number column (or a run of adjacent ones) is written
by ``orjson`` in one call (the same fast path and the same number text as the CSV writer), a text
column is joined, escaped and wrapped with a few ``bytes`` operations over the whole column, and
the columns' pieces are interleaved into rows by slice assignment. A column whose cells do not fit
its fast path (a NaN, a text cell in a number column, text holding NUL or longer than a cell may
be) is written cell by cell by ``cell_xml``, which decides by each cell's own type.

What a cell becomes (what the xlsxwriter writer of before wrote, read back by openpyxl alike):

- ``None`` and ``""``: an empty cell ``<c/>``;
- ``bool``: a boolean cell; ``int``/``float``: a number cell with the shortest text that reads
  back to the same float (``repr``); NaN ``#NUM!`` and infinities ``#DIV/0!`` as error cells
  (never formulas);
- text (dates and date-times included, as ISO text): an inline string (``t="inlineStr"``, no
  shared-string table, so nothing is held across rows), XML-escaped; control characters as
  Excel's ``_xHHHH_`` escapes and literal ``_xHHHH_`` text escaped as ``_x005F_xHHHH_``; cut to
  Excel's 32,767 UTF-16 units; ``xml:space="preserve"`` where a cell begins or ends with a space,
  tab or line break. Cells carry no ``r`` reference (optional in SpreadsheetML): each is the next
  column, so an empty cell is written, not skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from dataport.columns import Column, Row
from formats.converters import EXACT_INT_FLOAT
from formats.csv import FAST, _numbers, guard_column, segments

MAX_TEXT = 32_767  # UTF-16 units in one cell

EMPTY = b"<c/>"
_NUM_OPEN, _NUM_CLOSE = b"<c><v>", b"</v></c>"
_TEXT_OPEN = b'<c t="inlineStr"><is><t>'
_TEXT_OPEN_KEEP = b'<c t="inlineStr"><is><t xml:space="preserve">'
_TEXT_CLOSE = b"</t></is></c>"
_BOOL: dict[Any, bytes] = {True: b'<c t="b"><v>1</v></c>', False: b'<c t="b"><v>0</v></c>', None: EMPTY}
_NAN = b'<c t="e"><v>#NUM!</v></c>'
_INFINITE = b'<c t="e"><v>#DIV/0!</v></c>'

_NONE = type(None)
_TEXT_TYPES = frozenset((str, _NONE))
_BOOL_TYPES = frozenset((bool, _NONE))
# Text columns are NUL-joined: a cell holding a NUL goes cell by cell. Escaped: \x01-\x08 and
# \x0b-\x1f, text that looks like an escape already, and U+FFFE / U+FFFF (not XML characters).
_CONTROL_BYTES = bytes(range(1, 9)) + bytes(range(11, 32))
_EDGES = (b"\0 ", b" \0", b"\0\t", b"\t\0", b"\0\n", b"\n\0")


def _escaped(data: bytes) -> bytes:
    """NUL-joined cells with ``_xml_text``'s escapes, over the whole column at once: the tests are
    a few ``in`` and one ``translate`` (all in C; a regex search over the column costs ten times
    as much), the substitutions run only when a cell needs them."""
    if b"_x" in data:
        data = _LITERAL_ESCAPE_BYTES.sub(rb"_x005F\g<0>", data)
    if len(data.translate(None, _CONTROL_BYTES)) != len(data):
        data = _CONTROL_BYTES_RE.sub(lambda m: b"_x%04X_" % m.group()[0], data)
    if b"\xef\xbf" in data:
        data = data.replace(b"\xef\xbf\xbe", b"_xFFFE_").replace(b"\xef\xbf\xbf", b"_xFFFF_")
    if b"&" in data:
        data = data.replace(b"&", b"&amp;")
    if b"<" in data:
        data = data.replace(b"<", b"&lt;")
    if b">" in data:
        data = data.replace(b">", b"&gt;")
    return data


def _edge_space(data: bytes) -> bool:
    """Whether a cell of NUL-joined ``data`` begins or ends with a space, tab or line break."""
    return (
        data[:1] in b" \t\n"
        and data[:1] != b""
        or data[-1:] in b" \t\n"
        and data[-1:] != b""
        or any(edge in data for edge in _EDGES)
    )


_LITERAL_ESCAPE_BYTES = re.compile(rb"_x[0-9a-fA-F]{4}_")
_CONTROL_BYTES_RE = re.compile(rb"[\x01-\x08\x0b-\x1f]")
_LITERAL_ESCAPE = re.compile(r"(_x[0-9a-fA-F]{4}_)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")


def _xml_text(text: str) -> bytes:
    """One text cell's content: cut to ``MAX_TEXT``, escaped as the module docstring says."""
    if len(text) > MAX_TEXT // 2 and len(text.encode("utf-16-le", "surrogatepass")) > 2 * MAX_TEXT:
        text = text.encode("utf-16-le", "surrogatepass")[: 2 * MAX_TEXT].decode("utf-16-le", "ignore")
    text = _LITERAL_ESCAPE.sub(r"_x005F\1", text)
    text = _CONTROL.sub(lambda m: f"_x{ord(m.group()):04X}_", text)
    text = text.replace("\ufffe", "_xFFFE_").replace("\uffff", "_xFFFF_")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.encode("utf-8", "replace")  # a lone surrogate (no XML character) becomes "?"


# An integer of 16 digits or more in orjson's text may be past 2**53, which a double (and so
# Excel) cannot hold exactly: such a column takes the slow path, which writes those as text.
_LONG_INTEGER = re.compile(rb"[\[,]-?\d{16,}[\],]")


def cell_xml(value: Any) -> bytes:
    """One cell by its own type (the slow path, and the reference the fast paths match)."""
    kind = type(value)
    if value is None:
        return EMPTY
    if kind is bool:
        return _BOOL[value]
    if kind is int or kind is float or isinstance(value, int | float):
        number = float(value) if isinstance(value, float) else value
        if isinstance(number, float) and not math.isfinite(number):
            return _NAN if math.isnan(number) else _INFINITE
        if isinstance(number, int) and abs(number) > EXACT_INT_FLOAT:
            # Excel holds numbers as doubles and would round this one when the file is opened and
            # saved; as text its digits survive both Excel and the import's integer column.
            return _TEXT_OPEN + str(number).encode() + _TEXT_CLOSE
        return _NUM_OPEN + repr(number).encode() + _NUM_CLOSE
    text = value if isinstance(value, str) else str(value)
    if text == "":
        return EMPTY
    body = _xml_text(text)
    keep = text[0] in " \t\n" or text[-1] in " \t\n"
    return (_TEXT_OPEN_KEEP if keep else _TEXT_OPEN) + body + _TEXT_CLOSE


def _wrapped(data: bytes, opening: bytes, closing: bytes, empty: bytes) -> list[bytes]:
    """NUL-separated cell contents, each wrapped in ``opening``/``closing``; an empty one ``empty``."""
    full = opening + data.replace(b"\0", closing + b"\0" + opening) + closing
    return full.replace(opening + closing, empty).split(b"\0")


def text_cells(cells: Sequence[Any]) -> list[bytes] | None:
    """A column of ``str``/``None`` as cells; None when a cell needs the slow path."""
    if not set(map(type, cells)) <= _TEXT_TYPES:
        return None
    joined = "\0".join(["" if v is None else v for v in cells])
    if len(joined) > MAX_TEXT // 2 and max(map(len, filter(None, cells))) > MAX_TEXT // 2:
        return None  # a cell may have to be cut
    try:
        data = joined.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None
    if data.count(b"\0") != len(cells) - 1:  # a NUL inside a cell: it would split wrongly
        return None
    data = _escaped(data)
    opening = _TEXT_OPEN_KEEP if _edge_space(data) else _TEXT_OPEN
    return _wrapped(data, opening, _TEXT_CLOSE, EMPTY)


def number_cells(cells: Sequence[Any]) -> list[bytes] | None:
    """A column of ``int``/``float``/``None`` (finite) as cells; None otherwise."""
    blob = _numbers(cells, rows=False)
    if blob is None or _LONG_INTEGER.search(blob):
        return None
    return _wrapped(blob[1:-1].replace(b",", b"\0"), _NUM_OPEN, _NUM_CLOSE, EMPTY)


def number_runs(runs: Sequence[Sequence[Any]]) -> list[bytes] | None:
    """Each row's run of number cells (``int``/``float``/``None``, finite) as that row's cells."""
    blob = _numbers(runs, rows=True)
    if blob is None or _LONG_INTEGER.search(blob):
        return None
    inner = blob[2:-2].replace(b",", _NUM_CLOSE + _NUM_OPEN).replace(b"]" + _NUM_CLOSE + _NUM_OPEN + b"[", b"\0")
    return _wrapped(inner, _NUM_OPEN, _NUM_CLOSE, EMPTY)


def bool_cells(cells: Sequence[Any]) -> list[bytes] | None:
    if not set(map(type, cells)) <= _BOOL_TYPES:
        return None
    return list(map(_BOOL.__getitem__, cells))


class SheetRows:
    """Rows of ``columns`` as ``<row>`` elements, numbered on from ``start`` (1 for the header)."""

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool) -> None:
        self.columns = tuple(columns)
        self.formula_guard = formula_guard
        self.next_row = 1
        self._segments = segments(self.columns, formula_guard)  # as CsvWriter's

    def header(self) -> bytes:
        names = [c.name for c in self.columns]
        cells = guard_column(names) if self.formula_guard else names
        return self._rows(1, [[b"".join(map(cell_xml, cells))]])

    def render(self, rows: Sequence[Row]) -> bytes:
        """A batch of rows; rows of another length than the columns' go cell by cell."""
        count = len(rows)
        if not count:
            return b""
        width = len(self.columns)
        if not FAST or width == 0 or set(map(len, rows)) != {width}:
            return self._rows(count, [[b"".join(map(cell_xml, row)) for row in rows]])
        columns: list[Sequence[Any]] | None = None
        pieces: list[list[bytes]] = []
        for kind, start, stop in self._segments:
            if kind == "run":
                runs = [row[start:stop] for row in rows]
                done = number_runs(runs)
                pieces.append(done if done is not None else [b"".join(map(cell_xml, r)) for r in runs])
                continue
            if columns is None:
                columns = list(zip(*rows, strict=True))
            cells = columns[start]
            done = None
            if kind == "number":
                done = number_cells(cells)
            elif kind == "boolean":
                done = bool_cells(cells)
            else:
                if kind == "guarded":
                    cells = guard_column(cells)
                done = text_cells(cells)
            pieces.append(done if done is not None else list(map(cell_xml, cells)))
        return self._rows(count, pieces)

    def _rows(self, count: int, pieces: Sequence[Sequence[bytes]]) -> bytes:
        """Interleave: ``<row r="n">``, each piece's part of row n, ``</row>``; then one join."""
        first = self.next_row
        self.next_row += count
        width = len(pieces) + 2
        out: list[bytes] = [b""] * (width * count)
        out[0::width] = [b'<row r="%d">' % n for n in range(first, first + count)]
        for k, part in enumerate(pieces):
            out[k + 1 :: width] = part
        out[width - 1 :: width] = [b"</row>"] * count
        return b"".join(out)
