"""XLSX reader: the first sheet of a workbook, its first row the header, through openpyxl.

openpyxl's read-only mode reads the workbook's parts (shared strings, if any, are held whole: that
is the format); the sheet's XML is streamed out of the zip archive here, cell by cell, with
openpyxl's own cell parser. ``data_only=False`` keeps formulas as formulas, so a formula cell is
reported (paste values instead) rather than read as its last cached result, which a file written
by a program other than a spreadsheet may not even have.

Bounds (issue 15), so that a small file cannot cost a lot:

* Before openpyxl reads anything, the archive's directory is measured (``check_archive``): at
  most ``MAX_MEMBERS`` members, each part openpyxl holds whole (shared strings, styles, the
  workbook) within its limit, the shared strings counted as they inflate (each costs ~140 bytes
  held, however short: 3.5 million took 500 MB), the sheets' inflated total within ``xlsx_max_inflated_bytes``, and
  no member of more than 1 MiB inflated more than ``xlsx_max_ratio`` times its compressed size.
  Python's zipfile never inflates a member past the size its directory declares, so the
  declared sizes are a real bound. Any of these is a ``FileLimitError``.
* A row may hold at most ``MAX_COLUMNS`` cells, and no cell may lie beyond ``XFD1048576`` (the
  largest sheet Excel makes): the sheet is read cell by cell, so a row is refused as soon as it
  goes past, before it is held. Cells right of the header are not kept (the first one with a
  value fails its row); cells and rows read are cleared from the XML tree at once.
* A number of more than ``MAX_NUMBER_CHARS`` characters is a ``LongNumber`` (it fails its cell,
  naming the column), never ``int()``; a cell that cannot be read (a shared string index past the
  table) fails its row.

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
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

import openpyxl
from openpyxl.utils import get_column_letter
from openpyxl.utils.cell import coordinate_to_tuple
from openpyxl.utils.escape import unescape
from openpyxl.worksheet._reader import CELL_TAG, ROW_TAG, VALUE_TAG, WorkSheetParser
from openpyxl.xml.functions import iterparse

from formats.csv import unguard
from formats.limits import MAX_NUMBER_CHARS, LongNumber, ParseLimits
from formats.records import FileError, FileLimitError, Record, csv_line, text_over

# Excel's largest sheet: XFD1048576.
MAX_COLUMNS = 16_384
MAX_ROWS = 1_048_576
# An XLSX workbook has a dozen members; a directory this long is not one.
MAX_MEMBERS = 10_000
# Parts openpyxl reads whole (the workbook, styles, relations), apart from the shared strings.
MAX_PART_BYTES = 32 * 1024 * 1024
# The inflated/compressed ratio is only judged for members larger than this.
RATIO_FROM_BYTES = 1024 * 1024


class SeekableFile(Protocol):
    """What zipfile reads an archive from."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


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


def xlsx_line(cells: list[Any]) -> str:
    return csv_line([cell_text(v) for v in cells])


# The damage a broken archive or sheet shows while rows are read.
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, SyntaxError, KeyError)

MiB = 1024 * 1024


def _size(n: int) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n:,} bytes"


# zipfile's reader of the end-of-directory record and its fields (private, but stable since Python 2,
# and so not in the type stubs): it reads only the end record.
_end_record: Callable[[SeekableFile], list[Any] | None] = zipfile._EndRecData  # type: ignore[attr-defined]
_ECD_ENTRIES_TOTAL: int = zipfile._ECD_ENTRIES_TOTAL  # type: ignore[attr-defined]
_ECD_SIZE: int = zipfile._ECD_SIZE  # type: ignore[attr-defined]


def check_archive(file: SeekableFile, limits: ParseLimits) -> None:
    """Refuse an archive whose parts would inflate past the limits (see the module docstring),
    from its directory alone. A file that is not a zip archive passes: openpyxl says what it is."""
    file.seek(0)
    try:
        end = _end_record(file)
    except OSError:
        end = None
    if not end:
        file.seek(0)
        return
    if end[_ECD_ENTRIES_TOTAL] > MAX_MEMBERS or end[_ECD_SIZE] > MAX_MEMBERS * 1024:
        raise FileLimitError(
            f"the archive lists {end[_ECD_ENTRIES_TOTAL]:,} members; an XLSX workbook has a few dozen "
            f"(at most {MAX_MEMBERS:,} are read)"
        )
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            _check_members(archive, limits)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError):
        pass  # openpyxl reports the damage
    file.seek(0)


# A shared string ends with </si> (or is <si/>), with or without a namespace prefix.
_SHARED_STRING_END = re.compile(rb"</(?:[A-Za-z0-9_]+:)?si>|<(?:[A-Za-z0-9_]+:)?si\s*/>")


def _check_members(archive: zipfile.ZipFile, limits: ParseLimits) -> None:
    sheets = 0
    for member in archive.infolist():
        name, inflated = member.filename, member.file_size
        if inflated > RATIO_FROM_BYTES and inflated > limits.xlsx_max_ratio * max(member.compress_size, 1):
            raise FileLimitError(
                f"the member {name[:100]!r} inflates {inflated / max(member.compress_size, 1):,.0f} times "
                f"(to {_size(inflated)}); at most {limits.xlsx_max_ratio:,} times is read (a zip bomb?)"
            )
        lower = name.lower()
        if lower.endswith("sharedstrings.xml"):
            if inflated > limits.xlsx_max_shared_strings_bytes:
                raise FileLimitError(
                    f"the workbook's shared strings inflate to {_size(inflated)}; at most "
                    f"{_size(limits.xlsx_max_shared_strings_bytes)} can be read (they are held whole while "
                    "the sheet is read): split the sheet into smaller files, or save it as CSV UTF-8"
                )
            _count_shared_strings(archive, member, limits.xlsx_max_shared_strings)
        elif lower.startswith("xl/worksheets/"):
            sheets += inflated
        elif lower.endswith((".xml", ".rels")) and inflated > MAX_PART_BYTES:
            raise FileLimitError(
                f"the part {name[:100]!r} inflates to {_size(inflated)}; at most {_size(MAX_PART_BYTES)} is read"
            )
    if sheets > limits.xlsx_max_inflated_bytes:
        raise FileLimitError(
            f"the workbook's sheets inflate to {_size(sheets)}; at most {_size(limits.xlsx_max_inflated_bytes)} "
            "can be read: split the rows into smaller files, or save the sheet as CSV UTF-8"
        )


def _count_shared_strings(archive: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int) -> None:
    """Count the shared strings as they inflate (a MiB at a time), before openpyxl holds them all:
    each costs ~140 bytes held, whatever its length (3.5 million short ones took 500 MB)."""
    count = 0
    carry = b""
    with archive.open(member) as source:
        while chunk := source.read(MiB):
            data = carry + chunk
            count += len(_SHARED_STRING_END.findall(data))
            cut = data.rfind(b"<")  # a tag cut off at the end is counted with the next read
            carry = data[cut:] if cut >= 0 and data.find(b">", cut) < 0 else b""  # (holds no whole match)
            if count > limit:
                raise FileLimitError(
                    f"the workbook holds more than {limit:,} shared strings (distinct texts); at most {limit:,} "
                    "can be read (they are held whole while the sheet is read): split the sheet into smaller "
                    "files, or save it as CSV UTF-8"
                )


def _coordinate(row: int, column: int) -> str:
    return f"{get_column_letter(column)}{row}" if column <= MAX_COLUMNS else f"column {column:,} of row {row:,}"


class XlsxReader:
    def __init__(self, stream: BinaryIO, *, max_cell_bytes: int, limits: ParseLimits | None = None) -> None:
        self.max_cell_bytes = max_cell_bytes
        self._file = CountingFile(stream)
        self._done = False  # every row read: the whole file counts as read
        check_archive(self._file, limits or ParseLimits())
        try:
            self._book = openpyxl.load_workbook(self._file, read_only=True, data_only=False)
            if not self._book.worksheets:
                self._book.close()
                raise FileError("the workbook has no sheet: the first sheet must hold a header row and the rows")
            sheet = self._book.worksheets[0]
            self.sheet_name = sheet.title
            # openpyxl's read-only internals (not in its stubs): the open archive and the sheet's part.
            source = self._book._archive.open(sheet._worksheet_path)  # type: ignore[attr-defined]
        except FileError:
            raise
        except Exception as error:  # openpyxl raises a dozen kinds for a file that is not a workbook
            raise FileError(
                "the file is not an XLSX workbook that can be read "
                f"({type(error).__name__}: {str(error)[:200] or 'no detail'}); save it from your spreadsheet "
                "as 'Excel Workbook (.xlsx)': old .xls files and password-protected workbooks cannot be read"
            ) from None
        # openpyxl's own cell parser (shared strings, dates, formulas), fed one cell at a time.
        self._cells = WorkSheetParser(
            source,
            sheet._shared_strings,  # type: ignore[attr-defined]  # openpyxl internals, as above
            data_only=False,
            epoch=self._book.epoch,
            date_formats=self._book._date_formats,  # type: ignore[attr-defined]  # openpyxl internals
            timedelta_formats=self._book._timedelta_formats,  # type: ignore[attr-defined]  # (as above)
        )
        self._source = source
        self._width = MAX_COLUMNS  # cells kept per row: the header's width once it is read
        self._rows = self._sheet_rows()
        self.fields = self._read_header()
        self._width = len(self.fields)

    @property
    def bytes_read(self) -> int:
        if self._done:
            return self._file.size
        return min(self._file.read_total, self._file.size)

    def _close(self) -> None:
        self._source.close()
        self._book.close()

    # --- the sheet, cell by cell -------------------------------------------------------------

    def _sheet_rows(self) -> Iterator[tuple[int, list[Any], list[str], str | None]]:
        """Each stored row: its number, its values (up to the header's width; a formula or error
        cell as openpyxl gives it), its cells' kinds, and the first problem of a cell (a value
        right of the header, a cell that cannot be read). Only "end" events: a row's number is
        known at its end, and its cells are read (and cleared) as each one ends."""
        parser = self._cells
        number = 0
        values: list[Any] = []
        kinds: list[str] = []
        problem: str | None = None
        extra = 0  # the first column right of the header with a value
        count = 0
        for _, element in iterparse(self._source):
            tag = element.tag
            if tag == CELL_TAG:
                count += 1
                if count > MAX_COLUMNS:
                    raise FileLimitError(
                        f"row {number + 1:,} of the sheet holds more than {MAX_COLUMNS:,} cells, "
                        "the most a sheet row can have"
                    )
                cell, trouble = self._cell(element, number + 1)
                element.clear()
                if trouble is not None:
                    problem = problem or trouble
                    continue
                column = cell["column"]
                if column > self._width:
                    if column > MAX_COLUMNS:
                        raise FileLimitError(
                            f"the sheet has a cell in column {column:,}, beyond column XFD (a sheet ends at XFD1048576)"
                        )
                    if cell["value"] is not None and not extra:
                        extra = column
                    continue
                if column > len(values):
                    values += [None] * (column - len(values))
                    kinds += ["n"] * (column - len(kinds))
                values[column - 1], kinds[column - 1] = cell["value"], cell["data_type"]
            elif tag == ROW_TAG:
                r = element.get("r")
                number = int(r) if r and r.isdigit() and len(r) < 10 else number + 1
                if number > MAX_ROWS:
                    raise FileLimitError(
                        f"the sheet has a row {number:,}; a sheet ends at row {MAX_ROWS:,} (XFD1048576)"
                    )
                # Cleared, a row stays in the tree as an empty element (~80 bytes: 80 MB for a full
                # sheet of 1,048,576 rows, as in openpyxl): dropping it needs "start" events, 20% slower.
                element.clear()
                if extra and problem is None:
                    problem = (
                        f"cell {get_column_letter(extra)}{number} has a value, but its column has no name in the header"
                    )
                yield number, values, kinds, problem
                values, kinds, problem, extra, count = [], [], None, 0, 0
                parser.row_counter, parser.col_counter = number + 1, 0

    def _cell(self, element: Any, row: int) -> tuple[dict[str, Any], str | None]:
        """openpyxl's reading of one cell, or why it cannot be read."""
        try:
            if element.get("t", "n") == "n":
                text = element.findtext(VALUE_TAG)
                if text is not None and len(text) > MAX_NUMBER_CHARS:
                    at = element.get("r")
                    column = coordinate_to_tuple(at)[1] if at else self._cells.col_counter + 1
                    self._cells.col_counter = column
                    return {"row": row, "column": column, "value": LongNumber(text), "data_type": "n"}, None
            return self._cells.parse_cell(element), None
        except (ValueError, IndexError, TypeError, OverflowError) as error:
            at = element.get("r") or f"{self._cells.col_counter + 1} of row {row:,}"
            return {}, f"cell {at[:20]} cannot be read ({type(error).__name__}: {str(error)[:100]})"

    def _read_header(self) -> list[str]:
        try:
            first = next(self._rows, None)
        except _DAMAGE as error:
            self._close()
            raise FileError(f"the workbook is damaged ({type(error).__name__}: {error})") from None
        except FileError:
            self._close()
            raise
        if first is None or first[0] != 1 or all(v is None for v in first[1]):
            self._close()
            raise FileError(f"the first row of the sheet {self.sheet_name!r} is empty: it must name the columns")
        _, row, kinds, trouble = first
        if trouble is not None:
            self._close()
            raise FileError(f"the header cannot be read: {trouble}")
        names = []
        for i, (value, kind) in enumerate(zip(row, kinds, strict=True), 1):
            if kind == "f":
                self._close()
                raise FileError(
                    f"the header cell {get_column_letter(i)}1 holds a formula; type the column name instead"
                )
            if isinstance(value, str):
                value = unguard(unescape(value))
            names.append("" if value is None else cell_text(value))
        while names and not names[-1].strip():
            names.pop()
        blank = [get_column_letter(i) for i, name in enumerate(names, 1) if not name.strip()]
        if blank:
            self._close()
            raise FileError(
                f"the header has no name in column {', '.join(blank[:20])}: every column needs a name in the "
                "first row (or delete the empty column)"
            )
        seen: dict[str, list[str]] = {}
        for i, name in enumerate(names, 1):
            seen.setdefault(name, []).append(get_column_letter(i))
        twice = [f"{name!r} (columns {', '.join(at)})" for name, at in seen.items() if len(at) > 1]
        if twice:
            self._close()
            raise FileError(f"the header names a column more than once: {'; '.join(twice)}; each may appear once")
        return names

    def records(self) -> Iterator[Record]:
        fields, n = self.fields, len(self.fields)
        limit = self.max_cell_bytes
        quarter = limit // 4
        last = 1  # the sheet row read last (the header)
        number = 0
        empty = 0  # empty rows just read
        try:
            for row_number, values, kinds, trouble in self._rows:
                problem = trouble
                for i, value in enumerate(values):
                    if value is None:
                        continue
                    kind = kinds[i]
                    if kind == "f":
                        formula = getattr(value, "text", value)
                        problem = problem or (
                            f"cell {get_column_letter(i + 1)}{row_number} holds a formula ({str(formula)[:60]}); "
                            "paste values instead"
                        )
                    elif kind == "e":
                        at = f"{get_column_letter(i + 1)}{row_number}"
                        problem = problem or f"cell {at} holds the error value {value}"
                    elif value.__class__ is str:
                        if "_x" in value:
                            value = values[i] = unescape(value)
                        if len(value) > quarter and text_over(value, limit) and problem is None:
                            problem = (
                                f"cell {get_column_letter(i + 1)}{row_number} is larger than {limit:,} bytes "
                                "(the limit per cell)"
                            )
                if len(values) < n:
                    values += [None] * (n - len(values))
                # Rows the sheet does not store between the last one and this one are empty.
                empty += max(0, row_number - last - 1)
                last = row_number
                number = row_number - 1
                if problem is None and not any(v is not None for v in values):
                    empty += 1  # a record of empty cells if a row follows, else nothing
                    continue
                for skipped in range(number - empty, number):
                    yield Record(skipped, dict.fromkeys(fields), None, [None] * n, xlsx_line)
                empty = 0
                record = dict(zip(fields, values, strict=True))
                yield Record(number, record, problem, values, xlsx_line)
        except _DAMAGE as error:
            raise FileError(f"the workbook is damaged after row {number:,} ({type(error).__name__}: {error})") from None
        else:
            self._done = True
        finally:
            self._close()
