"""COPY text for the PostgreSQL sink (``sources.postgres_sink``): the rows of a CSV import, given
as text column by column, turned into COPY's text format without making typed values
(``copy_text``), and the error that names the cell psycopg's C row formatter could not write
(``cell_error``). Kept apart from the sink, which is about the connection and the transaction.

Rows travel as COPY text: each batch is formatted by psycopg's C row formatter
(``format_row_text``, the function behind ``Copy.write_row``) into one buffer and sent with one
``Copy.write``. The importing process's CPU is what limits an import (the server works on the
other core), so that is what was measured, for 1,000,000 rows × 10 columns: 1.02-1.09 s, against
1.28-1.33 s for ``await copy.write_row(row)`` per row (a coroutine per row) and 1.14-1.21 s for
the formatter's own ``write_row`` per row; building the text in Python from typed values, column
by column, is about 3 times slower than the C formatter. ``format_row_text`` is not public API:
without it (pure-Python psycopg, or a version that renames it) the sink uses ``Copy.write_row``.

Rows of a CSV file come as text instead (``write_text``, see sources/sinks.py): the cells are
already the text COPY wants, so no typed value is made and printed again. They go in a COPY with
``NULL ''`` (an empty field is NULL: such rows have no empty text), escaped where a cell needs it
(found a column at a time), interleaved and joined (``_text``). For the benchmark's 1,000,000
rows (bench/postgres_import.py; 2 busy cores): ``_text`` ~0.36 s against ~0.88 s for
``format_row_text`` on the typed rows, which cost ~0.9 s more to make than the text does.
The fields are those ``format_row_text`` writes for the typed rows, but for floats in ``double
precision`` columns, which go as the file spelled them (``1.50``, ``2e-3``): PostgreSQL's
``float8in`` is the C library's ``strtod``, correctly rounded like ``float()``, so it reads the
same double, and the checks let through only plain decimals without overflow or underflow
(tests/test_sinks.py compares both paths bit for bit on thousands of texts, exact ties between
two doubles included). A switch between the two kinds of rows ends the COPY and starts another."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from sources.base import Column, Dataset, Row
from sources.sink_base import SinkError

# What COPY text escapes with a backslash (psycopg also escapes \b, \f and \v, which the server
# reads back to the same characters either way).
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]").search
_COPY_SPECIALS = re.compile(r"[\\\t\n\r]").finditer

FormatRow = Callable[[Sequence[Any], Any, bytearray], None]


def _copy_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _escaped(cells: Sequence[str], joined: str) -> Sequence[str]:
    """``cells`` (``joined``: them apart by NUL, none holding one) with what COPY text escapes
    escaped: cell by cell when few need it, else all at once."""
    found = [m.start() for m in _COPY_SPECIALS(joined)]
    if len(found) * 16 > len(cells):
        return _copy_escape(joined).split("\0")
    out = list(cells)
    index = last = 0
    for at in found:
        index += joined.count("\0", last, at)
        last = at
        out[index] = _copy_escape(cells[index])
    return out


def copy_text(
    columns: Sequence[Column], exact_floats: Sequence[bool], texts: Sequence[Sequence[str]], count: int
) -> bytes | None:
    """Rows given as text, column by column, as COPY text for a COPY with ``NULL ''``: the very
    fields the C formatter writes for their typed rows (but an empty one for NULL), except a float
    in a ``double precision`` column (``exact_floats``), which goes as the file wrote it (the
    server's strtod reads it as float() does: both round correctly). None if a text holds a NUL
    (which COPY cannot carry). Text is escaped cell by cell where it needs it, found a column at a
    time.

    All ASCII, the fields are interleaved and joined once (~150 ns a row of 10). Otherwise each
    row is joined and encoded by itself: one joined batch would be as wide as its widest
    character (one emoji: 4 bytes for every character), and encoding that is slow (~400 ns a
    row against ~240)."""
    fields: list[Sequence[str]] = []
    ascii = True
    for column, cells, exact in zip(columns, texts, exact_floats, strict=True):
        kind = column.type
        if kind == "string":
            joined = "\0".join(cells)
            if joined.count("\0") != count - 1:
                return None
            ascii = ascii and joined.isascii()
            if _COPY_SPECIAL(joined):
                cells = _escaped(cells, joined)
        elif kind == "float" and not exact:
            cells = [repr(float(v)) if v else "" for v in cells]
        fields.append(cells)
    if not ascii:
        return b"\n".join(map(str.encode, map("\t".join, zip(*fields, strict=False)))) + b"\n"
    width = 2 * len(fields)
    out = ["\t"] * (width * count)
    for k, cells in enumerate(fields):
        out[2 * k :: width] = cells
    out[width - 1 :: width] = ["\n"] * count
    return "".join(out).encode()


def cell_error(
    fmt: FormatRow, dataset: Dataset, columns: Sequence[Column], rows: list[Row], first: int, tx: Any
) -> SinkError:
    """Which row and cell psycopg's formatter ``fmt`` could not turn into COPY text (a NUL
    character in text, an object of a type it does not know)."""
    scratch = bytearray()
    for n, row in enumerate(rows):
        try:
            fmt(row, tx, scratch)
            continue
        except Exception as e:
            problem = e
        for column, cell in zip(columns, row, strict=False):
            try:
                fmt((cell,), tx, scratch)
            except Exception as e:
                return SinkError(
                    f"dataset '{dataset.name}': row {first + n}, column '{column.name}': "
                    f"{cell!r} cannot be written ({e})",
                    row=first + n,
                )
        return SinkError(f"dataset '{dataset.name}': row {first + n} cannot be written ({problem})", row=first + n)
    return SinkError(f"dataset '{dataset.name}': rows {first}-{first + len(rows) - 1} cannot be written")
