"""The reader seam for imports: a file in, one ``Record`` per row out, streamed.

``reader_for(format, stream, max_cell_bytes=…)`` picks a reader by its GraphQL ``FileFormat`` name;
the readers live beside this file (``csv_reader``, ``json_reader``, ``xlsx_reader``) and are imported
only when asked for, so that a CSV import never pays for openpyxl's import.

Two kinds of trouble, kept apart because the worker treats them differently:

* ``FileError``: the file as a whole cannot be read (not UTF-8, no header, JSON that is not an
  array, not an XLSX workbook…). The import fails; the message tells the user what and where.
* ``Record.problem``: one row is broken (a ragged CSV row, a cell over the size limit, an NDJSON
  line that is not JSON, a formula cell). That row fails; the others go on.

What a reader does not do is judge cells against the dataset's columns: ``formats.cells`` does.
The CSV reader also reads a batch of rows at a time, column by column (``RowBatch``), for
``formats.cells.ColumnChecker``: that is how the worker reads CSV.

Text formats (CSV, JSON, NDJSON) are read through ``Utf8Chunks``: fixed-size reads, UTF-8 checked
as the bytes arrive (a multi-byte character split between two reads is carried over), a BOM
dropped, bytes counted for progress. Memory is a few chunks, whatever the file's size.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import orjson

from formats.limits import ParseLimits

# Reads of this size: large enough that the per-read Python work is noise, small enough to stay
# in the cache. boto3's StreamingBody may return fewer bytes; that is fine.
CHUNK_BYTES = 64 * 1024

# original() of a broken record shows at most this many characters (a 10 MB cell is not worth
# copying into an error report).
ORIGINAL_MAX_CHARS = 10_000


class FileError(Exception):
    """The file as a whole cannot be read. The message is for the end user: what is wrong, where
    (line, row, element or byte offset), and what to do about it. ``code`` is the task's error code."""

    code = "INVALID_FILE"


class FileLimitError(FileError):
    """The file goes past one of the parsers' hard bounds (``formats.limits``): nesting depth, a
    row's size, an archive's inflated size or ratio, a sheet's dimensions. Refused before the
    bound is crossed, never after."""

    code = "FILE_LIMIT_EXCEEDED"


def csv_line(cells: Any) -> str:
    """Cells as one CSV line (RFC 4180 quoting, no line ending): how an error report shows a row."""
    buffer = io.StringIO()
    # The line terminator is what makes the writer quote a cell holding CR or LF: keep it, then cut it.
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()[:-2]


def json_text(value: Any) -> str:
    """A JSON value as compact JSON. orjson refuses integers beyond 64 bits; the stdlib does not."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        import json

        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def as_text(value: Any) -> str:
    """Text kept as it was (bytes decoded): a line too broken to be anything else."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def shorten(text: str, limit: int = ORIGINAL_MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


@dataclass(slots=True)
class Record:
    """One row of the file, as read.

    ``number``: CSV and XLSX count data rows from 1 (the header is not a row; blank lines and empty
    sheet rows are skipped but counted, so that ``number + 1`` is the row a spreadsheet shows, as
    long as no cell holds a line break); JSON counts array elements from 1; NDJSON counts lines
    from 1 (blank lines counted), so the number is the line to look at.
    """

    number: int
    values: dict[str, Any]
    problem: str | None = None
    # What original() shows and how; None for a well-formed CSV row, whose values are its cells.
    raw: Any = field(default=None, repr=False)
    render: Callable[[Any], str] | None = field(default=None, repr=False)

    def original(self) -> str:
        """The record as the user wrote it, for the error report: CSV and XLSX as one CSV line,
        JSON and NDJSON as compact JSON (an NDJSON line that is not JSON as its text). Cut off
        after ``ORIGINAL_MAX_CHARS``."""
        if self.render is None:
            return shorten(csv_line(self.values.values()))
        return shorten(self.render(self.raw))


@dataclass(slots=True)
class RowBatch:
    """Rows of a file with a header, a batch at a time (``CsvReader.batches``), column by column:
    the well-formed rows' cells (``columns[k][i]`` is field ``k`` of record ``numbers[i]``; every
    row has one cell per field), and the broken records (``problems``, each with its number and
    problem). Both in file order."""

    fields: list[str]
    columns: list[list[str]]
    numbers: list[int]
    problems: list[Record]

    def row(self, i: int) -> list[str]:
        return [column[i] for column in self.columns]

    def original(self, i: int) -> str:
        """Row ``i`` as ``Record.original`` shows it."""
        return shorten(csv_line(self.row(i)))

    def records(self) -> Iterator[Record]:
        """The batch as ``Record``s, in file order."""
        fields = self.fields
        problems = iter(self.problems)
        problem = next(problems, None)
        rows = zip(*self.columns, strict=True) if self.numbers else ()
        for number, row in zip(self.numbers, rows, strict=True):
            while problem is not None and problem.number < number:
                yield problem
                problem = next(problems, None)
            yield Record(number, dict(zip(fields, row, strict=True)))
        if problem is not None:
            yield problem
            yield from problems


class Reader(Protocol):
    # CSV/XLSX: the header's names, read when the reader is made. JSON/NDJSON: None (each record
    # carries its own keys).
    fields: list[str] | None

    @property
    def bytes_read(self) -> int:
        """Bytes of the underlying stream consumed so far (for progress)."""
        ...

    def records(self) -> Iterator[Record]:
        """The rows, streamed; raises ``FileError`` for a problem with the file as a whole."""
        ...

    # Optional (CSV): ``batches(size) -> Iterator[RowBatch]``, the same records a batch at a time,
    # for ``formats.cells.ColumnChecker``; the worker uses it where a reader has it.


def reader_for(format: str, stream: BinaryIO, *, max_cell_bytes: int, limits: ParseLimits | None = None) -> Reader:
    """A reader for ``stream`` in ``format`` (CSV, JSON, NDJSON or XLSX, any case); ``KeyError`` for
    another name.

    ``stream`` needs only ``read(n)`` (a local file or boto3's StreamingBody), except for XLSX, a
    zip archive, which needs a seekable file. CSV and XLSX readers read the header here, so this
    may raise ``FileError`` already. A cell larger than ``max_cell_bytes`` (UTF-8) fails its row;
    ``limits`` are the other bounds (``formats.limits``; the settings' defaults when None).
    """
    limits = limits or ParseLimits()
    name = format.upper()
    if name == "CSV":
        from formats.csv_reader import CsvReader

        return CsvReader(stream, max_cell_bytes=max_cell_bytes)
    if name == "JSON":
        from formats.json_reader import JsonReader

        return JsonReader(stream, max_cell_bytes=max_cell_bytes, max_nesting=limits.max_nesting)
    if name == "NDJSON":
        from formats.json_reader import NdjsonReader

        return NdjsonReader(stream, max_cell_bytes=max_cell_bytes, max_nesting=limits.max_nesting)
    if name == "XLSX":
        from formats.xlsx_reader import XlsxReader

        return XlsxReader(stream, max_cell_bytes=max_cell_bytes, limits=limits)
    raise KeyError(format)


def text_over(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes in UTF-8, encoding only when it may."""
    n = len(text)
    return n > limit or (n * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit)


# --- UTF-8 chunks ------------------------------------------------------------------------------

_BOM = "\ufeff"


class Utf8Chunks:
    """A binary stream read in ``CHUNK_BYTES`` pieces and checked to be UTF-8 on the way.

    ``texts()`` yields the decoded text, ``chunks()`` the same bytes undecoded (JSON parsers want
    bytes); either way a leading BOM is dropped, and bytes that are not UTF-8 raise ``FileError``
    naming the line and byte offset, after everything before them has been yielded.
    """

    def __init__(self, stream: BinaryIO, *, format: str) -> None:
        self._stream = stream
        self._format = format
        self.bytes_read = 0
        self._newlines = 0  # "\n" in the bytes yielded so far: the line number of an error

    def chunks(self) -> Iterator[bytes]:
        for data, _ in self._decoded():
            yield data

    def texts(self) -> Iterator[str]:
        for _, text in self._decoded():
            yield text

    def _decoded(self) -> Iterator[tuple[bytes, str]]:
        read, decode = self._stream.read, codecs.utf_8_decode
        carry = b""  # the start of a character cut off at the end of the last read
        offset = 0  # where carry (or the next chunk) starts in the file
        first = True
        while True:
            chunk = read(CHUNK_BYTES) or b""
            self.bytes_read += len(chunk)
            data = carry + chunk if carry else chunk
            if first and data:
                self._sniff(data)
            bad = None
            try:
                text, used = decode(data, "strict", not chunk)
            except UnicodeDecodeError as error:
                bad, bad_byte, bad_offset = error.start, data[error.start], offset + error.start
                text, used = data[:bad].decode("utf-8"), bad  # what comes before it is still read
            if first and text:
                first = False
                if text[0] == _BOM:
                    text, data, used, offset = text[1:], data[3:], used - 3, offset + 3
            if used < len(data):
                carry, data = data[used:], data[:used]
            else:
                carry = b""
            if data:
                offset += len(data)
                self._newlines += data.count(b"\n")
                yield data, text
            if bad is not None:
                raise self._not_utf8(bad_byte, bad_offset)
            if not chunk:
                return

    def _sniff(self, data: bytes) -> None:
        """Files that are plainly something else, named before their bytes make a worse error."""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise FileError(
                "the file is UTF-16 text, not UTF-8: save it as UTF-8 (in Excel: 'CSV UTF-8') and upload it again"
            )
        if data.startswith(b"PK\x03\x04"):
            raise FileError(
                f"the file is a zip archive (an XLSX workbook?), not {self._format} text: "
                "choose XLSX as the format, or save the sheet as CSV UTF-8"
            )

    def _not_utf8(self, byte: int, offset: int) -> FileError:
        return FileError(
            f"the file is not UTF-8 text: line {self._newlines + 1:,} holds the byte 0x{byte:02X} "
            f"(at byte offset {offset:,}), which is not UTF-8 (the file may be Latin-1 or Windows-1252); "
            "save it as UTF-8 (in Excel: 'CSV UTF-8') and upload it again"
        )
