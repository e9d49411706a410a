"""The export formats and options without servers: XLSX cells against xlsxwriter's, Parquet's types,
gzip/zstd streams, file names and labels, and memory (a subprocess's VmHWM) at 10,000 and 80,000 rows."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import math
import random
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xlsxwriter
import zstandard

import formats.parquet
import formats.zip_parts
from dataport.errors import UserErrors
from formats.compression import compressed, compression_for
from formats.csv import guard_column
from formats.parquet import ParquetWriter
from formats.xlsx import XlsxWriter
from sources.base import Column
from tasks.file_names import checked_label, label_for_name, make_file_name

KINDS = ("integer", "float", "string", "boolean", "date", "datetime", "string")
COLUMNS = [Column(f"c{i}", KINDS[i % len(KINDS)]) for i in range(21)]  # 8+ adjacent numbers? no: see WIDE
WIDE = [Column(f"n{i}", "float") for i in range(9)] + COLUMNS  # a run of number columns, then mixed
TEXTS = [
    "plain",
    "",
    " lead",
    "trail ",
    "a\tb",
    "line\nbreak",
    "cr\r\nlf",
    "bell\x07",
    "amp & <tag> \"q\" 'a'",
    "=SUM(A1)",
    "+1",
    "-x",
    "@me",
    "Zoë 東京 🚀",
    "\ufffe",
    "nul\x00inside",
]


def _cell(kind: str, rng: random.Random) -> object:
    if rng.random() < 0.1:
        return None
    if kind == "integer":
        return rng.choice([0, -1, 2**40, -(2**62), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.1, -2.5, 1e-7, 1e-5, 1.7976931348623157e308, 5e-324, 1 / 3, 1e16, rng.uniform(-1e3, 1e3)])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "date":
        return "2024-02-29"
    if kind == "datetime":
        return rng.choice(["2024-02-29T12:00:00Z", "0001-01-01T00:00:00.5Z"])
    return rng.choice(TEXTS)


def _rows(columns: list[Column], count: int, seed: int = 3) -> list[tuple]:
    rng = random.Random(seed)
    return [tuple(_cell(c.type, rng) for c in columns) for _ in range(count)]


def _xlsx(writer: XlsxWriter, batches: list[list[tuple]]) -> bytes:
    out = writer.begin()
    for batch in batches:
        out += writer.write(batch)
    return out + b"".join(writer.finish())


def _reference(columns: list[Column], rows: list[tuple], guard: bool) -> bytes:
    """The rows as the xlsxwriter writer of before wrote them (constant memory, no conversions)."""
    buffer = io.BytesIO()
    book = xlsxwriter.Workbook(
        buffer,
        {
            "constant_memory": True,
            "strings_to_numbers": False,
            "strings_to_formulas": False,
            "strings_to_urls": False,
            "nan_inf_to_errors": True,
            "in_memory": True,
        },
    )
    sheet = book.add_worksheet()
    names = [c.name for c in columns]
    sheet.write_row(0, 0, guard_column(names) if guard else names)
    guarded = [i for i, c in enumerate(columns) if c.type == "string"] if guard else []
    for r, row in enumerate(rows, start=1):
        cells = list(row)
        for i in guarded:
            cells[i] = guard_column([cells[i]])[0]
        sheet.write_row(r, 0, cells)
    book.close()
    return buffer.getvalue()


def _read(data: bytes) -> list[tuple]:
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).active
    return [tuple(row) for row in sheet.iter_rows(values_only=True)]


def _same(got: object, want: object) -> bool:
    if isinstance(got, str) and isinstance(want, int | float) and not isinstance(want, bool):
        # Integers past 2**53 are text cells on purpose (formats/xlsx_cells.py); xlsxwriter rounded.
        return abs(int(got)) > 2**53 and math.isclose(int(got), want, rel_tol=1e-15)
    if isinstance(want, float) and isinstance(got, float):
        return got == want or abs(got - want) <= 1e-15 * abs(want)  # xlsxwriter keeps 16 digits, we 17
    if isinstance(want, int) and isinstance(got, int | float) and not isinstance(want, bool):
        return got == want or math.isclose(got, want, rel_tol=1e-15)
    return got == want


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("columns", [COLUMNS, WIDE], ids=["mixed", "wide"])
def test_xlsx_reads_back_as_xlsxwriter_wrote_the_same_rows(columns, guard):
    rows = _rows(columns, 400)
    ours = _read(_xlsx(XlsxWriter(columns, formula_guard=guard), [rows[:150], rows[150:]]))
    theirs = _read(_reference(columns, rows, guard))
    assert len(ours) == len(theirs) == len(rows) + 1
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True)), (a, b)


def test_xlsx_odd_cells_each_alone_in_a_text_column():
    for text in TEXTS + [None]:
        rows = [(text,), ("ok",)]
        assert _read(_xlsx(XlsxWriter([Column("s")]), [rows])) == _read(_reference([Column("s")], rows, True)), text


def test_xlsx_cuts_text_at_the_cell_limit_and_keeps_the_rest_of_the_row():
    """xlsxwriter's write_row stopped at a cut cell, losing the cells after it; every cell stays now."""
    rows = [("x" * 40_000, "after"), ("🚀" * 20_000, "after")]
    got = _read(_xlsx(XlsxWriter([Column("a"), Column("b")]), [rows]))
    assert got[1] == ("x" * 32_767, "after") and got[2] == ("🚀" * 16_383, "after")


def test_xlsx_text_that_looks_like_an_escape_is_escaped_for_excel():
    """Excel reads ``_x0041_`` in a cell as "A": such text is written ``_x005F_x0041_`` (as Excel
    itself does), which openpyxl's ``unescape`` reads back to the text."""
    from openpyxl.utils.escape import unescape

    texts = ["_x0041_ literal", "a_x00ZZ_b", "bell\x07 and cr\r"]
    got = _read(_xlsx(XlsxWriter([Column("s")]), [[(t,) for t in texts]]))
    assert [unescape(row[0]) for row in got[1:]] == texts


def test_xlsx_nan_and_infinity_are_error_cells_not_formulas():
    data = _xlsx(XlsxWriter([Column("x", "float")]), [[(math.nan,), (math.inf,), (-math.inf,), (2.0,)]])
    sheet = zipfile.ZipFile(io.BytesIO(data)).read("xl/worksheets/sheet1.xml")
    assert b"<f>" not in sheet and sheet.count(b't="e"') == 3
    assert _read(data)[1:] == [("#NUM!",), ("#DIV/0!",), ("#DIV/0!",), (2,)]


def test_xlsx_zip64_records_when_a_member_passes_the_limit(monkeypatch):
    """Past 4 GiB the sizes move to Zip64 records; a smaller limit shows the same path at small sizes."""
    monkeypatch.setattr(formats.zip_parts, "ZIP64_LIMIT", 1000)
    data = _xlsx(XlsxWriter(COLUMNS), [_rows(COLUMNS, 200)])
    assert b"PK\x06\x06" in data  # the Zip64 end record
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    assert len(_read(data)) == 201


def test_xlsx_is_plain_zip_when_small():
    data = _xlsx(XlsxWriter(COLUMNS), [_rows(COLUMNS, 50)])
    assert b"PK\x06\x06" not in data and zipfile.ZipFile(io.BytesIO(data)).testzip() is None


def test_parquet_keeps_the_dataset_types_and_the_cells():
    rows = [r for r in _rows(COLUMNS, 300) if True]
    rows = [tuple(None if isinstance(v, str) and "\x00" in v else v for v in r) for r in rows]
    writer = ParquetWriter(COLUMNS)
    data = writer.begin() + b"".join(writer.write(rows[i : i + 70]) for i in range(0, 300, 70))
    data += b"".join(writer.finish())
    table = pq.read_table(io.BytesIO(data))
    assert [f.type for f in table.schema] == [
        {
            "integer": pa.int64(),
            "float": pa.float64(),
            "string": pa.string(),
            "boolean": pa.bool_(),
            "date": pa.date32(),
            "datetime": pa.timestamp("us", tz="UTC"),
        }[c.type]
        for c in COLUMNS
    ]
    got = table.to_pylist()
    for row, back in zip(rows, got, strict=True):
        for c, value in zip(COLUMNS, row, strict=True):
            cell = back[c.name]
            if c.type == "date" and value is not None:
                cell = cell.isoformat()
            if c.type == "datetime" and value is not None:
                value = dt.datetime.fromisoformat(value)
            assert cell == value, (c, value, cell)


def test_parquet_of_no_rows_has_the_schema():
    writer = ParquetWriter(COLUMNS)
    data = writer.begin() + b"".join(writer.finish())
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 0 and table.schema.names == [c.name for c in COLUMNS]


async def _chunks(parts: list[bytes]) -> AsyncIterator[tuple[bytes, int]]:
    for part in parts:
        yield part, 1


@pytest.mark.parametrize("name", ["GZIP", "ZSTD", "NONE"])
async def test_compression_streams_decompress_to_the_input(name):
    parts = [bytes(random.Random(i).randbytes(5000)) + b"a" * 10_000 for i in range(20)] + [b""]
    out = [(chunk, rows) async for chunk, rows in compressed(_chunks(parts), compression_for(name))]
    assert sum(rows for _, rows in out) == len(parts)
    data = b"".join(chunk for chunk, _ in out)
    plain = {
        "GZIP": gzip.decompress,
        "ZSTD": lambda d: zstandard.ZstdDecompressor().decompressobj().decompress(d),
        "NONE": lambda d: d,
    }[name](data)
    assert plain == b"".join(parts)


def test_file_names():
    at = dt.datetime(2026, 12, 6, 9, 5, 7, 999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert make_file_name("samples", at, "CSV", None, None) == "samples-20261206T070507Z.csv"
    assert make_file_name("samples", at, "NDJSON", "GZIP", "Q3 north") == "samples-20261206T070507Z-Q3-north.ndjson.gz"
    assert (
        make_file_name("samples", at, "XLSX", "ZSTD", "../../etc/passwd")
        == "samples-20261206T070507Z-etc-passwd.xlsx.zst"
    )
    assert make_file_name("samples", at, "PARQUET", "NONE", "Zoë/東京 ✓") == "samples-20261206T070507Z-Zoë-東京.parquet"
    assert label_for_name("...") == "" and label_for_name("a" * 300) == "a" * 40
    assert checked_label("  hi  ") == "hi" and checked_label("   ") is None
    for bad in ("x" * 101, "two\nlines"):
        with pytest.raises(UserErrors) as e:
            checked_label(bad)
        assert e.value.errors[0].code == "INVALID_LABEL"


# --- memory: a subprocess's VmHWM, 10,000 against 80,000 rows ---------------------------------

PEAK = """
import asyncio, sys
sys.path.insert(0, {root!r})
from sources.demo import DEMO_COLUMNS
from sources.pipeline import encode
from sources.base import Dataset
from sources.query import build_query
from sources.sqlite import SqliteSource

async def main():
    dataset = Dataset(
        name="samples", source="sqlite", url={db!r}, table="samples", columns=DEMO_COLUMNS, key=("sample_id",)
    )
    source = SqliteSource(dataset)
    written = 0
    query = build_query(dataset, limit={rows})
    async for chunk, _ in encode(source, query, {fmt!r}, batch_rows=2000, formula_guard=True):
        written += len(chunk)
    await source.close()
    assert written > 0

asyncio.run(main())
status = open("/proc/self/status").read()
print(int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) * 1024)
"""


def _peak(db: Path, file_format: str, rows: int) -> int:
    code = PEAK.format(root=str(Path(__file__).resolve().parent.parent), db=str(db), rows=rows, fmt=file_format)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("file_format", ["XLSX", "PARQUET"])
def test_memory_is_flat_from_10k_to_80k_rows(test_data, file_format):
    small = _peak(test_data.demo_db, file_format, 10_000)
    large = _peak(test_data.demo_db, file_format, 80_000)
    # Eight times the rows: at most 15 % more peak memory, besides (Parquet) the rest of the one row
    # group held at a time, which 10,000 rows do not fill: bounded by ROW_GROUP_BYTES of Arrow
    # buffers and as much again while the group is encoded, whatever the row count.
    held = 2 * formats.parquet.ROW_GROUP_BYTES if file_format == "PARQUET" else 0
    assert large <= small * 1.15 + held, (small, large)
