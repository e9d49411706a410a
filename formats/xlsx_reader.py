"""XLSX reader: the first sheet of a workbook, its first row the header, through openpyxl.

openpyxl's read-only mode streams the sheet's XML out of the zip archive row by row (shared
strings, if any, are held whole: that is the format). ``data_only=False`` keeps formulas as
formulas, so a formula cell is reported (paste values instead) rather than read as its last
cached result, which a file written by a program other than a spreadsheet may not even have.

Cells come as openpyxl gives them: ``str``, ``int``, ``float``, ``bool``, ``datetime`` (a number
formatted as a date), ``None`` for an empty cell. Text is un-escaped as Excel does (``_x000D_``
is a carriage return; openpyxl leaves the escapes in place). An error value (``#N/A``) or a
formula fails its row. A record's number is its sheet row minus one. Empty rows at the end are
skipped; an empty row between rows is a record of empty cells, because that is how an export
writes a row whose every value is null. A row may stop short of the header's width (empty cells
at the end are not stored), but a value in a column without a header name fails its row.

``bytes_read`` counts the bytes openpyxl has read from the file (the zip's directory, then the
sheet as it is inflated), at most the file's size: good enough for a progress bar.
"""

from __future__ import annotations

import datetime as dt
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import openpyxl
from openpyxl.utils import get_column_letter
from openpyxl.utils.escape import unescape

from formats.csv import unguard
from formats.readers import FileError, Record, csv_line, text_over


class CountingFile:
    """A seekable binary file that counts the bytes read through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.read_total = 0
        start = file.tell()
        self.size = file.seek(0, 2)
        file.seek(start)

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self.read_total += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def cell_text(value: Any) -> str:
    """A cell as text, for original()."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def xlsx_line(cells: list) -> str:
    return csv_line([cell_text(v) for v in cells])


# The damage a broken archive or sheet shows while rows are read.
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, SyntaxError, KeyError)


class XlsxReader:
    def __init__(self, stream: BinaryIO, *, max_cell_bytes: int) -> None:
        self.max_cell_bytes = max_cell_bytes
        self._file = CountingFile(stream)
        self._done = False  # every row read: the whole file counts as read
        try:
            self._book = openpyxl.load_workbook(self._file, read_only=True, data_only=False)
        except Exception as error:  # openpyxl raises a dozen kinds for a file that is not a workbook
            raise FileError(
                "the file is not an XLSX workbook that can be read "
                f"({type(error).__name__}: {str(error)[:200] or 'no detail'}); save it from your spreadsheet "
                "as 'Excel Workbook (.xlsx)': old .xls files and password-protected workbooks cannot be read"
            ) from None
        if not self._book.worksheets:
            self._book.close()
            raise FileError("the workbook has no sheet: the first sheet must hold a header row and the rows")
        sheet = self._book.worksheets[0]
        self.sheet_name = sheet.title
        sheet.reset_dimensions()  # some writers store wrong dimensions; read the rows that are there
        self._rows = sheet.iter_rows()
        self.fields = self._read_header()

    @property
    def bytes_read(self) -> int:
        if self._done:
            return self._file.size
        return min(self._file.read_total, self._file.size)

    def _read_header(self) -> list[str]:
        try:
            row = next(self._rows, None)
        except _DAMAGE as error:
            self._book.close()
            raise FileError(f"the workbook is damaged ({type(error).__name__}: {error})") from None
        if row is None or all(cell.value is None for cell in row):
            self._book.close()
            raise FileError(f"the first row of the sheet {self.sheet_name!r} is empty: it must name the columns")
        names = []
        for cell in row:
            value = cell.value
            if cell.data_type == "f":
                self._book.close()
                raise FileError(f"the header cell {cell.coordinate} holds a formula; type the column name instead")
            if isinstance(value, str):
                value = unguard(unescape(value))
            names.append("" if value is None else cell_text(value))
        while names and not names[-1].strip():
            names.pop()
        blank = [get_column_letter(i) for i, name in enumerate(names, 1) if not name.strip()]
        if blank:
            self._book.close()
            raise FileError(
                f"the header has no name in column {', '.join(blank)}: every column needs a name in the "
                "first row (or delete the empty column)"
            )
        seen: dict[str, list[str]] = {}
        for i, name in enumerate(names, 1):
            seen.setdefault(name, []).append(get_column_letter(i))
        twice = [f"{name!r} (columns {', '.join(at)})" for name, at in seen.items() if len(at) > 1]
        if twice:
            self._book.close()
            raise FileError(f"the header names a column more than once: {'; '.join(twice)}; each may appear once")
        return names

    def records(self) -> Iterator[Record]:
        fields, n = self.fields, len(self.fields)
        limit = self.max_cell_bytes
        quarter = limit // 4
        number = 0
        empty = 0  # empty rows just read
        try:
            for row in self._rows:
                number += 1
                values: list[Any] = []
                problem = None
                for cell in row:
                    value = cell.value
                    if value is None:
                        values.append(None)
                        continue
                    kind = cell.data_type
                    if kind == "f":
                        formula = getattr(value, "text", value)
                        problem = problem or (
                            f"cell {cell.coordinate} holds a formula ({str(formula)[:60]}); paste values instead"
                        )
                    elif kind == "e":
                        problem = problem or f"cell {cell.coordinate} holds the error value {value}"
                    elif value.__class__ is str:
                        if "_x" in value:
                            value = unescape(value)
                        if len(value) > quarter and text_over(value, limit) and problem is None:
                            problem = f"cell {cell.coordinate} is larger than {limit:,} bytes (the limit per cell)"
                    values.append(value)
                if len(values) > n:
                    extra = next((i for i in range(n, len(values)) if values[i] is not None), None)
                    if extra is not None and problem is None:
                        problem = f"cell {row[extra].coordinate} has a value, but its column has no name in the header"
                elif len(values) < n:
                    values += [None] * (n - len(values))
                if problem is None and not any(v is not None for v in values):
                    empty += 1  # a record of empty cells if a row follows, else nothing
                    continue
                for at in range(number - empty, number):
                    yield Record(at, dict.fromkeys(fields), None, [None] * n, xlsx_line)
                empty = 0
                record = dict(zip(fields, values, strict=False))  # values past the names: a problem
                yield Record(number, record, problem, values, xlsx_line)
        except _DAMAGE as error:
            raise FileError(f"the workbook is damaged after row {number:,} ({type(error).__name__}: {error})") from None
        else:
            self._done = True
        finally:
            self._book.close()
