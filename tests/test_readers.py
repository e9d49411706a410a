"""Import readers and cell conversion: real files and bytes in, records and typed rows out.

No servers needed. ``python tests/test_readers.py [rows]`` times reading + converting a CSV of
10 mixed columns (1,000,000 rows by default).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import sys
import time
import tracemalloc
import zipfile

import openpyxl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import writer_for
from formats.column_checker import (
    CANONICAL_DATETIME_TEXT,
    DATE_TEXT,
    NO_OUTPUT,
    PLAIN_FLOAT_TEXT,
    TEXT,
    TYPED,
    ColumnChecker,
    text_form,
)
from formats.converters import CellError, converter
from formats.header_check import header_problems
from formats.readers import reader_for
from formats.records import FileError, Record, csv_line
from formats.row_converter import RowConverter
from formats.utf8 import CHUNK_BYTES
from sources.base import Column, Dataset

MiB = 1024 * 1024


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes a read, as a network body may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        size = self.step if n is None or n < 0 else min(n, self.step)
        out = self.data[self.at : self.at + size]
        self.at += len(out)
        return out


def read_all(fmt: str, data: bytes, *, limit: int = MiB, step: int | None = None) -> tuple[object, list[Record]]:
    stream = Trickle(data, step) if step else io.BytesIO(data)
    reader = reader_for(fmt, stream, max_cell_bytes=limit)
    return reader, list(reader.records())


def rows_of(fmt: str, data: bytes, **kw) -> list[tuple[int, dict, str | None]]:
    return [(r.number, r.values, r.problem) for r in read_all(fmt, data, **kw)[1]]


def file_error(fmt: str, data: bytes, **kw) -> str:
    with pytest.raises(FileError) as caught:
        read_all(fmt, data, **kw)
    return str(caught.value)


def xlsx_bytes(rows: list[list]) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def test_reader_for_takes_any_case_and_refuses_other_formats():
    assert read_all("csv", b"a\n1\n")[0].fields == ["a"]
    assert read_all("NdJson", b'{"a":1}\n')[1][0].values == {"a": 1}
    with pytest.raises(KeyError):
        reader_for("TSV", io.BytesIO(b""), max_cell_bytes=10)


# --- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_csv_utf8_with_or_without_bom(bom):
    reader, records = read_all("CSV", bom + "name,city\nZoë,Köln 🎉\n".encode())
    assert reader.fields == ["name", "city"]
    assert records[0].values == {"name": "Zoë", "city": "Köln 🎉"}


def test_bom_split_across_reads_is_still_dropped():
    for step in (1, 2):
        assert read_all("CSV", b"\xef\xbb\xbfid\n1\n", step=step)[0].fields == ["id"]
        assert rows_of("NDJSON", b'\xef\xbb\xbf{"a":1}\n', step=step) == [(1, {"a": 1}, None)]
        assert rows_of("JSON", b'\xef\xbb\xbf [{"a":1}]', step=step) == [(1, {"a": 1}, None)]


@pytest.mark.parametrize("step", [1, 3, 7, CHUNK_BYTES - 1])
def test_multibyte_characters_split_between_reads(step):
    text = "é中🎉" * 30_000  # 270,000 bytes: every character is cut by some read boundary
    data = f"id,text\n1,{text}\n2,x\n".encode()
    records = read_all("CSV", data, step=step)[1]
    assert [r.values for r in records] == [{"id": "1", "text": text}, {"id": "2", "text": "x"}]
    assert read_all("NDJSON", f'{{"t":"{text}"}}\n'.encode(), step=step)[1][0].values == {"t": text}


def test_latin1_byte_names_its_line_and_says_save_as_utf8():
    message = file_error("CSV", b"id,name\n1,ok\n2,caf\xe9\n")
    assert "line 3 holds the byte 0xE9 (at byte offset 18)" in message
    assert "save it as UTF-8" in message


def test_bad_byte_after_the_first_chunk_names_the_right_line_after_the_rows_before_it():
    lines = [f"{i},{'x' * 60}\n".encode() for i in range(1, 5001)]  # ~320 KB: five chunks
    lines[3999] = b"4000,caf\xe9\n"
    data = b"id,text\n" + b"".join(lines)
    reader = reader_for("CSV", io.BytesIO(data), max_cell_bytes=MiB)
    seen = []
    with pytest.raises(FileError) as caught:
        for record in reader.records():
            seen.append(record.number)
    assert "line 4,001 holds the byte 0xE9" in str(caught.value)
    assert seen == list(range(1, 4000))  # every row before the bad line (row 4,000) was read
    assert "line 3 holds the byte 0xFF" in file_error("NDJSON", b'{"a":1}\n{"a":2}\n{"a":"\xff"}\n')
    assert "not UTF-8" in file_error("JSON", b'[{"a":1},\n{"a":"\xc3\x28"}]')


def test_utf16_and_zip_files_are_named():
    assert "UTF-16" in file_error("CSV", "a,b\n".encode("utf-16"))
    xlsx = xlsx_bytes([["a"], [1]])
    assert "zip archive (an XLSX workbook?)" in file_error("CSV", xlsx)
    assert "choose XLSX" in file_error("JSON", xlsx)


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_empty_file_and_header_only():
    assert "the file is empty" in file_error("CSV", b"")
    assert "the file is empty" in file_error("CSV", b"\xef\xbb\xbf\r\n\n")
    reader, records = read_all("CSV", b"id,name\r\n")
    assert reader.fields == ["id", "name"] and records == []


def test_csv_header_problems_are_file_errors():
    assert "more than once: 'a' (columns 1, 3)" in file_error("CSV", b"a,b,a\n1,2,3\n")
    assert "no name for column 2" in file_error("CSV", b"a,,c\n1,2,3\n")
    assert "no name for column 1" in file_error("CSV", b" ,b\n1,2\n")


def test_csv_empty_columns_at_the_right_are_ignored_unless_they_hold_something():
    data = b"a,b,,\n1,2,,\n3,4\n5,6,,x\n"
    assert rows_of("CSV", data) == [
        (1, {"a": "1", "b": "2"}, None),
        (2, {"a": "3", "b": "4"}, None),
        (
            3,
            {"a": "5", "b": "6"},
            "row 3 has 4 cells, the header has 2 (a cell holding a comma must be in double quotes)",
        ),
    ]


def test_csv_ragged_rows_are_row_problems_with_their_original():
    records = read_all("CSV", b"a,b,c,d\n1,2,3,4\n1,2,3\n1,2,3,4,5\n9,9,9,9\n")[1]
    assert [(r.number, r.problem) for r in records] == [
        (1, None),
        (2, "row 2 has 3 cells, the header has 4"),
        (3, "row 3 has 5 cells, the header has 4 (a cell holding a comma must be in double quotes)"),
        (4, None),
    ]
    assert records[2].original() == "1,2,3,4,5"


def test_csv_unclosed_quote_names_the_line_its_row_starts():
    message = file_error("CSV", b'id,note\n1,fine\n2,"never closed\n3,more\n4,text\n')
    assert "row 2 (line 3) opens a double quote that is never closed" in message


def test_csv_text_after_a_closing_quote_fails_that_row_only():
    records = read_all("CSV", b'a,b\n"x"y,2\n3,4\n')[1]
    assert records[0].problem.startswith("row 1 is not valid CSV: a quoted cell goes on after its closing quote")
    assert records[0].original() == '"x"y,2'
    assert (records[1].number, records[1].values, records[1].problem) == (2, {"a": "3", "b": "4"}, None)


def test_csv_broken_row_with_an_open_quote_skips_to_the_line_that_closes_it():
    data = b'a,b\n"x"y,"open\nstill open, "" inside\nclosed",2\n3,4\n'
    records = read_all("CSV", data)[1]
    assert [(r.number, r.problem is None) for r in records] == [(1, False), (2, True)]
    assert records[1].values == {"a": "3", "b": "4"}


def test_csv_ten_megabyte_cell_fails_its_row_and_memory_stays_bounded():
    big = b"x" * 10_000_000
    data = b"id,blob,n\n1,a,1\n2," + big + b",2\n3,c,3\n"
    tracemalloc.start()
    try:
        records = read_all("CSV", data)[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.number, r.problem) for r in records] == [
        (1, None),
        (2, "row 2 has a cell larger than 1,048,576 bytes (the limit per cell)"),
        (3, None),
    ]
    assert records[2].values == {"id": "3", "blob": "c", "n": "3"}
    assert len(records[1].original()) < 11_000  # cut short for the error report
    assert peak < 40 * MiB, peak  # the line and a cell's worth, not more


def test_csv_large_quoted_cell_over_many_lines_fails_its_row_only():
    inside = b"".join(b"line %d of a long quoted cell\n" % i for i in range(60_000))  # ~2 MB, 30 chunks
    data = b'id,blob\n1,"' + inside + b'"\n2,after\n'
    records = read_all("CSV", data)[1]
    assert [(r.number, r.problem) for r in records] == [
        (1, "row 1 has a cell larger than 1,048,576 bytes (the limit per cell)"),
        (2, None),
    ]
    assert records[1].values == {"id": "2", "blob": "after"}


def test_csv_cell_over_the_limit_in_bytes_but_not_in_characters():
    data = b"id,t\n1," + "é".encode() * 600 + b"\n2,ok\n"  # 600 characters, 1,200 bytes
    assert [r[2] for r in rows_of("CSV", data, limit=1000)] == [
        "row 1: the cell in t is larger than 1,000 bytes (the limit per cell)",
        None,
    ]
    assert [r[2] for r in rows_of("CSV", data, limit=1200)] == [None, None]


def test_csv_line_without_a_break_longer_than_any_row_is_a_file_error():
    message = file_error("CSV", b"a,b\n" + b"x" * 20_000, limit=1000)
    assert "line 2 is longer than 16,000 characters without a line break" in message


def test_csv_mixed_line_endings_and_quoted_line_breaks():
    data = b'id,note\r\n1,"two\r\nlines"\n2,plain\r3,"lf\nonly"\r\n4,"cr\ronly"\n\n5,last'
    assert rows_of("CSV", data, step=3) == [
        (1, {"id": "1", "note": "two\r\nlines"}, None),
        (2, {"id": "2", "note": "plain"}, None),
        (3, {"id": "3", "note": "lf\nonly"}, None),
        (4, {"id": "4", "note": "cr\ronly"}, None),
        (6, {"id": "5", "note": "last"}, None),  # the blank line counts as row 5
    ]


def test_csv_line_separators_that_csv_does_not_break_at_stay_in_cells():
    data = "a,b\n1,x\u2028y\x0bz\x0c\n2,w\n".encode()
    assert rows_of("CSV", data) == [(1, {"a": "1", "b": "x\u2028y\x0bz\x0c"}, None), (2, {"a": "2", "b": "w"}, None)]


def test_csv_original_requotes_cells():
    record = read_all("CSV", b'a,b,c\n"x, y","say ""hi""","two\nlines"\n')[1][0]
    assert record.original() == '"x, y","say ""hi""","two\nlines"'


def test_csv_header_names_are_unguarded_like_cells():
    reader = read_all("CSV", b"'=total,'-x,name\n1,2,3\n")[0]
    assert reader.fields == ["=total", "-x", "name"]


def test_bytes_read_advances_as_records_are_consumed():
    data = b"id,text\n" + b"".join(b"%d,%s\n" % (i, b"y" * 90) for i in range(5000))  # ~475 KB
    reader = reader_for("CSV", io.BytesIO(data), max_cell_bytes=MiB)
    records = reader.records()
    next(records)
    early = reader.bytes_read
    assert 0 < early <= 2 * CHUNK_BYTES
    for _ in range(3000):
        next(records)
    assert early < reader.bytes_read < len(data)
    list(records)
    assert reader.bytes_read == len(data)
    ndjson = b"".join(b'{"i":%d,"t":"%s"}\n' % (i, b"z" * 90) for i in range(5000))
    reader = reader_for("NDJSON", io.BytesIO(ndjson), max_cell_bytes=MiB)
    records = reader.records()
    next(records)
    assert reader.bytes_read <= CHUNK_BYTES
    list(records)
    assert reader.bytes_read == len(ndjson)
    array = b"[" + ndjson.replace(b"}\n", b"},\n")[:-2] + b"]"
    reader = reader_for("JSON", io.BytesIO(array), max_cell_bytes=MiB)
    records = reader.records()
    next(records)
    assert reader.bytes_read <= CHUNK_BYTES
    assert sum(1 for _ in records) == 4999 and reader.bytes_read == len(array)


class LazyCsv(io.RawIOBase):
    """A CSV file of ``size`` bytes made as it is read, never whole in memory."""

    def __init__(self, size: int) -> None:
        self.size, self.sent, self.row, self.buffer = size, 0, 0, b"id,name,price,when,note\n"

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self.buffer) < n and self.sent + len(self.buffer) < self.size:
            rows = range(self.row, self.row + 500)
            self.row += 500
            self.buffer += b"".join(
                b'%d,name %d,%d.25,2024-05-17T12:00:00Z,"a note, with ""quotes"" and\nlines"\n' % (i, i, i)
                for i in rows
            )
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        self.sent += len(out)
        return out


def test_memory_stays_small_while_reading_a_50_mb_csv():
    stream = LazyCsv(50 * 1000 * 1000)
    tracemalloc.start()
    try:
        reader = reader_for("CSV", stream, max_cell_bytes=MiB)
        count = 0
        for record in reader.records():
            count += 1
            assert record.problem is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count > 500_000 and reader.bytes_read >= 50_000_000
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB"


# --- JSON and NDJSON ---------------------------------------------------------------------------


def test_json_array_of_objects():
    data = b' [ {"a": 1, "b": "x"},\n {"a": 2.5, "b": null, "c": [1, {"d": true}]} ]\n'
    assert rows_of("JSON", data, step=5) == [
        (1, {"a": 1, "b": "x"}, None),
        (2, {"a": 2.5, "b": None, "c": [1, {"d": True}]}, None),
    ]
    assert rows_of("JSON", b"[]") == [] and rows_of("JSON", b"\n [ ] \n") == []


def test_json_top_level_must_be_an_array():
    message = file_error("JSON", b'{"a": 1}\n{"a": 2}\n')
    assert "a JSON import must be one array of objects" in message
    assert "the file starts with an object (one object a line is NDJSON: choose that format)" in message
    assert "the file starts with a string" in file_error("JSON", b'  "x"')
    assert "the file starts with a number" in file_error("JSON", b"42")
    assert "the file starts with the character 'é'" in file_error("JSON", "é,ü\n".encode())
    assert "the file is empty" in file_error("JSON", b"")
    assert "the file is empty" in file_error("JSON", b" \n\t ")


def test_json_elements_that_are_not_objects_are_row_problems():
    records = read_all("JSON", b'[{"a":1}, 5, "x", [1], null, {"a":2}]')[1]
    assert [(r.number, r.problem) for r in records] == [
        (1, None),
        (2, "element 2 is a number, not an object"),
        (3, "element 3 is a string, not an object"),
        (4, "element 4 is a list, not an object"),
        (5, "element 5 is null, not an object"),
        (6, None),
    ]
    assert [r.original() for r in records[1:5]] == ["5", '"x"', "[1]", "null"]


def test_json_truncated_after_some_elements():
    data = b'[{"a":1},{"a":2},{"a":3},{"a":'
    reader = reader_for("JSON", io.BytesIO(data), max_cell_bytes=MiB)
    seen = []
    with pytest.raises(FileError) as caught:
        for record in reader.records():
            seen.append(record.values)
    assert seen == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert "the JSON ends early, after element 3: the file seems cut off" in str(caught.value)
    assert "the JSON ends early, before the first element" in file_error("JSON", b"[")


def test_json_syntax_errors_say_after_which_element():
    message = file_error("JSON", b'[{"a":1}, {"a":2} {"a":3}]')
    assert message.startswith("the JSON is not valid after element 2")
    assert "expect ',' or ']'" in message
    assert "followed by more text" in file_error("JSON", b'[{"a":1}] [2]')


def test_json_large_value_fails_its_element():
    big = "é" * 700  # 1,400 bytes
    data = f'[{{"a":"{big}"}}, {{"a":"ok"}}, {{"a":{{"n":"{big}"}}}}]'.encode()
    records = read_all("JSON", data, limit=1000)[1]
    assert [(r.number, r.problem) for r in records] == [
        (1, "element 1: the value of 'a' is larger than 1,000 bytes (the limit per cell)"),
        (2, None),
        (3, "element 3: the value of 'a' is larger than 1,000 bytes (the limit per cell)"),
    ]


def test_ndjson_lines_blank_lines_and_bad_lines():
    data = b'{"a":1}\r\n\n  \n{"a":2,"b":"x"}\nnot json\n[1,2]\n{"a":3}'
    records = read_all("NDJSON", data, step=4)[1]
    assert [(r.number, r.values, r.problem) for r in records] == [
        (1, {"a": 1}, None),
        (4, {"a": 2, "b": "x"}, None),
        (5, {}, "line 5 is not valid JSON: invalid literal, expected 'null' (at character 1)"),
        (6, {}, "line 6 holds a list, not an object"),
        (7, {"a": 3}, None),
    ]
    assert records[2].original() == "not json"
    assert records[0].original() == '{"a":1}'


def test_ndjson_overlong_line_is_a_row_problem_read_no_further():
    long_line = b'{"a":"' + b"x" * 100_000 + b'"}\n'
    data = b'{"a":1}\n' + long_line + b'{"a":2}\n'
    tracemalloc.start()
    try:
        records = read_all("NDJSON", data, limit=1000, step=4096)[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.number, r.problem) for r in records] == [
        (1, None),
        (2, "line 2 is longer than 16,000 bytes (each value may hold at most 1,000); it was not read"),
        (3, None),
    ]
    assert records[1].original().startswith('{"a":"xxx') and len(records[1].original()) < 1100
    assert peak < 200_000  # the long line was never held


def test_ndjson_large_value_fails_its_line():
    records = read_all("NDJSON", b'{"a":"' + b"x" * 1500 + b'"}\n{"a":"y"}\n', limit=1000)[1]
    assert [r.problem for r in records] == [
        "line 1: the value of 'a' is larger than 1,000 bytes (the limit per cell)",
        None,
    ]


# --- XLSX ----------------------------------------------------------------------------------------


def test_xlsx_formula_cells_are_row_problems():
    data = xlsx_bytes([["a", "b", "c"], [1, 2, 3], [4, 5, "=SUM(A1:A3)"], [7, 8, 9]])
    reader, records = read_all("XLSX", data)
    assert reader.fields == ["a", "b", "c"]
    assert [(r.number, r.problem) for r in records] == [
        (1, None),
        (2, "cell C3 holds a formula (=SUM(A1:A3)); paste values instead"),
        (3, None),
    ]
    assert records[1].original() == "4,5,=SUM(A1:A3)"


def test_xlsx_not_a_workbook():
    message = file_error("XLSX", b"a,b\n1,2\n")
    assert message.startswith("the file is not an XLSX workbook that can be read (BadZipFile")
    assert "save it from your spreadsheet as 'Excel Workbook (.xlsx)'" in message
    assert "not an XLSX workbook" in file_error("XLSX", b"PK\x03\x04 not really a zip")


def test_xlsx_empty_rows_at_the_end_are_skipped_and_cells_past_the_header_fail():
    data = xlsx_bytes([["a", "b", None], [1, "x"], [], [None, None], [2], [3, "y", "extra"], [], []])
    records = read_all("XLSX", data)[1]
    assert [(r.number, r.values, r.problem) for r in records] == [
        (1, {"a": 1, "b": "x"}, None),
        (2, {"a": None, "b": None}, None),  # an empty row between rows: how exports write a row of nulls
        (3, {"a": None, "b": None}, None),
        (4, {"a": 2, "b": None}, None),
        (5, {"a": 3, "b": "y"}, "cell C6 has a value, but its column has no name in the header"),
    ]


def test_xlsx_header_must_name_columns_once():
    assert "more than once: 'a' (columns A, C)" in file_error("XLSX", xlsx_bytes([["a", "b", "a"], [1, 2, 3]]))
    assert "no name in column B" in file_error("XLSX", xlsx_bytes([["a", None, "c"], [1, 2, 3]]))
    assert "is empty: it must name the columns" in file_error("XLSX", xlsx_bytes([]))


def test_xlsx_spreadsheet_values_convert():
    columns = [Column("d", "date"), Column("t", "datetime"), Column("n", "integer"), Column("ok", "boolean")]
    data = xlsx_bytes(
        [
            ["d", "t", "n", "ok"],
            [dt.datetime(2024, 2, 29), dt.datetime(2024, 5, 17, 12, 30, 15, 500000), 3.0, True],
            [dt.date(2024, 1, 2), "2024-05-17 14:30:00+02:00", 1e16, 1],
            [dt.datetime(2024, 2, 29, 8, 0), None, "12", "yes"],
        ]
    )
    convert = RowConverter(columns, unguard_text=True).convert
    results = [convert(r.values) for r in read_all("XLSX", data)[1]]
    assert results[0] == (("2024-02-29", "2024-05-17T12:30:15.5Z", 3, True), [])
    assert results[1] == (
        None,
        [CellError("n", "1e+16 is too large to be an exact integer here; write it as text or in JSON")],
    )
    assert results[2] == (None, [CellError("d", "2024-02-29T08:00:00 is not a date: it has a time of day")])


def test_xlsx_error_values_and_big_cells_fail_their_rows():
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["a", "b"])
    sheet.append([1, "x" * 2000])
    sheet.append([2, "ok"])
    sheet["A4"] = "#N/A"
    sheet["A4"].data_type = "e"
    out = io.BytesIO()
    book.save(out)
    records = read_all("XLSX", out.getvalue(), limit=1000)[1]
    assert [(r.number, r.problem) for r in records] == [
        (1, "cell B2 is larger than 1,000 bytes (the limit per cell)"),
        (2, None),
        (3, "cell A4 holds the error value #N/A"),
    ]


def test_xlsx_bytes_read_reaches_the_file_size():
    data = xlsx_bytes([["a"]] + [[i] for i in range(2000)])
    reader = reader_for("XLSX", io.BytesIO(data), max_cell_bytes=MiB)
    records = reader.records()
    next(records)
    assert 0 < reader.bytes_read <= len(data)
    list(records)
    assert reader.bytes_read == len(data)


# --- round trips: export file -> reader + cells -> the rows the export started from ---------------

COLUMNS = (
    Column("s"),
    Column("n", "integer"),
    Column("x", "float"),
    Column("b", "boolean"),
    Column("d", "date"),
    Column("t", "datetime"),
)

# Rows as sources give them to writers; what each format can carry exactly.
ROWS = [
    ("plain", 1, 1.5, True, "2024-05-17", "2024-05-17T12:34:56Z"),
    (None, None, None, None, None, None),
    ("emoji 🎉, CJK 日本語, accents éàü ß", -42, -1.5, False, "2024-02-29", "2024-01-01T00:00:00.5Z"),
    ('say "hi", then ""quote""', 2**53 + 1, 0.1, True, "0001-01-01", "1970-01-01T00:00:00.000001Z"),
    ("comma, comma", -(2**63), 1e-07, None, "9999-12-31", "9999-12-31T23:59:59.999999Z"),
    ("line\nfeed", 2**63 - 1, 1e16, True, None, None),
    ("carriage\rreturn", 7, -0.0, False, None, None),
    ("crlf\r\ninside\r\n", 8, 0.1 + 0.2, True, None, None),
    ("=1+2", 9, 1e-300, False, None, None),
    ("'=x", 10, 5e-324, None, None, None),
    ("-1.5", 11, 1.7976931348623157e308, True, None, None),
    ("+SUM(A1)", 12, 123456789.123456789, True, None, None),
    ("@cmd", 13, 2.5e-8, True, None, None),
    ("\t=tab", 14, 1e22, True, None, None),
    ("''=two quotes", 15, 3.0, True, None, None),
    ("_x0041_ looks like an escape", 16, 1e-5, True, None, None),
    (" spaces ", 0, 0.0, False, None, None),
    ("''", 17, -2.0, False, None, None),
]


def same(got: tuple, want: tuple) -> bool:
    """Equal, with floats compared by repr so that -0.0 and 0.0 differ."""
    return len(got) == len(want) and all(
        (repr(g) == repr(w)) if isinstance(w, float) else (g == w and type(g) is type(w))
        for g, w in zip(got, want, strict=True)
    )


def export(fmt: str, rows: list[tuple]) -> bytes:
    writer = writer_for(fmt, COLUMNS)
    return writer.begin() + writer.write(rows) + b"".join(writer.finish())


def round_trip(fmt: str, rows: list[tuple]) -> list[tuple]:
    reader, records = read_all(fmt, export(fmt, rows))
    if reader.fields is not None:
        assert header_problems(reader.fields, COLUMNS) == []
    converter = RowConverter(COLUMNS, unguard_text=fmt in ("CSV", "XLSX"))
    out = []
    for record in records:
        assert record.problem is None, record.problem
        row, errors = converter.convert(record.values)
        assert errors == [], (record.values, errors)
        out.append(row)
    return out


@pytest.mark.parametrize("fmt", ["CSV", "JSON", "NDJSON"])
def test_round_trip_restores_every_value_and_re_export_is_byte_identical(fmt):
    rows = ROWS + [("", 18, 1.0, True, None, None)] if fmt != "CSV" else ROWS
    back = round_trip(fmt, rows)
    assert len(back) == len(rows)
    for got, want in zip(back, rows, strict=True):
        assert same(got, want), (got, want)
    assert export(fmt, back) == export(fmt, rows)


def test_round_trip_csv_empty_text_comes_back_as_no_value():
    # CSV writes "" and None alike; the import reads both as None (documented).
    assert round_trip("CSV", [("", None, None, None, None, None)]) == [(None,) * 6]


def test_round_trip_xlsx():
    # XLSX numbers are doubles written with 16 significant digits (xlsxwriter), and "-0" reads back
    # as 0: the rows here are the ones XLSX carries exactly. The others are below.
    exact = [
        row
        for row in ROWS
        if row[1] is None or abs(row[1]) <= 2**53
        if row[2] is None or (float(f"{row[2]:.16G}") == row[2] and repr(row[2]) != "-0.0")
    ]
    assert len(exact) == 11
    back = round_trip("XLSX", exact)
    for got, want in zip(back, exact, strict=True):
        assert same(got, want), (got, want)


def test_xlsx_keeps_integers_a_double_cannot_hold_as_text():
    """Excel reads number cells as doubles: an integer past 2**53 would be rounded the moment the
    file is opened and saved, so it is written as a text cell, and the import reads it back exact."""
    big = [2**63 - 1, -(2**53) - 1, 2**53, 10**15]
    data = export("XLSX", [("a", n, 0.1 + 0.2, True, None, None) for n in big])
    sheet = zipfile.ZipFile(io.BytesIO(data)).read("xl/worksheets/sheet1.xml")
    assert b"<is><t>9223372036854775807</t></is>" in sheet and b"<v>9007199254740992</v>" in sheet
    records = read_all("XLSX", data)[1]
    converted = [RowConverter(COLUMNS, unguard_text=True).convert(r.values) for r in records]
    assert [(row[1], errors) for row, errors in converted] == [(n, []) for n in big]
    assert records[0].values["x"] == 0.1 + 0.2  # the shortest text that reads back the same double


# --- cells -----------------------------------------------------------------------------------------

# (type, raw cell, unguard_text, expected value or the refusal's reason)
ACCEPTED = [
    ("string", "x", True, "x"),
    ("string", "", True, None),
    ("string", "", False, ""),
    ("string", "'=1+2", True, "=1+2"),
    ("string", "'=1+2", False, "'=1+2"),
    ("string", "''=x", True, "'=x"),
    ("string", "'plain", True, "'plain"),
    ("integer", "12", True, 12),
    ("integer", "+12", True, 12),
    ("integer", "-0012", True, -12),
    ("integer", "-9223372036854775808", True, -(2**63)),
    ("integer", 12, False, 12),
    ("integer", 12.0, False, 12),
    ("integer", "", False, None),
    ("float", "1.5", True, 1.5),
    ("float", "-1.5e-3", True, -0.0015),
    ("float", ".5", True, 0.5),
    ("float", "5.", True, 5.0),
    ("float", "1E+3", True, 1000.0),
    ("float", 2, False, 2.0),
    ("float", "0.1", False, 0.1),
    ("boolean", "true", True, True),
    ("boolean", "FALSE", True, False),
    ("boolean", "Yes", True, True),
    ("boolean", "no", True, False),
    ("boolean", "T", True, True),
    ("boolean", "f", True, False),
    ("boolean", "1", True, True),
    ("boolean", "0", True, False),
    ("boolean", 1, False, True),
    ("boolean", False, False, False),
    ("date", "2024-02-29", True, "2024-02-29"),
    ("date", dt.date(2024, 1, 2), True, "2024-01-02"),
    ("datetime", "2024-05-17T12:34:56Z", True, "2024-05-17T12:34:56Z"),
    ("datetime", "2024-05-17 12:34:56", True, "2024-05-17T12:34:56Z"),
    ("datetime", "2024-05-17T12:34", True, "2024-05-17T12:34:00Z"),
    ("datetime", "2024-05-17t12:34:56.120z", True, "2024-05-17T12:34:56.12Z"),
    ("datetime", "2024-05-17T12:34:56+02:00", True, "2024-05-17T10:34:56Z"),
    ("datetime", "2024-01-01T01:00:00.5+0230", True, "2023-12-31T22:30:00.5Z"),
    ("datetime", "2024-05-17T12:34:56-05", True, "2024-05-17T17:34:56Z"),
    ("datetime", dt.datetime(2024, 5, 17, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=-1))), True,
     "2024-05-17T13:00:00Z"),
]  # fmt: skip

REFUSED = [
    ("string", 12, False, "expected text, got a number (12)"),
    ("string", True, False, "expected text, got true"),
    ("string", {"a": 1}, False, "expected text, got an object"),
    ("integer", "12x", True, "'12x' is not an integer"),
    ("integer", "12.0", True, "'12.0' is not an integer"),
    ("integer", " 12", True, "' 12' is not an integer"),
    ("integer", "1_000", True, "'1_000' is not an integer"),
    ("integer", "١٢", True, "'١٢' is not an integer"),
    ("integer", "9223372036854775808", True, "'9223372036854775808' is out of range for an integer"),
    ("integer", 2**63, False, "9223372036854775808 is out of range for an integer"),
    ("integer", True, False, "expected an integer, got true"),
    ("integer", 1.5, False, "1.5 is not an integer"),
    ("integer", [1], False, "expected an integer, got a list"),
    ("float", "nan", True, "'nan' is not a finite number"),
    ("float", "-Infinity", True, "'-Infinity' is not a finite number"),
    ("float", "1e400", True, "'1e400' is out of range for a float"),
    ("float", "1,5", True, "'1,5' is not a number"),
    ("float", " 1.5", True, "' 1.5' is not a number"),
    ("float", "1_0.5", True, "'1_0.5' is not a number"),
    ("float", math.inf, False, "inf is not a finite number"),
    ("float", False, False, "expected a number, got false"),
    ("boolean", "maybe", True, "'maybe' is not a boolean (true/false, yes/no, t/f or 1/0)"),
    ("boolean", 2, False, "expected a boolean, got a number (2)"),
    ("date", "2024-02-30", True, "'2024-02-30' is not a date (YYYY-MM-DD): day is out of range for month"),
    ("date", "20240102", True, "'20240102' is not a date (YYYY-MM-DD)"),
    ("date", "2024-W01-1", True, "'2024-W01-1' is not a date (YYYY-MM-DD)"),
    ("date", "2024-1-2", True, "'2024-1-2' is not a date (YYYY-MM-DD)"),
    ("date", 20240102, False, "expected a date, got a number (20240102)"),
    ("datetime", "2024-05-17", True, "'2024-05-17' is not a date-time (YYYY-MM-DDTHH:MM:SS"),
    ("datetime", "2024-05-17T25:00:00Z", True, "'2024-05-17T25:00:00Z' is not a date-time: hour must be in 0..23"),
    ("datetime", "2024-05-17T12:00:00.1234567Z", True, "is not a date-time (YYYY-MM-DDTHH:MM:SS"),
    ("datetime", "0001-01-01T00:30:00+01:00", True, "is not a date-time: date value out of range"),
    ("datetime", dt.date(2024, 1, 2), True, "expected a date-time, got a date (2024-01-02)"),
]


@pytest.mark.parametrize(("kind", "raw", "unguard_text", "want"), ACCEPTED)
def test_cells_accepted(kind, raw, unguard_text, want):
    row, errors = RowConverter([Column("c", kind)], unguard_text=unguard_text).convert({"c": raw})
    assert errors == [] and same(row, (want,)), (row, errors)


@pytest.mark.parametrize(("kind", "raw", "unguard_text", "reason"), REFUSED)
def test_cells_refused_with_a_reason(kind, raw, unguard_text, reason):
    row, errors = RowConverter([Column("c", kind)], unguard_text=unguard_text).convert({"c": raw})
    assert row is None and len(errors) == 1 and errors[0].column == "c"
    assert reason in errors[0].reason, errors[0].reason


def test_every_bad_cell_is_listed_and_absent_fields_are_none():
    columns = [
        Column("id", "integer", required=True),
        Column("name", max_length=5),
        Column("price", "float"),
        Column("tag", required=True),
        Column("note"),
    ]
    convert = RowConverter(columns, unguard_text=True).convert
    assert convert({"id": "1", "name": "abcde", "price": "2"}) == (None, [CellError("tag", "required, but empty")])
    assert convert({"id": "", "name": "abcdefg", "price": "x", "tag": "t"}) == (
        None,
        [
            CellError("id", "required, but empty"),
            CellError("name", "longer than 5 characters (7)"),
            CellError("price", "'x' is not a number"),
        ],
    )
    assert convert({"id": "7", "name": "ab", "tag": "t"}) == ((7, "ab", None, "t", None), [])


def test_max_length_counts_characters_after_unguarding():
    convert = RowConverter([Column("s", max_length=4)], unguard_text=True).convert
    assert convert({"s": "日本語🎉"}) == (("日本語🎉",), [])
    assert convert({"s": "'=1+2"}) == (("=1+2",), [])
    assert convert({"s": "'=1+23"})[1] == [CellError("s", "longer than 4 characters (5)")]


def test_long_values_are_cut_in_reasons():
    errors = RowConverter([Column("n", "integer")], unguard_text=True).convert({"n": "9" * 30 + "x" * 100})[1]
    assert errors[0].reason == f"'{'9' * 30}{'x' * 10}…' is not an integer"


CELLS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.from_regex(r"[+-]?[0-9]{1,25}", fullmatch=True),
    st.from_regex(r"[+-]?[0-9]{0,12}\.?[0-9]{0,12}(e[+-]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["", "'", "'=x", "''", "true", "TRUE", "yes", "0", "1", "١", "²", "2024-02-30", "2024-02-29"]),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", fullmatch=True),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,7})?)?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2})?", fullmatch=True),
    st.dates(),
    st.datetimes(),
)  # fmt: skip


def plain(convert, value):
    try:
        return ("ok", repr(convert(value)))
    except ValueError as refused:
        return ("refused", str(refused))


@settings(max_examples=300, deadline=None)
@given(
    cells=st.lists(CELLS, min_size=6, max_size=6),
    unguard_text=st.booleans(),
    required=st.booleans(),
    max_length=st.sampled_from([None, 3]),
)
def test_compiled_row_agrees_with_the_plain_converters(cells, unguard_text, required, max_length):
    """RowConverter's inline fast paths never decide differently from the converters."""
    columns = [Column(f"c{k}", kind, required=required, max_length=max_length) for k, kind in enumerate(
        ("string", "integer", "float", "boolean", "date", "datetime"))]  # fmt: skip
    values = {c.name: v for c, v in zip(columns, cells, strict=True)}
    row, errors = RowConverter(columns, unguard_text=unguard_text).convert(values)
    expected = [plain(converter(c, unguard_text=unguard_text), v) for c, v in zip(columns, cells, strict=True)]
    if row is None:
        assert [(e.column, e.reason) for e in errors] == [
            (c.name, reason) for c, (kind, reason) in zip(columns, expected, strict=True) if kind == "refused"
        ]
    else:
        assert [("ok", repr(v)) for v in row] == expected


# --- column by column: ColumnChecker and CsvReader.batches ---------------------------------------

KINDS = ("string", "integer", "float", "boolean", "date", "datetime")

# What a CSV cell can be: any text, and plenty near the edges of each column form.
TEXT_CELLS = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[+-]?0{0,2}[0-9]{1,21}", fullmatch=True),
    st.from_regex(r"[+-]?[0-9]{0,17}\.?[0-9]{0,45}([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    st.sampled_from(["", "'", "'=x", "''=x", "'plain", "=x", "true", "TRUE", "True", "tRUE", "yes", "No", "0", "1",
                     "-0", "00", "+0", "١", "²", "2024-02-30", "2024-02-29", "1900-02-29", "2000-02-29", "0000-01-01",
                     "0001-01-01", "9999-12-31", "a\nb", "1\n2", "x\0y", "1e-400", "1e400", "nan", "-inf", "4.9e-324",
                     "9223372036854775807", "9223372036854775808", "-9223372036854775808", "123456789012345678",
                     "2015-01-01T00:01:37.000Z", "2015-01-01T00:01:37.100Z", "2015-01-01T00:01:37.0000001Z",
                     "2015-01-01T24:00:00Z", "0001-01-01T00:00:00Z", "2016-02-29T23:59:59.999999Z"]),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", fullmatch=True),
    st.from_regex(r"[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9](:[0-6][0-9](\.[0-9]{0,7})?)?"
                  r"(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)?", fullmatch=True),
    st.dates().map(str),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.floats(allow_nan=False).map(repr),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
)  # fmt: skip


def checked_cells(columns, cells, unguard_text):
    """ColumnChecker's three outputs, which must fail the same records for the same reasons."""
    checker = ColumnChecker(columns, unguard_text=unguard_text)
    typed, errors = checker.check(cells, TYPED)
    none, errors_none = checker.check(cells, NO_OUTPUT)
    assert none is None and errors_none == errors
    text = None
    if unguard_text:
        text, errors_text = checker.check(cells, TEXT)
        assert errors_text == errors
    return typed, text, errors


def assert_agrees_with_the_converters(columns, cells, unguard_text):
    typed, text, errors = checked_cells(columns, cells, unguard_text)
    convert = RowConverter(columns, unguard_text=unguard_text).convert
    for i in range(len(cells[0])):
        row, row_errors = convert({c.name: cells[k][i] for k, c in enumerate(columns)})
        if row is None:
            assert errors.get(i) == row_errors, (i, [c[i] for c in cells])
            continue
        assert i not in errors
        assert [repr(column[i]) for column in typed] == [repr(v) for v in row]
        for k, (column, value) in enumerate(zip(columns, row, strict=True)):
            if text is None:
                continue
            if column.type == "float" and value is not None:
                # The file's own text if it is a plain decimal (PostgreSQL reads it as float() does), else repr.
                assert re.fullmatch(PLAIN_FLOAT_TEXT, text[k][i]) or text[k][i] == repr(value)
                assert repr(float(text[k][i])) == repr(value)
            else:
                assert text[k][i] == text_form(value), (column.type, text[k][i], value)


@settings(max_examples=400, deadline=None)
@given(
    cells=st.lists(st.lists(TEXT_CELLS, min_size=6, max_size=6), min_size=1, max_size=8),
    required=st.booleans(),
    max_length=st.sampled_from([None, 3]),
)
def test_column_checker_agrees_with_the_plain_converters_on_text(cells, required, max_length):
    """The column paths (CSV: all text) decide every cell as its converter does, in every output."""
    columns = [Column(f"c{k}", kind, required=required, max_length=max_length) for k, kind in enumerate(KINDS)]
    assert_agrees_with_the_converters(columns, [list(column) for column in zip(*cells, strict=True)], True)


@settings(max_examples=200, deadline=None)
@given(
    cells=st.lists(st.lists(CELLS, min_size=6, max_size=6), min_size=1, max_size=6),
    unguard_text=st.booleans(),
    required=st.booleans(),
)
def test_column_checker_agrees_with_the_plain_converters_on_any_value(cells, unguard_text, required):
    """Columns holding other values than text (JSON, XLSX) go cell by cell, with the same outcome."""
    columns = [Column(f"c{k}", kind, required=required) for k, kind in enumerate(KINDS)]
    assert_agrees_with_the_converters(columns, [list(column) for column in zip(*cells, strict=True)], unguard_text)


def test_the_column_forms_take_exactly_the_dates_and_times_that_exist():
    date = re.compile(f"(?:{DATE_TEXT})").fullmatch
    for year in (0, 1, 4, 100, 200, 400, 1600, 1700, 1900, 1996, 2000, 2023, 2024, 2100, 2400, 9996, 9999):
        for month in range(14):
            for day in range(33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    dt.date.fromisoformat(text)
                    exists = True
                except ValueError:
                    exists = False
                assert bool(date(text)) == exists, text
    moment = re.compile(f"(?:{CANONICAL_DATETIME_TEXT})").fullmatch
    for hour in range(26):
        for minute in (0, 9, 59, 60, 61):
            for second in (0, 59, 60):
                text = f"2024-02-29T{hour:02d}:{minute:02d}:{second:02d}Z"
                assert bool(moment(text)) == (hour < 24 and minute < 60 and second < 60), text


def test_column_checker_names_each_bad_cell_of_a_failed_record_in_column_order():
    columns = [Column("id", "integer", required=True), Column("name", max_length=5), Column("price", "float"),
               Column("day", "date"), Column("at", "datetime"), Column("ok", "boolean")]  # fmt: skip
    cells = [["1", "", "3", "4"], ["ab", "abcdefg", "'=x", "'''=toolong"], ["1.5", "x", "2.50", "1e400"],
             ["2024-02-29", "2023-02-29", "", "2024-01-01"], ["2024-01-01T00:00:00.500Z", "", "2024-01-01 10:00", "z"],
             ["yes", "FALSE", "maybe", ""]]  # fmt: skip
    typed, text, errors = checked_cells(columns, cells, True)
    assert errors == {
        1: [CellError("id", "required, but empty"), CellError("name", "longer than 5 characters (7)"),
            CellError("price", "'x' is not a number"),
            CellError("day", "'2023-02-29' is not a date (YYYY-MM-DD): day is out of range for month")],
        2: [CellError("ok", "'maybe' is not a boolean (true/false, yes/no, t/f or 1/0)")],
        3: [CellError("name", "longer than 5 characters (10)"),  # one quote less: the guard's
            CellError("price", "'1e400' is out of range for a float"),
            CellError("at", "'z' is not a date-time (YYYY-MM-DDTHH:MM:SS, optionally with a fraction and Z or "
                            "±HH:MM)")],
    }  # fmt: skip
    assert [column[0] for column in typed] == [1, "ab", 1.5, "2024-02-29", "2024-01-01T00:00:00.5Z", True]
    assert [column[0] for column in text] == ["1", "ab", "1.5", "2024-02-29", "2024-01-01T00:00:00.5Z", "t"]
    assert [column[2] for column in text][1:5] == ["=x", "2.50", "", "2024-01-01T10:00:00Z"]


BATCH_FILES = [
    b"a,b\n1,2\n\n3,4\n",
    b"a,b,c,d\n1,2,3,4\n1,2,3\n1,2,3,4,5\n9,9,9,9\n1,2,3,4,,\n",
    b'a,b\n"x"y,2\n3,4\n',
    b'a,b\n"x"y,"open\nstill open, "" inside\nclosed",2\n3,4\n',
    b'id,note\r\n1,"two\r\nlines"\n2,plain\r3,"lf\nonly"\r\n4,"cr\ronly"\n\n5,last',
    b"id,t\n1," + "é".encode() * 600 + b"\n2,ok\n",
    b'id,note\n1,fine\n2,"never closed\n3,more\n4,text\n',
    b"id,t\n1,a\n2,b\n3,\xe9\n4,d\n",
]


@pytest.mark.parametrize("data", BATCH_FILES)
@pytest.mark.parametrize("size", [1, 2, 3, 1000])
def test_csv_batches_hold_the_records_of_records(data, size):
    """batches(size) are records() in columns, whatever the size, a broken file included."""

    def read(records: bool):
        reader = reader_for("CSV", Trickle(data, 7), max_cell_bytes=1000)
        got = []
        try:
            if records:
                for r in reader.records():
                    got.append((r.number, r.values, r.problem, r.original()))
            else:
                for batch in reader.batches(size):
                    assert len({len(c) for c in batch.columns} | {len(batch.numbers)}) == 1
                    assert 0 < len(batch.numbers) + len(batch.problems) <= size
                    got += [(r.number, r.values, r.problem, r.original()) for r in batch.records()]
        except FileError as e:
            got.append(str(e))
        return got

    assert read(records=False) == read(records=True)


@pytest.mark.parametrize("step", [7, 100, 5000])
def test_csv_cell_over_the_limit_across_many_small_reads_fails_its_row(step):
    """A quoted cell over the limit in many short lines, read a few bytes at a time: no read is
    long by itself, the row is found all the same."""
    cell = "\n".join(["y" * 40] * 30)  # 1,229 characters
    data = f'id,t\n0,a\n1,"{cell}"\n2,ok\n'.encode()
    assert rows_of("CSV", data, limit=1000, step=step) == [
        (1, {"id": "0", "t": "a"}, None),
        (2, {"id": "1", "t": cell}, "row 2: the cell in t is larger than 1,000 bytes (the limit per cell)"),
        (3, {"id": "2", "t": "ok"}, None),
    ]
    assert rows_of("CSV", data, limit=1300, step=step)[1][2] is None


def test_csv_batches_are_columns_with_record_numbers():
    reader = reader_for("CSV", io.BytesIO(b"a,b\n1,x\n\n2,y\n3\n4,z\n"), max_cell_bytes=MiB)
    (batch,) = list(reader.batches(100))
    assert batch.fields == ["a", "b"]
    assert batch.columns == [["1", "2", "4"], ["x", "y", "z"]] and batch.numbers == [1, 3, 5]
    assert [(p.number, p.problem) for p in batch.problems] == [(4, "row 4 has 1 cell, the header has 2")]
    assert batch.original(2) == "4,z"


class RecordsOnly:
    """A reader without ``batches``: FileBatches goes record by record."""

    def __init__(self, reader) -> None:
        self.reader, self.fields = reader, reader.fields

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def records(self):
        return self.reader.records()


def run_file_batches(data: bytes, columns, size: int, max_errors: int, by_column: bool, output: int):
    """What the import loop does with FileBatches: batches until done or max_errors rows failed."""
    from workers.imports import FileBatches

    reader = reader_for("CSV", io.BytesIO(data), max_cell_bytes=1000)
    dataset = Dataset(name="d", source="sqlite", url="", table="t", columns=tuple(columns))
    batches = FileBatches(reader if by_column else RecordsOnly(reader), dataset, columns, "CSV", output=output)
    assert batches.by_column == by_column
    rows, failures, records, failed, valid = [], [], 0, 0, 0
    try:
        while True:
            batch = batches.next(size, max_errors - failed)
            valid += batch.valid
            rows += batch.rows if batch.text is None else list(zip(*batch.text, strict=True))
            failures += batch.failures
            records += batch.records
            failed += batch.failed_rows
            if failed >= max_errors or batch.done:
                break
    except FileError as e:
        failures.append(str(e))
    return rows, failures, records, failed, valid


FILE_CELLS = st.sampled_from(["1", "2", "-3", "+4", "007", "x", "", "1.5", "2.50", "1e400", "true", "no", "maybe",
                              "2024-02-29", "2023-02-29", "2024-01-01T00:00:00.10Z", "2024-01-01 10:00", "'=a",
                              "a,b", 'say "hi"', "two\nlines", "toolongtext"])  # fmt: skip
FILE_LINES = st.one_of(
    st.lists(FILE_CELLS, min_size=6, max_size=6).map(csv_line),
    st.sampled_from(["", "1,2", "1,2,3,4,5,6,7", "1,2,3,4,5,6,,", '"x"y,1,2,3,4,5', "1,2,3,4,5," + "é" * 600]),
)


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(FILE_LINES, max_size=25),
    size=st.integers(1, 8),
    max_errors=st.integers(1, 12),
    required=st.booleans(),
)
def test_file_batches_by_column_and_by_record_agree(lines, size, max_errors, required):
    """The import's two ways through a file (CSV by column, other formats by record) write the same
    rows, report the same failures in the same order and stop at exactly maxErrors failed rows."""
    columns = [Column(f"c{k}", kind, required=required, max_length=8) for k, kind in enumerate(KINDS)]
    data = ("c1,c0,c2,c3,c5,c4\n" + "\n".join(lines) + "\n").encode()  # not in the columns' order
    by_record = run_file_batches(data, columns, size, max_errors, False, TYPED)
    assert run_file_batches(data, columns, size, max_errors, True, TYPED) == by_record
    rows = by_record[0]
    text = run_file_batches(data, columns, size, max_errors, True, TEXT)
    assert text[1:] == by_record[1:]
    assert [tuple(map(text_form, row)) for row in rows] == [
        tuple(text_form(float(v)) if c.type == "float" and v else v for c, v in zip(columns, row, strict=True))
        for row in text[0]
    ]
    none = run_file_batches(data, columns, size, max_errors, True, NO_OUTPUT)
    assert none[0] == [] and none[1:] == by_record[1:]


# --- header ----------------------------------------------------------------------------------------


def test_header_problems():
    columns = [Column("sample_id", required=True), Column("weight", "float"), Column("Colour")] + [
        Column(f"extra_{i}") for i in range(12)
    ]
    assert header_problems(["sample_id", "weight"], columns) == []
    problems = header_problems(["weigth", " colour", "shape"], columns)
    assert problems[0].startswith("unknown columns: weigth, ' colour', shape (did you mean weight for weigth; ")
    assert "Colour for ' colour'?)" in problems[0]
    assert problems[0].endswith("(the dataset has: sample_id, weight, Colour, extra_0, extra_1, extra_2, extra_3, "
                                "extra_4, extra_5, extra_6 and 5 more)")  # fmt: skip
    assert problems[1] == "missing required columns: sample_id"
    semicolons = header_problems(["sample_id;weight"], columns)
    assert "(the header seems separated by ';': a CSV import needs commas)" in semicolons[0]


# --- speed: python tests/test_readers.py [rows] ------------------------------------------------------

BENCH_COLUMNS = (
    Column("id", "integer"),
    Column("name"),
    Column("code"),
    Column("count", "integer"),
    Column("price", "float"),
    Column("weight", "float"),
    Column("active", "boolean"),
    Column("day", "date"),
    Column("at", "datetime"),
    Column("note"),
)


def bench_rows(start: int, count: int) -> list[tuple]:
    return [
        (i, f"name {i}", f"C{i % 997:04d}", (i * 7919) % 100_000 - 1000, (i % 100_000) / 100, 1 / (i + 1),
         i % 3 == 0, f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}", f"2024-05-{1 + i % 28:02d}T12:{i % 60:02d}:05Z",
         None if i % 5 else "some, note")
        for i in range(start, start + count)
    ]  # fmt: skip


def bench(rows: int) -> None:
    writer = writer_for("CSV", BENCH_COLUMNS)
    data = writer.begin() + b"".join(writer.write(bench_rows(s, 10_000)) for s in range(0, rows, 10_000))
    print(f"{rows:,} rows x {len(BENCH_COLUMNS)} columns, {len(data) / 1e6:.1f} MB of CSV")
    for label, convert in (("read", None), ("read + convert", RowConverter(BENCH_COLUMNS, unguard_text=True).convert)):
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            count = 0
            for record in reader_for("CSV", io.BytesIO(data), max_cell_bytes=MiB).records():
                if convert is not None:
                    convert(record.values)
                count += 1
            best = min(best, time.perf_counter() - start)
        print(f"{label} (records): {best:.2f} s, {count / best:,.0f} rows/s (best of 3)")
    checker = ColumnChecker(BENCH_COLUMNS, unguard_text=True)
    for label, output in (("read", None), ("read + check, typed", TYPED), ("read + check, text", TEXT)):
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            count = 0
            for batch in reader_for("CSV", io.BytesIO(data), max_cell_bytes=MiB).batches(5_000):
                if output is not None:
                    checker.check(batch.columns, output)
                count += len(batch.numbers)
            best = min(best, time.perf_counter() - start)
        print(f"{label} (batches, by column): {best:.2f} s, {count / best:,.0f} rows/s (best of 3)")


if __name__ == "__main__":
    bench(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)


def test_iso_datetime_pads_early_years_so_imports_read_them_back():
    from sources.base import iso_datetime

    early = dt.datetime(999, 1, 2, 3, 4, 5, 500000, tzinfo=dt.UTC)
    assert iso_datetime(early) == "0999-01-02T03:04:05.5Z"
    row, errors = RowConverter([Column("t", "datetime")], unguard_text=True).convert({"t": iso_datetime(early)})
    assert errors == [] and row == ("0999-01-02T03:04:05.5Z",)
