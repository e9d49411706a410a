"""Hostile import files, built in code, and how each must end (issue 15).

``cases()`` is the corpus: CSV, JSON, NDJSON and XLSX files that once crashed a worker, ran it out
of memory, failed with ``INTERNAL_ERROR`` or wrote an unbounded report, each with the outcome it
must now have: a task error code (``FILE_LIMIT_EXCEEDED``, ``INVALID_FILE``, ``INVALID_HEADER``,
``TOO_MANY_ERRORS``) or ``ROW_ERRORS`` (the import succeeds; the rows at fault fail, with a reason
that contains ``says``). Files are made on demand and kept (``Case.content``), never written out.

``run_case(case)`` reads a case as the worker does (``workers.imports.FileBatches``, the same
readers, limits and checks, without storage) and returns its ``Outcome``. Run as a script,
``python -m tests.hostile_corpus NAME --limit-mib 1024`` does that under an address-space limit and
prints the outcome and the peak RSS as JSON: the honest way to show a bound, used by
tests/test_hostile_files.py and bench/hostile.py. Importable without pytest.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import resource
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from sources.base import Column, Dataset

MiB = 1024 * 1024

# The imp_* datasets of tests/fixtures/stack.py (IMPORT_COLUMNS_TOML).
COLUMNS = (
    Column("id", "integer", required=True),
    Column("name", "string", max_length=40),
    Column("score", "float"),
    Column("count", "integer"),
    Column("active", "boolean"),
    Column("born", "date"),
    Column("seen_at", "datetime"),
    Column("notes", "string", filterable=False, sortable=False),
)
HEADER = [c.name for c in COLUMNS]
ROW_ERRORS = "ROW_ERRORS"
HUGE_INT = "1" * 4301  # one digit past Python's int-digit limit


@dataclass(frozen=True)
class Case:
    name: str
    format: str  # CSV, JSON, NDJSON, XLSX
    build: Callable[[], bytes] = field(repr=False)
    outcome: str  # a task error code, or ROW_ERRORS
    says: str  # in the task's message, or in a failed row's reason
    max_errors: int = 1_000
    e2e: bool = False  # also run through the real stack (tests/test_hostile_files.py)

    @property
    def content(self) -> bytes:
        return _built(self.name)

    @property
    def file_name(self) -> str:
        return f"{self.name}.{self.format.lower()}"


@dataclass
class Outcome:
    code: str  # SUCCEEDED or a task error code
    message: str = ""
    rows_ok: int = 0
    rows_failed: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few row reasons
    report_bytes: int = 0  # the error report's size, as the worker would write it
    peak_rss_mib: float = 0.0
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        """What the corpus compares with ``Case.outcome``."""
        if self.code == "SUCCEEDED":
            return ROW_ERRORS if self.rows_failed else "SUCCEEDED"
        return self.code


# --- building files ---------------------------------------------------------------------------------


def csv_file(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    lines = [",".join(header)] + [",".join(row) for row in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


def good(i: int) -> dict:
    return {
        "id": i,
        "name": f"row {i}",
        "score": 1.5,
        "count": 3,
        "active": True,
        "born": "2024-02-29",
        "seen_at": "2024-02-29T12:30:00Z",
        "notes": "n",
    }


def json_text(elements: list[str]) -> bytes:
    return ("[" + ",\n".join(elements) + "]").encode()


_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG = "http://schemas.openxmlformats.org/package/2006/relationships"
_CT = "application/vnd.openxmlformats-officedocument.spreadsheetml"


def _content_types(shared: bool) -> bytes:
    sst = f'<Override PartName="/xl/sharedStrings.xml" ContentType="{_CT}.sharedStrings+xml"/>' if shared else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/xl/workbook.xml" ContentType="{_CT}.sheet.main+xml"/>'
        f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{_CT}.worksheet+xml"/>'
        f"{sst}</Types>"
    ).encode()


def _workbook_parts(shared: bool) -> dict[str, bytes]:
    sst_rel = f'<Relationship Id="rId2" Type="{_REL}/sharedStrings" Target="sharedStrings.xml"/>' if shared else ""
    return {
        "[Content_Types].xml": _content_types(shared),
        "_rels/.rels": (
            f'<Relationships xmlns="{_PKG}"><Relationship Id="rId1" '
            f'Type="{_REL}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
        ).encode(),
        "xl/workbook.xml": (
            f'<workbook xmlns="{_NS}" xmlns:r="{_REL}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
        ).encode(),
        "xl/_rels/workbook.xml.rels": (
            f'<Relationships xmlns="{_PKG}"><Relationship Id="rId1" '
            f'Type="{_REL}/worksheet" Target="worksheets/sheet1.xml"/>'
            f"{sst_rel}</Relationships>"
        ).encode(),
    }


def _header_row() -> bytes:
    cells = "".join(f'<c r="{chr(65 + i)}1" t="inlineStr"><is><t>{n}</t></is></c>' for i, n in enumerate(HEADER))
    return f'<row r="1">{cells}</row>'.encode()


def xlsx_file(
    rows: bytes | Iterator[bytes] = b"",
    shared: bytes | Iterator[bytes] | None = None,
    extra: dict[str, bytes] | None = None,
    header: bytes | None = None,
) -> bytes:
    """A minimal workbook: the header row, then ``rows`` (sheetData XML, pieces streamed into the
    zip), and shared strings (the <si> elements) if given. Big parts are compressed as they are
    made, never held whole."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in {**_workbook_parts(shared is not None), **(extra or {})}.items():
            archive.writestr(name, data)
        with archive.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as sheet:
            sheet.write(f'<worksheet xmlns="{_NS}"><sheetData>'.encode())
            sheet.write(_header_row() if header is None else header)
            for piece in [rows] if isinstance(rows, bytes) else rows:
                sheet.write(piece)
            sheet.write(b"</sheetData></worksheet>")
        if shared is not None:
            with archive.open("xl/sharedStrings.xml", "w", force_zip64=True) as sst:
                sst.write(f'<sst xmlns="{_NS}">'.encode())
                for piece in [shared] if isinstance(shared, bytes) else shared:
                    sst.write(piece)
                sst.write(b"</sst>")
    return out.getvalue()


def _repeat(piece: bytes, total: int) -> Iterator[bytes]:
    block = piece * max(1, MiB // len(piece))
    for _ in range(total // len(block)):
        yield block


def _data_row(r: int, cells: str) -> bytes:
    return f'<row r="{r}">{cells}</row>'.encode()


def _many_members() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in _workbook_parts(False).items():
            archive.writestr(name, data)
        archive.writestr("xl/worksheets/sheet1.xml", f'<worksheet xmlns="{_NS}"><sheetData/></worksheet>')
        for i in range(20_000):
            archive.writestr(f"junk/{i}", b"")
    return out.getvalue()


def _billion_laughs() -> bytes:
    laughs = "".join(f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    sst = (
        f'<?xml version="1.0"?><!DOCTYPE sst [<!ENTITY a0 "lol">{laughs}]><sst xmlns="{_NS}"><si><t>&a9;</t></si></sst>'
    )
    parts = {**_workbook_parts(True), "xl/sharedStrings.xml": sst.encode()}
    return xlsx_file(_data_row(2, '<c r="A2"><v>1</v></c><c r="B2" t="s"><v>0</v></c>'), extra=parts)


def _numbered_strings(count: int) -> Iterator[bytes]:
    """Short shared strings, each different: they compress only ~8 times."""
    step = 50_000
    for start in range(0, count, step):
        yield b"".join(b"<si><t>%x</t></si>" % i for i in range(start, min(start + step, count)))


def _random_strings(total: int) -> Iterator[bytes]:
    """Shared strings that do not compress (a ratio check cannot catch them)."""
    import base64
    import os

    for _ in range(total // MiB):
        yield b"".join(b"<si><t>" + base64.b64encode(os.urandom(48)) + b"</t></si>" for _ in range(MiB // 79))


def _deep_object(depth: int) -> bytes:
    return b'[{"id": 1, "notes": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}]"


# --- the corpus ----------------------------------------------------------------------------------------


def cases() -> list[Case]:
    """Every hostile file, with the outcome it must have."""
    c = Case
    return [
        # CSV
        c(
            "csv_int_4301_digits",
            "CSV",
            lambda: csv_file([[HUGE_INT, "x"]], ["id", "name"]),
            ROW_ERRORS,
            "out of range for an integer",
            e2e=True,
        ),
        c(
            "csv_int_4301_digits_signed",
            "CSV",
            lambda: csv_file([["1", "-" + HUGE_INT]], ["id", "count"]),
            ROW_ERRORS,
            "out of range for an integer",
        ),
        c(
            "csv_float_5000_digits",
            "CSV",
            lambda: csv_file([["1", "9" * 5000]], ["id", "score"]),
            ROW_ERRORS,
            "out of range for a float",
        ),
        c(
            "csv_100k_column_header",
            "CSV",
            lambda: csv_file([], [f"column_{i}" for i in range(100_000)]),
            "INVALID_HEADER",
            "and 99,980 more",
            e2e=True,
        ),
        c(
            "csv_line_without_break_20mb",
            "CSV",
            lambda: b"id,name\r\n1," + b"x" * (20 * MiB),
            "FILE_LIMIT_EXCEEDED",
            "without a line break",
        ),
        c("csv_open_quote_20mb", "CSV", lambda: b'id,name\r\n1,"' + b"x\n" * (10 * MiB), "INVALID_FILE", "quoted cell"),
        c(
            "csv_200k_bad_rows",
            "CSV",
            lambda: b"id,name\r\n" + b"x,y\r\n" * 200_000,
            "TOO_MANY_ERRORS",
            "maxErrors",
            max_errors=100_000,
        ),
        c("csv_row_of_100k_cells", "CSV", lambda: csv_file([["1"] * 100_000], ["id"]), ROW_ERRORS, "100000 cells"),
        c("csv_utf16", "CSV", lambda: "id,name\r\n1,x\r\n".encode("utf-16"), "INVALID_FILE", "UTF-16"),
        # JSON
        c(
            "json_int_4301_digits",
            "JSON",
            lambda: json_text(['{"id": ' + HUGE_INT + "}"]),
            ROW_ERRORS,
            "a number of 4,301 characters",
            e2e=True,
        ),
        c(
            "json_int_4301_digits_in_text_column",
            "JSON",
            lambda: json_text(['{"id": 1, "name": -' + HUGE_INT + "}"]),
            ROW_ERRORS,
            "expected text, got a number of 4,302 characters",
        ),
        c("json_400kb_of_brackets", "JSON", lambda: b"[" * 400_000, "FILE_LIMIT_EXCEEDED", "nested deeper", e2e=True),
        c(
            "json_nesting_1500_in_a_cell",
            "JSON",
            lambda: b'[{"id": 1, "notes": ' + b"[" * 1500 + b"]" * 1500 + b"}]",
            "FILE_LIMIT_EXCEEDED",
            "nested deeper",
        ),
        c("json_39kb_object_nesting", "JSON", lambda: _deep_object(6_500), "FILE_LIMIT_EXCEEDED", "nested deeper"),
        c(
            "json_lone_surrogate",
            "JSON",
            lambda: json_text(['{"id": 1, "name": "\\ud800"}']),
            ROW_ERRORS,
            "lone surrogate",
            e2e=True,
        ),
        c(
            "json_element_of_20mb",
            "JSON",
            lambda: b'[{"id": 1, "notes": "' + b"x" * (20 * MiB) + b'"}]',
            "FILE_LIMIT_EXCEEDED",
            "larger than 16,777,216 bytes",
        ),
        c(
            "json_cell_of_2mb",
            "JSON",
            lambda: b'[{"id": 1, "notes": "' + b"x" * (2 * MiB) + b'"}]',
            ROW_ERRORS,
            "the limit per cell",
        ),
        c("json_1e400", "JSON", lambda: json_text(['{"id": 1, "score": 1e400}']), ROW_ERRORS, "not a finite number"),
        c("json_2_pow_64", "JSON", lambda: json_text(['{"id": 18446744073709551616}']), ROW_ERRORS, "out of range"),
        c(
            "json_100k_keys",
            "JSON",
            lambda: json_text(["{" + ",".join(f'"k{i}": {i}' for i in range(100_000)) + "}"]),
            ROW_ERRORS,
            "and 99,980 more",
        ),
        c(
            "json_200k_elements_not_objects",
            "JSON",
            lambda: b"[" + b"1," * 200_000 + b"1]",
            "TOO_MANY_ERRORS",
            "maxErrors",
            max_errors=100_000,
        ),
        c("json_trailing_garbage", "JSON", lambda: b'[{"id": 1}] {"id": 2}', "INVALID_FILE", "followed by more text"),
        # NDJSON
        c(
            "ndjson_int_4301_digits",
            "NDJSON",
            lambda: b'{"id": ' + HUGE_INT.encode() + b"}\n",
            ROW_ERRORS,
            "a number of 4,301 characters",
        ),
        c(
            "ndjson_lone_surrogate",
            "NDJSON",
            lambda: b'{"id": 1, "name": "\\ud800"}\n',
            ROW_ERRORS,
            "lone surrogate",
            e2e=True,
        ),
        c("ndjson_brackets_line", "NDJSON", lambda: b"[" * 100_000 + b"\n", ROW_ERRORS, "nested deeper"),
        c("ndjson_object_nesting", "NDJSON", lambda: _deep_object(6_500)[1:-1] + b"\n", ROW_ERRORS, "nested deeper"),
        c(
            "ndjson_line_of_20mb",
            "NDJSON",
            lambda: b'{"id": 1, "notes": "' + b"x" * (20 * MiB) + b'"}\n',
            ROW_ERRORS,
            "it was not read",
        ),
        # XLSX
        c(
            "xlsx_shared_strings_400mb",
            "XLSX",
            lambda: xlsx_file(
                _data_row(2, '<c r="A2"><v>1</v></c><c r="B2" t="s"><v>0</v></c>'),
                shared=_repeat(b"<si><t>" + b"s" * 1000 + b"</t></si>", 400 * MiB),
            ),
            "FILE_LIMIT_EXCEEDED",
            "inflates 466 times",
            e2e=True,
        ),
        c(
            "xlsx_shared_strings_70mb_incompressible",
            "XLSX",
            lambda: xlsx_file(b"", shared=_random_strings(70 * MiB)),
            "FILE_LIMIT_EXCEEDED",
            "shared strings inflate to",
        ),
        c(
            "xlsx_1_5m_short_shared_strings",
            "XLSX",
            lambda: xlsx_file(b"", shared=_numbered_strings(1_500_000)),
            "FILE_LIMIT_EXCEEDED",
            "more than 1,000,000 shared strings",
        ),
        c(
            "xlsx_sheet_ratio_bomb",
            "XLSX",
            lambda: xlsx_file(_repeat(b" " * 1024, 300 * MiB)),
            "FILE_LIMIT_EXCEEDED",
            "inflates",
        ),
        c(
            "xlsx_styles_bomb",
            "XLSX",
            lambda: xlsx_file(b"", extra={"xl/styles.xml": b" " * (40 * MiB)}),
            "FILE_LIMIT_EXCEEDED",
            "inflates",
        ),
        c(
            "xlsx_cell_at_XFD1048576",
            "XLSX",
            lambda: xlsx_file(_data_row(1_048_576, '<c r="XFD1048576"><v>1</v></c>')),
            "TOO_MANY_ERRORS",
            "maxErrors",
            max_errors=100_000,
            e2e=True,
        ),
        c(
            "xlsx_cell_beyond_XFD",
            "XLSX",
            lambda: xlsx_file(_data_row(2, '<c r="XFE2"><v>1</v></c>')),
            "FILE_LIMIT_EXCEEDED",
            "beyond column XFD",
        ),
        c(
            "xlsx_row_beyond_1048576",
            "XLSX",
            lambda: xlsx_file(_data_row(1_048_577, '<c r="A1048577"><v>1</v></c>')),
            "FILE_LIMIT_EXCEEDED",
            "a sheet ends at row",
        ),
        c(
            "xlsx_row_of_100k_cells",
            "XLSX",
            lambda: xlsx_file(_data_row(2, "".join(f"<c><v>{i * 7919 % 100_003}</v></c>" for i in range(100_000)))),
            "FILE_LIMIT_EXCEEDED",
            "more than 16,384 cells",
        ),
        c(
            "xlsx_int_4301_digits",
            "XLSX",
            lambda: xlsx_file(_data_row(2, f'<c r="A2"><v>{HUGE_INT}</v></c>')),
            ROW_ERRORS,
            "a number of 4,301 characters",
            e2e=True,
        ),
        c(
            "xlsx_float_5000_digits",
            "XLSX",
            lambda: xlsx_file(_data_row(2, f'<c r="A2"><v>1</v></c><c r="C2"><v>1.{"9" * 5000}</v></c>')),
            ROW_ERRORS,
            "a number of 5,002 characters",
        ),
        c(
            "xlsx_shared_string_index_out_of_range",
            "XLSX",
            lambda: xlsx_file(_data_row(2, '<c r="A2"><v>1</v></c><c r="B2" t="s"><v>99999</v></c>'), shared=b""),
            ROW_ERRORS,
            "cannot be read",
        ),
        c("xlsx_20k_members", "XLSX", _many_members, "FILE_LIMIT_EXCEEDED", "members"),
        c("xlsx_billion_laughs", "XLSX", _billion_laughs, "INVALID_FILE", "not an XLSX workbook that can be read"),
        c("xlsx_not_a_zip", "XLSX", lambda: b"PK\x03\x04" + b"\x00" * 1000, "INVALID_FILE", "not an XLSX workbook"),
    ]


def by_name(name: str) -> Case:
    return next(case for case in cases() if case.name == name)


@functools.cache
def _built(name: str) -> bytes:
    return by_name(name).build()


# --- reading a case as the worker does ----------------------------------------------------------------


def run_case(case: Case, batch_rows: int = 5_000) -> Outcome:
    """``case`` through the worker's reading half (readers, limits, checks and the report's
    encoding), with the default settings."""
    from dataport.settings import Settings
    from formats.column_checker import TYPED
    from formats.csv import CsvWriter
    from formats.limits import ParseLimits, capped
    from formats.readers import reader_for
    from formats.records import FileError
    from workers.attempts import Failure
    from workers.imports import REPORT_COLUMNS, FileBatches, _columns

    settings = Settings()
    dataset = Dataset("imp", "sqlite", "", "imp", COLUMNS, key=("id",), importable=True)
    outcome = Outcome("SUCCEEDED")
    report = CsvWriter(REPORT_COLUMNS, formula_guard=True)
    max_errors = min(case.max_errors, settings.import_max_errors_limit)
    try:
        reader = reader_for(
            case.format,
            io.BytesIO(case.content),
            max_cell_bytes=settings.import_max_cell_bytes,
            limits=ParseLimits.from_settings(settings),
        )
        batches = FileBatches(reader, dataset, _columns(dataset, reader), case.format, output=TYPED)
        while True:
            batch = batches.next(batch_rows, max_errors - outcome.rows_failed)
            outcome.rows_ok += batch.valid
            outcome.rows_failed += batch.failed_rows
            if outcome.report_bytes < settings.import_max_report_bytes:
                outcome.report_bytes += len(report.write(batch.failures))
            outcome.reasons += [f"{column}: {reason}" for _, column, reason, _ in batch.failures[:5]][:5]
            if outcome.rows_failed >= max_errors:
                outcome.code = "TOO_MANY_ERRORS"
                outcome.message = f"Stopped after {max_errors:,} failed rows (maxErrors)"
                break
            if batch.done:
                break
    except (FileError, Failure) as error:
        outcome.code, outcome.message = error.code, capped(str(error))
    outcome.report_bytes = min(outcome.report_bytes, settings.import_max_report_bytes)
    return outcome


def peak_rss_kib() -> int:
    """This process's peak RSS since its exec (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over from before the exec, when the forked child still counted its parent's pages, so under a
    large parent (a long pytest session) every case seemed to take the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="cases to run (all when none)")
    parser.add_argument("--limit-mib", type=int, default=1024, help="address-space limit (RLIMIT_AS)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(case.name for case in cases()))
        return
    names = args.names or [case.name for case in cases()]
    for name in names:
        case = by_name(name)
        case.content  # noqa: B018  # built before the limit: the file is the input, not the parser's cost
        limit = args.limit_mib * MiB
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        started = time.perf_counter()
        try:
            outcome = run_case(case)
        except MemoryError:
            outcome = Outcome("MEMORY_ERROR")
        outcome.seconds = round(time.perf_counter() - started, 3)
        outcome.peak_rss_mib = round(peak_rss_kib() / 1024, 1)
        print(json.dumps({"name": name, **asdict(outcome), "kind": outcome.kind}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
