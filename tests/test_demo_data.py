"""The SQLite demo dataset: deterministic, wide, typed as declared, with the awkward cells present."""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import sqlite3
import time
from pathlib import Path

import pytest

from sources.base import COLUMN_TYPES
from sources.demo import (
    ASSAYS,
    DEMO_COLUMNS,
    FILE_NAME,
    TABLE,
    demo_dataset,
    ensure_demo_database,
    generate,
)

ROWS = 2_000
NAMES = [c.name for c in DEMO_COLUMNS]


def _digest(path: Path, limit: int | None = None) -> str:
    sql = f"SELECT * FROM {TABLE} ORDER BY sample_id" + (f" LIMIT {limit}" if limit else "")
    h = hashlib.sha256()
    with sqlite3.connect(path) as con:
        for row in con.execute(sql):
            h.update(repr(row).encode())
    return h.hexdigest()


def _values(path: Path, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite3"
    generate(path, rows=ROWS)
    return path


def test_same_seed_same_rows_other_seed_other_rows(db: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again.sqlite3", tmp_path / "other.sqlite3"
    generate(again, rows=ROWS)
    generate(other, rows=ROWS, seed=8)
    assert _digest(again) == _digest(db)
    assert again.read_bytes() == db.read_bytes()  # the files too, with one SQLite library
    assert _digest(other) != _digest(db)


def test_a_row_does_not_depend_on_the_row_count(db: Path, tmp_path: Path) -> None:
    shorter = tmp_path / "shorter.sqlite3"
    generate(shorter, rows=1_001)  # odd, and not a multiple of the batch size
    assert _digest(shorter) == _digest(db, limit=1_001)


def test_columns_exist_with_their_declared_types(db: Path) -> None:
    assert len(DEMO_COLUMNS) >= 55
    assert len(set(NAMES)) == len(NAMES)
    assert all(c.type in COLUMN_TYPES for c in DEMO_COLUMNS)
    assert [r[1] for r in _values(db, f"PRAGMA table_info({TABLE})")] == NAMES
    assert _values(db, f"SELECT count(*), min(sample_id), max(sample_id) FROM {TABLE}") == [(ROWS, 1, ROWS)]

    date_re = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
    datetime_re = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
    rows = _values(db, f"SELECT * FROM {TABLE} WHERE sample_id % 7 = 0")
    for col, values in zip(DEMO_COLUMNS, zip(*rows, strict=True), strict=True):
        present = [v for v in values if v is not None]
        assert present, f"{col.name} is always NULL"
        if col.required:
            assert len(present) == len(values), col.name
        checks = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int),
            "float": lambda v: isinstance(v, float),
            "boolean": lambda v: v in (0, 1) and isinstance(v, int),
            "date": lambda v: isinstance(v, str) and date_re.match(v),
            "datetime": lambda v: isinstance(v, str) and datetime_re.match(v),
        }
        bad = [v for v in present if not checks[col.type](v)]
        assert not bad, f"{col.name} ({col.type}): {bad[:3]}"
        if col.max_length:
            assert all(len(v) <= col.max_length for v in present), col.name
    booleans = [c.name for c in DEMO_COLUMNS if c.type == "boolean"]
    for name in booleans:  # both values occur
        assert {v for (v,) in _values(db, f"SELECT DISTINCT {name} FROM {TABLE}")} == {0, 1}, name


def test_dataset_description() -> None:
    ds = demo_dataset(Path("/x/demo.sqlite3"))
    assert (ds.name, ds.title, ds.source, ds.url, ds.table) == (
        "samples", "Rock samples", "sqlite", "/x/demo.sqlite3", "samples"
    )  # fmt: skip
    assert ds.key == ("sample_id",) and ds.importable
    assert (ds.max_export_rows, ds.stream_max_rows) == (80_000, 10_000)
    assert ds.column("sample_id").type == "integer"
    not_filterable = [c.name for c in ds.columns if not c.filterable]
    assert "notes" in not_filterable and all(not ds.column(n).sortable for n in not_filterable)


def test_awkward_cells_are_present(db: Path) -> None:
    text_columns = [c.name for c in DEMO_COLUMNS if c.type == "string"]
    cells = {v for name in text_columns for (v,) in _values(db, f"SELECT DISTINCT {name} FROM {TABLE}")}
    cells.discard(None)
    for needle in ("Ørsted", "São Paulo", "Müller", "招远"):
        assert any(needle in c for c in cells), needle
    assert any("," in c for c in cells)
    assert any('"' in c for c in cells)
    assert any("\n" in c for c in cells)
    assert any("," in c and '"' in c and "\n" in c for c in cells)
    for lead in "=+-@\t":
        assert any(c.startswith(lead) for c in cells), f"no text cell starts with {lead!r}"
    # Numbers below zero are numbers, not formulas: the guard must leave them alone.
    assert _values(db, f"SELECT count(*) FROM {TABLE} WHERE longitude < 0")[0][0] > 0


def test_assays_have_nulls_in_the_expected_share(db: Path) -> None:
    assert len(ASSAYS) >= 30
    for name, *_ in ASSAYS:
        assert demo_dataset(db).column(name).type == "float"
        sql = f"SELECT sum({name} IS NULL), min({name}), max({name}) FROM {TABLE}"
        nulls, low, high = _values(db, sql)[0]
        assert 0.02 * ROWS < nulls < 0.2 * ROWS, (name, nulls)
        assert 0 <= low < high, name


def test_generation_is_atomic_and_leaves_no_side_files(tmp_path: Path) -> None:
    path = tmp_path / "demo.sqlite3"
    generate(path, rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.sqlite3"]
    assert _values(path, "PRAGMA journal_mode") == [("wal",)]


def test_ensure_generates_once(tmp_path: Path) -> None:
    path = ensure_demo_database(tmp_path, 500)
    assert path == tmp_path / FILE_NAME
    first = path.stat()
    # An import changed the table: the recorded count still matches, so it is kept.
    with sqlite3.connect(path) as con:
        con.execute(f"DELETE FROM {TABLE} WHERE sample_id > 400")
    con.close()
    assert ensure_demo_database(tmp_path, 500) == path
    assert path.stat().st_ino == first.st_ino
    assert _values(path, f"SELECT count(*) FROM {TABLE}") == [(400,)]
    # Another row count asked for: generated afresh.
    ensure_demo_database(tmp_path, 600)
    assert path.stat().st_ino != first.st_ino
    assert _values(path, f"SELECT count(*) FROM {TABLE}") == [(600,)]


def test_ensure_replaces_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("half a database")
    path = ensure_demo_database(tmp_path, 50)
    assert _values(path, f"SELECT count(*) FROM {TABLE}") == [(50,)]


def _ensure_in_child(data_dir: str) -> None:
    ensure_demo_database(Path(data_dir), 3_000)


def test_ensure_from_two_processes_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    path = tmp_path / FILE_NAME
    assert _values(path, f"SELECT count(*) FROM {TABLE}") == [(3_000,)]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_100k_rows(tmp_path: Path) -> None:
    """Timed for the report; asserts only the result (machines differ)."""
    path = tmp_path / "demo.sqlite3"
    started = time.perf_counter()
    generate(path, rows=100_000)
    elapsed = time.perf_counter() - started
    assert _values(path, f"SELECT count(*), max(sample_id) FROM {TABLE}") == [(100_000, 100_000)]
    print(f"generated 100,000 rows in {elapsed:.1f}s")
