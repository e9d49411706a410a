"""XLSX through ``xlsxwriter`` in constant-memory mode.

An XLSX file is a zip archive, so no byte of it can go out before the last row is in: rows go to
a temporary file on disk (xlsxwriter flushes each finished row, so memory does not grow with the
row count), and ``finish()`` closes the workbook and yields the file in 1 MiB chunks.

Cells: numbers are numbers, booleans booleans, ``None`` (and ``""``, which xlsxwriter treats the
same) an empty cell, everything else text, dates included. Text is never read as a formula, a
number or a URL; the formula guard (on by default) still prefixes formula-like text in string
columns with ``'``, as in CSV, because a user may re-save the sheet as CSV and open that.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import xlsxwriter

from formats.csv import guard_column
from sources.base import Column, Row

CHUNK_BYTES = 1 << 20
MAX_ROWS = 1_048_576  # the sheet's hard limit, header included


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class XlsxWriter:
    extension = "xlsx"
    content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.columns = tuple(columns)
        self.formula_guard = formula_guard
        self._guarded = [i for i, c in enumerate(self.columns) if c.type == "string"] if formula_guard else []
        fd, self.path = tempfile.mkstemp(prefix="dataport-", suffix=".xlsx")
        os.close(fd)
        # Removes the temp file even if finish() is never run to the end (or never called).
        self._cleanup = weakref.finalize(self, _remove, self.path)
        self._workbook = xlsxwriter.Workbook(
            self.path,
            {
                "constant_memory": True,
                "strings_to_numbers": False,
                "strings_to_formulas": False,
                "strings_to_urls": False,
                # NaN and infinity have no number cell; write Excel's error values instead of failing.
                "nan_inf_to_errors": True,
            },
        )
        self._sheet = self._workbook.add_worksheet()
        self._row = 0

    def begin(self) -> bytes:
        names = [c.name for c in self.columns]
        self._write_rows([guard_column(names) if self.formula_guard else names])
        return b""

    def write(self, rows: Sequence[Row]) -> bytes:
        if rows and self._guarded:
            cells: list[Sequence[Any]] = list(zip(*rows, strict=True))
            for i in self._guarded:
                cells[i] = guard_column(cells[i])
            rows = list(zip(*cells, strict=True))
        self._write_rows(rows)
        return b""

    def finish(self) -> Iterator[bytes]:
        try:
            self._workbook.close()
            with open(self.path, "rb") as file:
                while chunk := file.read(CHUNK_BYTES):
                    yield chunk
        finally:  # also when the consumer closes the generator early
            self.close()

    def close(self) -> None:
        """Remove the temp file; safe to call at any time, and more than once."""
        self._cleanup()

    def _write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        # xlsxwriter silently drops cells past the last sheet row; a cut-off export must fail.
        if self._row + len(rows) > MAX_ROWS:
            raise ValueError(f"XLSX holds at most {MAX_ROWS - 1:,} rows besides the header")
        write_row, row = self._sheet.write_row, self._row
        for values in rows:
            write_row(row, 0, values)
            row += 1
        self._row = row
