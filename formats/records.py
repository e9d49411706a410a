"""What every reader hands on, and the helpers the readers share (``formats.readers`` picks one).

A reader (``csv_reader``, ``json_reader``, ``xlsx_reader``) turns a file into ``Record``s, one per
row, and the CSV reader also into ``RowBatch``es, a batch of rows column by column. Two kinds of
trouble, kept apart because the worker treats them differently:

* ``FileError``: the file as a whole cannot be read (not UTF-8, no header, JSON that is not an
  array, not an XLSX workbook…). The import fails; the message tells the user what and where.
* ``Record.problem``: one row is broken (a ragged CSV row, a cell over the size limit, an NDJSON
  line that is not JSON, a formula cell). That row fails; the others go on.

The rest is how a broken row is shown in the error report (``csv_line``, ``json_text``,
``as_text``, ``shorten``) and how a cell is measured against the size limit (``text_over``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

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


def text_over(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes in UTF-8, encoding only when it may."""
    n = len(text)
    return n > limit or (n * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit)
