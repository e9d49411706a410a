"""CSV reader: UTF-8 (BOM or not), a header row, RFC 4180 quoting, any mix of CRLF, LF and CR.

The stdlib ``csv`` module does the parsing, fed whole lines: ``Utf8Chunks`` decodes 64 KiB at a
time, the text is cut after its last line break (the rest waits for the next read) and split into
lines in C, and ``csv.reader`` pulls them through ``chain.from_iterable``, so no Python code runs
per line and only a little per row. A quoted cell may hold line breaks; the csv module carries its
state from one line to the next.

``batches(size)`` is the way through a file for imports: ``RowBatch``es of columns (the rows are
turned into columns ``TAKE_ROWS`` at a time, so that the row lists die young: kept for a whole
batch, they outlived the garbage collector's young generation, and its full collections, walking
the worker's whole heap again and again, cost ~1 s per 1,000,000 rows). ``records()`` is the same
rows one ``Record`` at a time, read through ``batches``.

Broken rows and the csv module
    ``strict=True`` makes text after a closing quote (``"a"b``) an error instead of a silent
    guess, and a quote left open at the end of the file an error instead of one huge last cell.
    After an error the csv module starts afresh on the next line, which is only right if the
    broken row's quotes are balanced by the end of the line it failed on. So the reader counts
    the quotes of the row's lines (the last two chunks are kept for that): an even count, and the
    row is a row problem; an odd one, and the lines after it are skipped, unparsed and unkept, up
    to the one that closes the quote, and then it is a row problem too. Only a broken row whose
    first line is no longer in hand is a ``FileError`` (then nobody can say where the next row
    starts), unless the csv module gave up on a cell too large: that cell must be a quoted one
    opened before the current line, and the count of this line's quotes tells whether it closes.
    (A quote inside an unquoted cell, ``ab"c``, which the csv module takes as text, can fool the
    count; then the rows after a broken row may fail as well, and their problems say why.)

Cell size
    A cell over ``max_cell_bytes`` fails its row. The csv module's ``field_size_limit`` stops a
    runaway field (an open quote) before it eats memory, but it is one process-wide setting: each
    reader raises it to its own limit if it is lower, never lowers it. The exact check (UTF-8
    bytes, not characters) is ours, and costs nothing on the common path: a row can only hold a
    big cell if it spans a newly read chunk, or if the chunk it came from is itself long.

Line length
    A physical line longer than ``MAX_LINE_CELLS`` cells' worth of ``max_cell_bytes`` is a
    ``FileLimitError`` (``FILE_LIMIT_EXCEEDED``): no valid row is that long, and holding it would
    make memory grow with the file.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from itertools import chain, islice

from formats.csv import unguard
from formats.records import (
    FileError,
    FileLimitError,
    Record,
    RowBatch,
    as_text,
    csv_line,
    shorten,
    text_over,
)
from formats.utf8 import ByteStream, Utf8Chunks

MAX_LINE_CELLS = 16

# records() reads this many rows at a time (batches() is the quick way through a file).
RECORD_BATCH = 64
# batches() takes this many rows from the csv module at a time, then turns them into columns.
TAKE_ROWS = 256

# str.splitlines() breaks lines at these too; the csv module (and Excel) does not.
_ODD_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ODD_ASCII_BREAKS = "\x0b\x0c\x1c\x1d\x1e"


def _raise_field_limit(limit: int) -> None:
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _lines(rows: list[list[str]]) -> int:
    """The lines the csv module read for ``rows``: one each, and one more for each line break in
    their (quoted) cells."""
    return sum(1 + sum(cell.count("\n") + cell.count("\r") - cell.count("\r\n") for cell in row) for row in rows)


def _split_lines(text: str) -> list[str]:
    """``text`` (ending in a line break) as lines with their endings, broken where csv breaks them."""
    odd = _ODD_ASCII_BREAKS if text.isascii() else _ODD_BREAKS
    if any(c in text for c in odd):  # rare: let io split at \r, \n and \r\n only
        return list(io.StringIO(text, newline=""))
    return text.splitlines(True)


class CsvReader:
    def __init__(self, stream: ByteStream, *, max_cell_bytes: int) -> None:
        self.max_cell_bytes = max_cell_bytes
        self._source = Utf8Chunks(stream, format="CSV")
        _raise_field_limit(max_cell_bytes)
        self._max_line = MAX_LINE_CELLS * max_cell_bytes
        self._lines: list[str] = []  # the lines last handed to the csv module (one read's worth)
        self._lines_before = 0  # lines handed over before those
        self._previous: list[str] = []  # the read's worth before that
        self._skipped = 0  # lines taken past the csv module (inside a broken row's open quote)
        self._handed = 0  # chunks handed over so far: a row read across one may hold a big cell
        self._chars = (0, 0)  # the characters of the chunk before and of the current one
        self._long = False  # the current chunk is long enough for any row of it to hold one
        self._input = chain.from_iterable(self._line_lists())
        self._reader = csv.reader(self._input, strict=True)
        self.fields = self._read_header()

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read

    def _line(self) -> int:
        """The number of the line the csv module read last."""
        return self._reader.line_num + self._skipped

    # --- lines -------------------------------------------------------------------------------

    def _line_lists(self) -> Iterator[list[str]]:
        pending: list[str] = []  # the pieces of a line no read has finished yet
        waiting = 0  # their length
        quarter = self.max_cell_bytes // 4  # text this short cannot exceed the limit in UTF-8
        for text in self._source.texts():
            if pending and pending[-1][-1] == "\r" and text[0] != "\n":
                # The "\r" that waited for a "\n" ended a line by itself (CR line endings).
                yield self._hand_over(["".join(pending)], waiting, waiting > quarter)
                pending.clear()
                waiting = 0
            # Cut after the last line break; a "\r" at the very end waits, as a "\n" may follow it.
            last = text.rfind("\n") + 1 or text.rfind("\r", 0, len(text) - 1) + 1
            if not last:
                pending.append(text)
                waiting += len(text)
                if waiting > self._max_line:
                    raise self._too_long(self._lines_before + len(self._lines) + 1)
                continue
            lines = _split_lines(text[:last] if last < len(text) else text)
            long = last > quarter
            chars = last + waiting if pending else last
            if pending:  # the first line began in an earlier read
                pending.append(lines[0])
                lines[0] = "".join(pending)
                long = long or waiting > quarter
                pending.clear()
            if last < len(text):
                pending.append(text[last:])
            waiting = len(text) - last
            yield self._hand_over(lines, chars, long)
            if waiting > self._max_line:
                raise self._too_long(self._lines_before + len(self._lines) + 1)
        if pending:
            yield self._hand_over(["".join(pending)], waiting, waiting > quarter)

    def _too_long(self, line: int) -> FileError:
        return FileLimitError(
            f"line {line:,} is longer than {self._max_line:,} characters without a line break: "
            f"no row can be that long (each cell may hold at most {self.max_cell_bytes:,} bytes); "
            "is this a CSV file?"
        )

    def _hand_over(self, lines: list[str], chars: int, long: bool) -> list[str]:
        self._lines_before += len(self._lines)
        self._previous, self._lines = self._lines, lines
        self._chars = (self._chars[1], chars)
        self._handed += 1
        self._long = long
        return lines

    def _lines_from(self, first: int, last: int) -> list[str] | None:
        """Lines ``first`` to ``last`` (numbered from 1), if still in hand."""
        start = self._lines_before - len(self._previous)
        if first <= start or last > self._lines_before + len(self._lines):
            return None
        return (self._previous + self._lines)[first - start - 1 : last - start]

    # --- header ------------------------------------------------------------------------------

    def _read_header(self) -> list[str]:
        try:
            row = next(filter(None, self._reader), None)  # blank lines before the header do not count
        except csv.Error as error:
            raise FileError(f"the header row (line {self._reader.line_num}) is not valid CSV: {error}") from None
        if row is None:
            raise FileError(
                "the file is empty: a CSV import needs a header row naming the columns, then one row per record"
            )
        names = [unguard(name) for name in row]  # exports guard header names like any text
        while names and not names[-1].strip():  # empty columns a spreadsheet left at the right
            names.pop()
        if not names:
            raise FileError("the header row has no column names: the first line must name the columns")
        blank = [str(i) for i, name in enumerate(names, 1) if not name.strip()]
        if blank:
            raise FileError(
                f"the header has no name for column {', '.join(blank)}: "
                "every column needs a name in the first row (or delete the empty column)"
            )
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names, 1):
            seen.setdefault(name, []).append(i)
        twice = [f"{name!r} (columns {', '.join(map(str, at))})" for name, at in seen.items() if len(at) > 1]
        if twice:
            raise FileError(f"the header names a column more than once: {'; '.join(twice)}; each may appear once")
        return names

    # --- rows --------------------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        for batch in self.batches(RECORD_BATCH):
            yield from batch.records()

    def batches(self, size: int) -> Iterator[RowBatch]:
        """The rows ``size`` at a time (blank lines count), as ``RowBatch``es of columns.

        The csv module's rows are taken ``TAKE_ROWS`` at a time (``list.extend`` of an
        ``islice``: no Python code per row; a row the csv module refuses stops it, the rows
        before stay) and turned into columns at once, so that the row lists die young (before the
        garbage collector looks at them). Python looks at single rows only in a taken that needs
        it: one with a blank, ragged or broken row, or with a cell that may be over the size
        limit (more than a quarter of it in characters, in a taken read across a new read, where a
        big cell can be: see the module docstring). A ``FileError`` met within a batch is raised
        after the batch's rows before it are yielded."""
        reader, fields, n = self._reader, self.fields, len(self.fields)
        quarter = self.max_cell_bytes // 4
        number = 0
        failure: FileError | None = None
        eof = False
        taken: list[list[str]] = []
        while not eof:
            columns: list[list[str]] = [[] for _ in range(n)]
            numbers: list[int] = []
            problems: list[Record] = []
            first = number
            while failure is None and not eof and number - first < size:
                asked = min(size - (number - first), TAKE_ROWS)
                start, handed = reader.line_num, self._handed
                error: csv.Error | None = None
                try:
                    taken.extend(islice(reader, asked))
                except csv.Error as e:
                    error = e
                except FileError as e:
                    failure = e
                got = len(taken)
                eof = error is None and failure is None and got < asked
                if got:
                    # Rows read within one taken of text, or across two together no longer than a
                    # quarter of the limit, hold no cell over it; only other rows need looking at.
                    handovers = self._handed - handed
                    big = self._long if handovers == 0 else handovers > 1 or sum(self._chars) > quarter
                    big = big and max(map(len, chain.from_iterable(taken)), default=0) > quarter
                    if not big and set(map(len, taken)) == {n}:
                        rows = taken
                        numbers.extend(range(number + 1, number + 1 + got))
                    else:
                        rows = self._rows(taken, number, numbers, problems, quarter if big else None)
                    if rows:
                        for column, cells in zip(columns, zip(*rows, strict=False), strict=True):  # rows of n cells
                            column.extend(cells)
                    number += got
                if error is not None:
                    number += 1
                    try:
                        problems.append(self._broken(number, start + _lines(taken) + self._skipped + 1, str(error)))
                    except FileError as e:
                        failure = e
                taken.clear()
            if numbers or problems:
                yield RowBatch(fields, columns, numbers, problems)
            if failure is not None:
                raise failure

    def _rows(
        self, taken: list[list[str]], number: int, numbers: list[int], problems: list[Record], quarter: int | None
    ) -> list[list[str]]:
        """The rows ``taken`` (``number`` rows before them) one by one: the good ones (cut to the
        header's length) are returned and numbered, the broken ones are problems, blank ones are
        skipped; with ``quarter``, a row with a cell longer than that is checked for its size."""
        fields, n = self.fields, len(self.fields)
        rows = []
        for row in taken:
            number += 1
            if quarter is not None and row and max(map(len, row)) > quarter:
                problem = self._size_problem(row, number)
                if problem:
                    problems.append(Record(number, dict(zip(fields, row, strict=False)), problem, row, csv_line))
                    continue
            if len(row) == n:
                rows.append(row)
                numbers.append(number)
            elif row:  # a blank line is skipped (but counted)
                record = self._uneven(number, row)
                if record.problem is None:
                    rows.append(row[:n])
                    numbers.append(number)
                else:
                    problems.append(record)
        return rows

    def _size_problem(self, row: list[str], number: int) -> str | None:
        limit = self.max_cell_bytes
        for i, cell in enumerate(row):
            if text_over(cell, limit):
                name = self.fields[i] if i < len(self.fields) else f"column {i + 1}"
                return f"row {number}: the cell in {name} is larger than {limit:,} bytes (the limit per cell)"
        return None

    def _uneven(self, number: int, row: list[str]) -> Record:
        n = len(self.fields)
        values = dict(zip(self.fields, row, strict=False))  # the cells there are
        if len(row) > n and not any(row[n:]):  # empty cells past the last name: a spreadsheet's
            return Record(number, values)
        problem = f"row {number} has {len(row)} cell{'s' if len(row) > 1 else ''}, the header has {n}"
        if len(row) > n:
            problem += " (a cell holding a comma must be in double quotes)"
        return Record(number, values, problem, row, csv_line)

    def _broken(self, number: int, start: int, message: str) -> Record:
        """The row the csv module refused (``start``: its first line) as a row problem, once the
        lines of an open quote in it are skipped; a ``FileError`` if that cannot be known."""
        line = self._line()
        if "unexpected end of data" in message:
            raise self._open_quote(number, start)
        too_large = "field larger than field limit" in message
        if too_large:
            problem = f"row {number} has a cell larger than {self.max_cell_bytes:,} bytes (the limit per cell)"
        elif "expected after" in message:
            problem = (
                f"row {number} is not valid CSV: a quoted cell goes on after its closing quote "
                '(a quote inside a cell is written twice: "")'
            )
        else:
            problem = f"row {number} is not valid CSV ({message})"
        lines = self._lines_from(start, line)
        if lines is not None:
            open_quote = sum(text.count('"') for text in lines) % 2 == 1
        elif too_large:  # the cell began lines ago, so it is quoted: its quote is open unless this line closes it
            lines = self._lines_from(line, line) or []
            open_quote = sum(text.count('"') for text in lines) % 2 == 0
        else:
            raise FileError(
                f"{problem}, at line {line:,}; the rows after it cannot be read reliably, so the import stops there"
            )
        if open_quote:
            for text in self._input:  # not parsed, not kept: up to the line that closes the quote
                self._skipped += 1
                if text.count('"') % 2:
                    break
            else:
                raise self._open_quote(number, start)
        return Record(number, {}, problem, shorten("".join(lines).rstrip("\r\n")), as_text)

    def _open_quote(self, number: int, start: int) -> FileError:
        return FileError(
            f"the file ends inside a quoted cell: row {number} (line {start:,}) opens a double quote "
            'that is never closed; close it (a quote inside a cell is written twice: "")'
        )
