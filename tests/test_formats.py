"""The streaming writers: what each format's bytes read back as, the formula guard, batching.

No servers needed. ``python tests/test_formats.py`` times the CSV writer on 100,000 x 55 rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import gc
import io
import json
import math
import os
import random
import struct
import time
import tracemalloc
import zipfile
from decimal import Decimal

import openpyxl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openpyxl.utils.escape import unescape

import formats.csv
import formats.xlsx
from formats import WRITERS, writer_for
from formats.csv import GUARD_TRIGGERS, CsvWriter, guard, unguard
from formats.json import JsonWriter, NdjsonWriter
from formats.xlsx import XlsxWriter
from sources.base import Column

COLUMNS = (
    Column("name"),
    Column("count", "integer"),
    Column("price", "float"),
    Column("active", "boolean"),
    Column("day", "date"),
    Column("at", "datetime"),
)
NAMES = [c.name for c in COLUMNS]

# Every awkward thing a cell can hold, in every column type.
ROWS = [
    ("plain", 1, 1.5, True, "2024-05-17", "2024-05-17T12:34:56Z"),
    (None, None, None, None, None, None),
    ("", 0, 0.0, False, "2024-01-01", "2024-01-01T00:00:00+02:00"),
    ("emoji 🎉🚀, CJK 日本語 中文, accents éàüñ ß", -42, -1.5, True, None, None),
    ('say "hi", then ""quote""', 2**53 + 1, 0.1 + 0.2, False, "2024-02-29", None),
    ("comma, comma", -(2**63), 1e-300, None, None, None),
    ("line\nfeed", 2**63 - 1, 1e20, True, None, None),
    ("carriage\rreturn", 7, -0.0, False, None, None),
    ("crlf\r\ninside\r\n", 8, 123456789.123456789, True, None, None),
    ('"', 9, 2.5e-8, False, None, None),
    ("trailing space ", 10, 3.0, True, None, None),
    (" leading space", 11, -3.25, False, None, None),
    ("tab\tinside", 12, 1.0, True, None, None),
]

# Text a spreadsheet would run as a formula, each with the guard's output.
FORMULAS = [
    ("=1+2", "'=1+2"),
    ("+SUM(A1:A9)", "'+SUM(A1:A9)"),
    ("-2+3", "'-2+3"),
    ("@cmd", "'@cmd"),
    ("\t=HYPERLINK()", "'\t=HYPERLINK()"),
    ("\r=1", "'\r=1"),
    ("'=already quoted", "''=already quoted"),  # one more quote, so unguard can restore it
]


def text_of(cell) -> str:
    """What a CSV cell is meant to read back as."""
    if cell is None:
        return ""
    if isinstance(cell, bool):
        return "true" if cell else "false"
    if isinstance(cell, float):
        return repr(cell)
    return str(cell)


def encode(writer, batches) -> bytes:
    out = [writer.begin()]
    out += [writer.write(batch) for batch in batches]
    out += list(writer.finish())
    return b"".join(out)


def read_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def read_xlsx(data: bytes) -> list[tuple]:
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).active
    # openpyxl leaves OOXML escapes (_x000D_ for CR) in place; Excel decodes them, so do we.
    return [tuple(unescape(v) if isinstance(v, str) else v for v in row) for row in sheet.values]


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_exact_bytes():
    columns = [Column("id", "integer"), Column("note"), Column("ok", "boolean"), Column("x", "float")]
    rows = [(1, 'a "b", c', True, 0.1), (2, None, False, -1.5), (3, "x\ny", None, None)]
    lines = [
        b"id,note,ok,x",
        b'1,"a ""b"", c",true,0.1',
        b"2,,false,-1.5",
        b'3,"x\ny",,',
    ]
    assert encode(CsvWriter(columns), [rows]) == b"".join(line + b"\r\n" for line in lines)


def test_csv_reads_back_as_the_cells_as_text():
    data = encode(CsvWriter(COLUMNS, formula_guard=False), [ROWS])
    assert read_csv(data) == [NAMES] + [[text_of(c) for c in row] for row in ROWS]
    assert data.count(b"\r\n") >= len(ROWS) + 1
    # Quotes appear only where RFC 4180 needs them.
    assert data.startswith(b"name,count,price,active,day,at\r\nplain,1,1.5,true,2024-05-17,")


def test_csv_floats_are_shortest_round_trip():
    rows = [(v,) for v in (0.1 + 0.2, 1e-300, 1e20, -0.0, 123456789.123456789, 5e-324)]
    values = read_csv(encode(CsvWriter([Column("x", "float")]), [rows]))[1:]
    assert [float(v) for (v,) in values] == [r[0] for r in rows]
    assert [v for (v,) in values] == [repr(r[0]) for r in rows]


def test_csv_single_column_empty_text_is_not_a_blank_line():
    data = encode(CsvWriter([Column("s")]), [[("",), ("a",)]])
    assert read_csv(data) == [["s"], [""], ["a"]]


@pytest.mark.parametrize(("text", "guarded"), FORMULAS)
def test_csv_guard_prefixes_formula_text_and_unguard_restores_it(text, guarded):
    columns = [Column("s"), Column("x", "float"), Column("n", "integer"), Column("d", "date")]
    rows = [(text, -1.5, -7, "-0001-01-01")]
    [_, cells] = read_csv(encode(CsvWriter(columns), [rows]))
    assert cells == [guarded, "-1.5", "-7", "-0001-01-01"]  # numbers and dates untouched
    assert unguard(cells[0]) == text
    [_, cells] = read_csv(encode(CsvWriter(columns, formula_guard=False), [rows]))
    assert cells == [text, "-1.5", "-7", "-0001-01-01"]


def test_csv_guard_leaves_harmless_text_alone():
    harmless = ["plain", "a=b", "'quoted", "''", "'", "", "1-2", " =1", "€=", "日本", "a\x00=b"]
    [_, *cells] = read_csv(encode(CsvWriter([Column("s")]), [[(t,) for t in harmless]]))
    assert [c for (c,) in cells] == harmless
    assert [unguard(t) for t in harmless] == harmless


def test_csv_guard_applies_to_header_names():
    columns = [Column("=cmd"), Column("-n", "integer"), Column("ok")]
    assert read_csv(encode(CsvWriter(columns), []))[0] == ["'=cmd", "'-n", "ok"]
    assert read_csv(encode(CsvWriter(columns, formula_guard=False), []))[0] == ["=cmd", "-n", "ok"]


@given(st.text())
def test_guard_round_trip_and_safety(text):
    guarded = guard(text)
    assert unguard(guarded) == text
    assert not guarded.startswith(tuple(GUARD_TRIGGERS))
    assert guarded == text or guarded == "'" + text


@given(st.sampled_from(GUARD_TRIGGERS), st.text(), st.integers(0, 3))
def test_guard_catches_every_trigger_behind_any_quotes(trigger, rest, quotes):
    text = "'" * quotes + trigger + rest
    assert guard(text) == "'" + text
    assert unguard(guard(text)) == text


# --- CSV: the fast path writes what the csv module writes --------------------------------------


def csv_module_bytes(columns, batches, formula_guard: bool = True) -> bytes:
    """The file as the stdlib csv module writes it, cell by cell: the reference for CsvWriter."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    names = [c.name for c in columns]
    writer.writerow([guard(n) for n in names] if formula_guard else names)
    for batch in batches:
        for row in batch:
            cells = []
            for column, cell in zip(columns, row, strict=True):
                if column.type == "boolean":
                    cell = {True: "true", False: "false"}.get(cell, cell)
                elif column.type == "string" and formula_guard and cell.__class__ is str:
                    cell = guard(cell)
                cells.append(cell)
            writer.writerow(cells)
    return buffer.getvalue().encode("utf-8")


def assert_writes_as_the_csv_module(columns, batches, formula_guard: bool = True) -> None:
    """CsvWriter's bytes are the csv module's; where the csv module fails, CsvWriter fails alike."""
    try:
        expected = csv_module_bytes(columns, batches, formula_guard)
    except Exception as e:  # e.g. an unhashable cell in a boolean column
        with pytest.raises(type(e)):
            encode(CsvWriter(columns, formula_guard=formula_guard), batches)
        return
    got = encode(CsvWriter(columns, formula_guard=formula_guard), batches)
    assert got == expected, (columns, batches)


class Flavour(enum.Enum):
    SALTY = 1.5


class FloatFlavour(float, enum.Enum):
    SWEET = 2.5


# Cells the fast path must get right, by the column type they sit in (some of them belong to
# another type: the writer must still write what the csv module writes for them).
ODD_NUMBERS = [
    1e-07, 1e-7 * 1.5, -1e-9, 1e16, -1e16, 1e22, 1.5e300, 5e-324, 1e-300, 1.5e-05, -2.5e-05, 9.99e-05, 1e-05,
    0.0001, 0.00012, 10.00001, -0.0, 0.0, 3.0, 1e15, 123456789012345.6, 2.0**53, 9999999999999998.0, 0.1 + 0.2,
    math.nan, math.inf, -math.inf, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**30,
    None, True, False, "1.5", "", Decimal("1.25"), Flavour.SALTY, FloatFlavour.SWEET, [1], {"a": 1},
    dt.date(2024, 1, 2),
]  # fmt: skip
ODD_TEXTS = [
    "plain", "", None, "a,b", 'say "hi"', "line\nfeed", "cr\rhere", "crlf\r\n", "=1+2", "-2", "+x", "@a", "\tx",
    "\rx", "'=q", "''+q", "a=b", "\x00", "nul\x00inside", " lead", "trail ", "日本 🎉", "é", 7, 1.5, True, b"raw",
]  # fmt: skip
ODD_BOOLS = [True, False, None, 1, 0, 1.0, 2, "yes", math.nan]


def odd_table(width: int, seed: int) -> tuple[list[Column], list[list[tuple]]]:
    """Columns of every type (with runs of number columns longer than ``ROW_RUN``) and batches of
    rows holding odd cells among ordinary ones."""
    rng = random.Random(seed)
    kinds = ["float"] * (formats.csv.ROW_RUN + 2) + ["integer", "string", "boolean", "date", "datetime", "float"]
    columns = [Column(f"c{i}", kinds[i % len(kinds)] if width > 3 else rng.choice(kinds)) for i in range(width)]

    def cell(kind: str):
        if rng.random() < 0.15:
            return rng.choice(ODD_NUMBERS + ODD_TEXTS + ODD_BOOLS)
        if kind == "float":
            return rng.choice(
                [
                    None,
                    rng.uniform(-1e3, 1e3),
                    round(rng.uniform(-1e3, 1e3), 3),
                    rng.uniform(0, 1) * 10.0 ** rng.randint(-12, 20),
                ]
            )
        if kind == "integer":
            return rng.choice([None, rng.randint(-1000, 1000), rng.randint(-(2**63), 2**64 - 1)])
        if kind == "boolean":
            return rng.choice([True, False, None])
        return rng.choice(ODD_TEXTS[:-4])

    batches = [[tuple(cell(c.type) for c in columns) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    return columns, batches


def test_csv_fast_path_is_on():
    # The installed orjson spells numbers the way the fast path expects (else it stays off).
    assert formats.csv.orjson_writes_repr() and formats.csv.FAST


@pytest.mark.parametrize("width", [1, 2, 3, 16, 40])
@pytest.mark.parametrize("formula_guard", [True, False])
def test_csv_fast_path_writes_what_the_csv_module_writes(width, formula_guard):
    for seed in range(40):
        columns, batches = odd_table(width, seed)
        assert_writes_as_the_csv_module(columns, batches, formula_guard)


@pytest.mark.parametrize("value", ODD_NUMBERS + ODD_TEXTS + ODD_BOOLS, ids=repr)
@pytest.mark.parametrize("kind", ["float", "integer", "boolean", "string", "date"])
def test_csv_each_odd_cell_alone_and_inside_a_run(value, kind):
    run = formats.csv.ROW_RUN + 1
    for columns in (
        [Column("x", kind)],
        [Column("id", "integer"), Column("x", kind)],
        [Column(f"f{i}", kind if i == 3 else "float") for i in range(run)],
    ):
        at = next(i for i, c in enumerate(columns) if c.name in ("x", "f3"))
        plain = tuple(1.5 if c.type == "float" else 7 for c in columns)
        rows = [plain, plain[:at] + (value,) + plain[at + 1 :], plain]
        assert_writes_as_the_csv_module(columns, [rows])


@pytest.mark.parametrize("formula_guard", [True, False])
def test_csv_long_text_columns_of_a_few_values_write_what_the_csv_module_writes(formula_guard):
    """A text column of a few distinct values, long enough to write each value once and look it up:
    quotes, guards, NUL, empty, None and cells of other types, as the csv module writes them."""
    rng = random.Random(5)
    columns = [Column("a"), Column("b"), Column("when", "date"), Column("n", "integer")]
    sites = ["North Ridge", 'Mount "Grey"', "Lake, East", "東京 Basin", None]
    for values in (sites, ODD_TEXTS[:-4], ["=SUM(A1)", "'-1", "ok", ""], ODD_TEXTS):
        for size in (511, 512, 3000):
            rows = [(rng.choice(values), rng.choice(sites), rng.choice(values), i) for i in range(size)]
            assert_writes_as_the_csv_module(columns, [rows], formula_guard)
        # 33 values: more than are written once
        many = [f"v{i}, quoted" for i in range(33)]
        assert_writes_as_the_csv_module(columns, [[(many[i % 33], None, "", i) for i in range(600)]], formula_guard)
    # an unhashable cell among the first ones, and after them
    for at in (3, 550):
        rows = [(["a list"] if i == at else sites[i % 5], "x", None, i) for i in range(600)]
        assert_writes_as_the_csv_module(columns, [rows], formula_guard)


def test_csv_floats_of_every_magnitude_are_repr():
    rng = random.Random(11)
    values = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20_000)]
    values += [rng.uniform(0, 1) * 10.0 ** rng.randint(-330, 308) * rng.choice((1, -1)) for _ in range(20_000)]
    values += [
        float(f"{m}e{e}")
        for e in range(-324, 309)
        for m in (1, 1.5, 9.999999999999999, 5)
        if math.isfinite(float(f"{m}e{e}"))
    ]
    width = formats.csv.ROW_RUN * 2
    columns = [Column(f"f{i}", "float") for i in range(width)]
    rows = [tuple(values[i : i + width]) for i in range(0, len(values) - width, width)]
    assert encode(CsvWriter(columns), [rows]) == csv_module_bytes(columns, [rows])
    column = [Column("x", "float")]
    assert encode(CsvWriter(column), [[(v,) for v in values]]) == csv_module_bytes(column, [[(v,) for v in values]])


@given(st.lists(st.tuples(st.floats(), st.integers(), st.one_of(st.none(), st.text()), st.booleans()), max_size=30))
def test_csv_random_rows_match_the_csv_module(rows):
    columns = [Column("f", "float"), Column("i", "integer"), Column("s"), Column("b", "boolean")]
    assert encode(CsvWriter(columns), [rows]) == csv_module_bytes(columns, [rows])


def test_csv_ragged_rows_are_left_to_the_csv_module():
    columns = [Column("a", "integer"), Column("b", "integer")]
    assert encode(CsvWriter(columns), [[(1, 2), (3,)]]) == b"a,b\r\n1,2\r\n3\r\n"
    assert encode(CsvWriter([]), [[(), ()]]) == b"\r\n\r\n\r\n"


# --- JSON and NDJSON ---------------------------------------------------------------------------


def test_json_reads_back_as_the_rows():
    data = encode(JsonWriter(COLUMNS), [ROWS])
    parsed = json.loads(data)
    assert parsed == [dict(zip(NAMES, row, strict=True)) for row in ROWS]
    assert [list(obj) for obj in parsed] == [NAMES] * len(ROWS)  # keys in column order
    assert parsed[0]["active"] is True and parsed[2]["active"] is False
    assert math.copysign(1, parsed[7]["price"]) == -1  # -0.0 survives
    assert data.endswith(b"}]\n")


def test_json_keeps_formula_text_as_is():
    assert json.loads(encode(JsonWriter([Column("s")]), [[("=1+2",)]])) == [{"s": "=1+2"}]


def test_json_empty_export_is_an_empty_array():
    assert encode(JsonWriter(COLUMNS), []) == b"[]\n"
    assert encode(JsonWriter(COLUMNS), [[], []]) == b"[]\n"
    assert json.loads(b"[]\n") == []


def test_ndjson_is_one_object_a_line():
    data = encode(NdjsonWriter(COLUMNS), [ROWS])
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert len(lines) == len(ROWS)  # newlines inside values are escaped
    assert [json.loads(line) for line in lines] == [dict(zip(NAMES, row, strict=True)) for row in ROWS]
    assert encode(NdjsonWriter(COLUMNS), []) == b""


# --- XLSX --------------------------------------------------------------------------------------


def same_xlsx_cell(got, want) -> bool:
    """Excel numbers are doubles written with 16 significant digits: equal to about 1e-15."""
    if want == "":
        return got is None  # xlsxwriter writes "" as an empty cell
    if isinstance(want, int) and not isinstance(want, bool) and abs(want) > 2**53:
        return got == str(want)  # a text cell, so that Excel cannot round it (formats/xlsx_cells.py)
    if isinstance(want, int | float) and not isinstance(want, bool):
        return type(got) in (int, float) and math.isclose(got, want, rel_tol=1e-15)
    return type(got) is type(want) and got == want


def test_xlsx_reads_back_as_the_rows():
    got = read_xlsx(encode(XlsxWriter(COLUMNS, formula_guard=False), [ROWS]))
    assert got[0] == tuple(NAMES)
    assert len(got) == len(ROWS) + 1
    for got_row, want_row in zip(got[1:], ROWS, strict=True):
        assert len(got_row) == len(want_row)
        assert all(same_xlsx_cell(g, w) for g, w in zip(got_row, want_row, strict=True)), (got_row, want_row)
    # Small numbers come back exactly, with their type; booleans stay booleans.
    assert got[1] == ("plain", 1, 1.5, True, "2024-05-17", "2024-05-17T12:34:56Z")
    assert got[3][3] is False


def test_xlsx_guards_formula_text_and_writes_no_formula():
    columns = [Column("=h"), Column("x", "float"), Column("d", "date")]
    rows = [(text, -1.5, "-2024") for text, _ in FORMULAS]
    data = encode(XlsxWriter(columns), [rows])
    assert read_xlsx(data) == [("'=h", "x", "d")] + [(g, -1.5, "-2024") for _, g in FORMULAS]
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).active
    assert all(cell.data_type != "f" for row in sheet.rows for cell in row)
    assert b"<f>" not in zipfile.ZipFile(io.BytesIO(data)).read("xl/worksheets/sheet1.xml")

    unguarded = encode(XlsxWriter(columns, formula_guard=False), [rows])
    assert [row[0] for row in read_xlsx(unguarded)[1:]] == [text for text, _ in FORMULAS]
    assert b"<f>" not in zipfile.ZipFile(io.BytesIO(unguarded)).read("xl/worksheets/sheet1.xml")


def test_xlsx_nan_and_infinity_do_not_fail_the_export():
    data = encode(XlsxWriter([Column("x", "float")]), [[(math.nan,), (math.inf,), (1.0,)]])
    assert read_xlsx(data)[3] == (1.0,)


def test_xlsx_chunks_and_removes_its_temp_file():
    writer = XlsxWriter([Column("s")])
    path = writer.path
    writer.begin()
    # Random text does not compress: the file is well over one chunk.
    rng = random.Random(1)
    writer.write([("".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=500)),) for _ in range(6000)])
    chunks = list(writer.finish())
    assert len(chunks) >= 2 and all(len(c) == formats.xlsx.CHUNK_BYTES for c in chunks[:-1])
    assert len(read_xlsx(b"".join(chunks))) == 6001
    assert not os.path.exists(path)


def test_xlsx_temp_file_removed_when_the_consumer_stops_early():
    writer = XlsxWriter([Column("s")])
    writer.begin()
    writer.write([("x",)])
    stream = writer.finish()
    next(stream)
    assert os.path.exists(writer.path)
    stream.close()
    assert not os.path.exists(writer.path)


def test_xlsx_temp_file_removed_when_finish_never_runs():
    writer = XlsxWriter([Column("s")])
    path = writer.path
    writer.begin()
    writer.write([("x",)])
    writer.finish()  # a generator that is never started
    assert os.path.exists(path)
    del writer
    gc.collect()
    assert not os.path.exists(path)


def test_xlsx_refuses_rows_past_the_sheet_limit(monkeypatch):
    monkeypatch.setattr(formats.xlsx, "MAX_ROWS", 3)
    writer = XlsxWriter([Column("s")])
    writer.begin()
    writer.write([("a",), ("b",)])
    with pytest.raises(ValueError, match="at most"):
        writer.write([("c",)])
    writer.close()


# --- all formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CsvWriter, JsonWriter, NdjsonWriter])
def test_batching_does_not_change_the_bytes(cls):
    whole = encode(cls(COLUMNS), [ROWS])
    for size in (1, 2, 5, len(ROWS)):
        batches = [ROWS[i : i + size] for i in range(0, len(ROWS), size)]
        assert encode(cls(COLUMNS), batches) == whole
    assert encode(cls(COLUMNS), [[], ROWS[:4], [], ROWS[4:], []]) == whole


def test_xlsx_batching_does_not_change_the_cells():
    whole = read_xlsx(encode(XlsxWriter(COLUMNS), [ROWS]))
    assert read_xlsx(encode(XlsxWriter(COLUMNS), [ROWS[i : i + 3] for i in range(0, len(ROWS), 3)])) == whole


def test_registry():
    assert {name: (cls.extension, cls.content_type) for name, cls in WRITERS.items()} == {
        "CSV": ("csv", "text/csv; charset=utf-8"),
        "JSON": ("json", "application/json"),
        "NDJSON": ("ndjson", "application/x-ndjson"),
        "XLSX": ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        "PARQUET": ("parquet", "application/vnd.apache.parquet"),
    }
    assert isinstance(writer_for("CSV", COLUMNS), CsvWriter)
    assert isinstance(writer_for("ndjson", COLUMNS), NdjsonWriter)  # the streaming route's spelling
    writer = writer_for("XLSX", COLUMNS, formula_guard=False)
    assert isinstance(writer, XlsxWriter) and writer.formula_guard is False
    writer.close()
    with pytest.raises(KeyError):
        writer_for("AVRO", COLUMNS)


# --- memory: does not grow with the row count --------------------------------------------------


def sample_rows(count: int, columns, seed: int = 7, hostile: bool = False) -> list[tuple]:
    """Deterministic rows for ``columns``; ``hostile`` makes most text need quoting or guarding."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "Zürich", "東京", "O'Brien", "x@y.example"]
    nasty = ["with, comma", 'say "hi"', "=1+2", "-x", "héllo 日本 🎉", "line\nbreak", "plain"]

    def cell(kind: str, r: int):
        if rng.random() < 0.05:
            return None
        if kind == "string":
            if hostile:
                return rng.choice(nasty)
            text = " ".join(rng.choices(words, k=rng.randint(1, 4)))
            return text + ", etc." if rng.random() < 0.02 else text
        if kind == "integer":
            return rng.randint(-1_000_000, 1_000_000)
        if kind == "float":
            return rng.uniform(-1e3, 1e3) if hostile else round(rng.uniform(-1e3, 1e3), 2)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "date":
            return f"20{rng.randint(10, 29)}-0{rng.randint(1, 9)}-{rng.randint(10, 28)}"
        return f"2024-05-{rng.randint(10, 28)}T12:{rng.randint(10, 59)}:56Z"

    return [tuple(cell(c.type, r) for c in columns) for r in range(count)]


def wide_columns(count: int = 55) -> list[Column]:
    kinds = ("string", "integer", "float", "boolean", "date", "datetime")
    return [Column(f"c{i}", kinds[i % len(kinds)]) for i in range(count)]


def peak_memory(cls, columns, batch, batches: int) -> tuple[int, int]:
    """Peak bytes Python allocated while writing ``batches`` copies of ``batch``, then in finish()."""
    writer = cls(columns)
    tracemalloc.start()
    try:
        writer.begin()
        for _ in range(batches):
            writer.write(batch)
        writing = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        for _ in writer.finish():
            pass
        return writing, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cls", [CsvWriter, XlsxWriter])
def test_memory_does_not_grow_with_rows(cls):
    columns = wide_columns(12)
    batch = sample_rows(500, columns)
    small, _ = peak_memory(cls, columns, batch, 2)
    large, finishing = peak_memory(cls, columns, batch, 40)  # twenty times the rows, 2-3 MB of XLSX
    assert large < small * 1.5 + 256 * 1024, (small, large)
    # XLSX zips and reads its file back in finish(): bounded by the chunk size, not the file size.
    assert finishing < 3 * formats.xlsx.CHUNK_BYTES, finishing


# --- benchmark ---------------------------------------------------------------------------------


def bench_csv(rows: int = 100_000, batch: int = 5_000, repeat: int = 3) -> None:
    columns = wide_columns(55)
    for hostile in (False, True):
        data = sample_rows(rows, columns, hostile=hostile)
        for formula_guard in (True, False):
            best, size = math.inf, 0
            for _ in range(repeat):
                writer = CsvWriter(columns, formula_guard=formula_guard)
                start = time.perf_counter()
                size = len(writer.begin())
                for i in range(0, rows, batch):
                    size += len(writer.write(data[i : i + batch]))
                best = min(best, time.perf_counter() - start)
            kind = "hostile" if hostile else "typical"
            print(
                f"{kind:8} guard={formula_guard!s:5} {rows:,} x 55: {best:.2f} s best of {repeat}, "
                f"{size / 1e6:.0f} MB, {rows / best:,.0f} rows/s"
            )


if __name__ == "__main__":
    bench_csv()
