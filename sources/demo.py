"""The SQLite demo dataset ``samples``: geochemistry-style rock samples, generated deterministically.

Same ``rows`` and ``seed`` give the same table contents, row for row. Row ``i`` does not depend on
``rows`` either (the first 2,000 rows of a 1,000,000-row database are the 2,000-row database).

Besides plain data the table holds the awkward cells a file format must survive: unicode names,
text with commas, double quotes and newlines, text starting with ``=``, ``+``, ``-`` or ``@``
(the CSV formula guard), negative numbers, NULLs. Booleans are stored as 0/1 integers; the
column's declared type ``boolean`` tells readers to convert.

It is a SQLite dataset like any other, and the one ``sources.registry`` serves when no datasets file
is set, so it lives with the sources (``dataport dev`` and ``dataport demo-data`` make it too).
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import random
import sqlite3
import sys
from array import array
from datetime import date
from pathlib import Path
from statistics import NormalDist
from typing import Any

from sources.base import Column, Dataset

GENERATOR_VERSION = 1
BATCH_ROWS = 5_000
TABLE = "samples"
FILE_NAME = "demo.sqlite3"

S = "string"
_NOTES = {"filterable": False, "sortable": False}

# (element column, median, log-sd, decimals, share of NULLs): lognormal assays in realistic ranges.
ASSAYS: tuple[tuple[str, float, float, int, float], ...] = (
    ("au_ppm", 0.05, 1.6, 3, 0.08),
    ("ag_ppm", 0.8, 1.2, 2, 0.10),
    ("cu_pct", 0.04, 1.3, 4, 0.06),
    ("pb_ppm", 25.0, 1.1, 1, 0.07),
    ("zn_ppm", 80.0, 1.0, 1, 0.07),
    ("mo_ppm", 2.0, 1.1, 2, 0.12),
    ("ni_ppm", 40.0, 0.9, 1, 0.09),
    ("co_ppm", 15.0, 0.8, 1, 0.09),
    ("as_ppm", 12.0, 1.3, 1, 0.11),
    ("sb_ppm", 1.0, 1.0, 2, 0.14),
    ("bi_ppm", 0.3, 1.1, 3, 0.15),
    ("cd_ppm", 0.2, 1.0, 3, 0.13),
    ("cr_ppm", 90.0, 0.8, 1, 0.06),
    ("fe_pct", 5.0, 0.5, 2, 0.05),
    ("mn_ppm", 900.0, 0.6, 0, 0.05),
    ("v_ppm", 110.0, 0.6, 1, 0.08),
    ("ti_pct", 0.5, 0.6, 3, 0.07),
    ("al_pct", 7.5, 0.35, 2, 0.05),
    ("ca_pct", 3.0, 0.8, 2, 0.06),
    ("mg_pct", 1.8, 0.7, 2, 0.06),
    ("na_pct", 2.0, 0.6, 2, 0.07),
    ("k_pct", 1.9, 0.6, 2, 0.07),
    ("p_pct", 0.08, 0.6, 3, 0.10),
    ("s_pct", 0.3, 1.4, 3, 0.09),
    ("ba_ppm", 450.0, 0.7, 0, 0.08),
    ("sr_ppm", 250.0, 0.7, 0, 0.10),
    ("li_ppm", 20.0, 0.8, 1, 0.12),
    ("be_ppm", 1.5, 0.6, 2, 0.14),
    ("sn_ppm", 2.5, 0.9, 2, 0.13),
    ("w_ppm", 1.5, 1.2, 2, 0.15),
    ("u_ppm", 2.0, 0.7, 2, 0.11),
    ("th_ppm", 8.0, 0.7, 2, 0.11),
    ("la_ppm", 30.0, 0.6, 1, 0.12),
    ("ce_ppm", 60.0, 0.6, 1, 0.12),
    ("zr_ppm", 150.0, 0.6, 1, 0.10),
)

DEMO_COLUMNS: tuple[Column, ...] = (
    Column("sample_id", "integer", required=True),
    Column("sample_code", S, required=True, max_length=16),
    Column("project", S, required=True, max_length=64),
    Column("site", S, required=True, max_length=64),
    Column("sample_type", S, required=True, max_length=32),
    Column("drillhole", S, max_length=32),  # NULL for surface samples
    Column("lithology", S, max_length=64),
    Column("rock_type", S, max_length=32),
    Column("collector", S, max_length=64),
    Column("lab", S, max_length=64),
    Column("method", S, max_length=32),
    Column("batch_code", S, max_length=32),
    Column("field_label", S, max_length=64),  # as written on the bag: a few start with = + - @
    Column("sieve_fraction", S, max_length=32),  # "-80 mesh", "+2 mm": text that starts with - or +
    Column("collected_on", "date", required=True),
    Column("analysed_at", "datetime"),
    Column("depth_from_m", "float"),
    Column("depth_to_m", "float"),
    Column("latitude", "float"),
    Column("longitude", "float"),
    Column("elevation_m", "float"),
    Column("recovery_pct", "float"),
    Column("weight_kg", "float"),
    Column("mag_susc_si", "float"),
    Column("core_box", "integer"),
    Column("gold_grains", "integer"),
    Column("run_no", "integer"),
    Column("is_duplicate", "boolean", required=True),
    Column("qc_passed", "boolean", required=True),
    Column("is_standard", "boolean", required=True),
    Column("notes", S, max_length=2_000, **_NOTES),
    Column("description", S, max_length=2_000, **_NOTES),
    *(Column(name, "float") for name, *_ in ASSAYS),
)

_SQL_TYPES = {"integer": "INTEGER", "boolean": "INTEGER", "float": "REAL"}

# name, code, latitude, longitude, elevation (m)
SITES = (
    ("Ørsted Ridge", "ORS", 61.18, -45.42, 310.0),
    ("São Paulo Norte", "SPN", -23.42, -46.58, 760.0),
    ("Kalgoorlie East", "KAL", -30.75, 121.52, 370.0),
    ("Kiruna Deep", "KIR", 67.85, 20.22, 450.0),
    ("Sudbury Basin", "SUD", 46.60, -81.18, 280.0),
    ("Atacama Alto", "ATA", -24.27, -69.07, 3_100.0),
    ("Müllerthal", "MUL", 49.78, 6.35, 320.0),
    ("Mount Isa North", "ISA", -20.65, 139.49, 356.0),
    ("Río Tinto Valle", "RTV", 37.69, -6.59, 410.0),
    ("Red Dog Creek", "RDC", 68.07, -162.87, 280.0),
    ("Łysa Góra", "LYS", 50.86, 20.90, 590.0),
    ("Zhaoyuan 招远", "ZHY", 37.36, 120.40, 90.0),
)
PROJECTS = (
    "Aurora Gold", "Blue Lake Copper", "Nordic Nickel", "Müller–Ørsted JV", "Serra Dourada",
    "Iron Crown", "Silverbell", "Rare Earth Frontier",
)  # fmt: skip
# 44% core, 26% RC chips, 12% rock chips, 12% soil, 6% stream sediment: one pick out of 50.
SAMPLE_TYPES = ("core",) * 22 + ("rc chips",) * 13 + ("rock chip",) * 6 + ("soil",) * 6 + ("stream sediment",) * 3
LITHOLOGIES = (
    ("Basalt", "igneous"), ("Granite", "igneous"), ("Andesite", "igneous"), ("Gabbro", "igneous"),
    ("Rhyolite", "igneous"), ("Komatiite", "igneous"), ("Schist", "metamorphic"),
    ("Gneiss", "metamorphic"), ("Banded iron formation", "metamorphic"), ("Amphibolite", "metamorphic"),
    ("Sandstone", "sedimentary"), ("Shale", "sedimentary"), ("Limestone", "sedimentary"),
    ("Conglomerate", "sedimentary"), ("Quartz vein", "vein"), ("Massive sulphide", "vein"),
)  # fmt: skip
COLLECTORS = (
    "Anna Müller", "Jens Ørsted", "João Conceição", "Zoë Brontë", "Siobhán Ní Bhriain", "Łukasz Wróbel",
    "Ngozi Okonkwo", "李伟", "Ana María Núñez", "Tom O'Brien", "Priya Raghunathan", "Mika Häkkinen",
    "Müller, Hans",  # a comma in a name
    'Dana "DJ" Jones',  # double quotes in a name
)  # fmt: skip
LABS = (
    ("ALS Perth", "PER"), ("SGS São Paulo", "SPA"), ("Bureau Veritas Vancouver", "VAN"),
    ("Intertek Kiruna", "KRN"), ("Labor Müller GmbH", "MUE"),
)  # fmt: skip
METHODS = ("FA50/AAS", "4-acid ICP-MS", "Aqua regia ICP-OES", "XRF fused bead", "Photon assay")
SIEVES = ("-80 mesh", "-200 mesh", "+2 mm", "-2+0.5 mm", "+10 mesh", "bulk")
# Labels as typed by people in the field: most are plain, a few would be formulas in a spreadsheet.
SPECIAL_LABELS = (
    "=SUM(A1:A9)", "+61 8 9322 1234", "-DUP of previous bag", "@field-team check",
    '=HYPERLINK("http://example.com","click")', "Bag torn, re-bagged", "Straße 7, Kiste 3", "  padded  ",
)  # fmt: skip
SPECIAL_NOTES = (
    'Core "broken" at contact,\nre-logged next day',
    "Comma, comma, comma",
    'She said: "visible gold!"',
    "Line one\nLine two\r\nLine three",
    "Ørsted, São Paulo, Müller: all ünïcödé ✓",
    "-- looks like a SQL comment; DROP TABLE samples; --",
    "=1+2",
    "\ttab-led note",
)
NOTE_PARTS = (
    "fine-grained", "strongly altered", "weakly magnetic", "pyrite 2%", "chalcopyrite stringers",
    "quartz-carbonate veining", "sheared contact", "oxidised to 40 m", "core loss at top of run",
    "silica flooding", "sericite alteration", "minor arsenopyrite", "fresh rock", "clay-rich",
)  # fmt: skip
COLOURS = ("Grey", "Dark green", "Pale pink", "Buff", "Black", "Red-brown")
TEXTURES = (
    "fine-grained", "medium-grained", "coarse-grained", "foliated", "massive", "brecciated", "porphyritic",
)  # fmt: skip
FEATURES = (
    "with disseminated sulphides", "with hematite staining", "cut by late veins", "weathered surface",
    "vuggy", "with chlorite on fractures", "no visible mineralisation",
)  # fmt: skip

_DAY0 = date(2015, 1, 1).toordinal()
_DAYS = date(2024, 12, 31).toordinal() - _DAY0 + 1
# Lookup tables keep the per-row work to cheap index picks (100,000 rows in a few seconds).
_ISO_DAYS = tuple(date.fromordinal(_DAY0 + d).isoformat() for d in range(_DAYS + 64))
_HH_MM = tuple(f"{m // 60:02d}:{m % 60:02d}" for m in range(1440))
_SS = tuple(f"{s:02d}" for s in range(60))


_GRID = 2**14  # lognormal quantiles per assay


@functools.cache
def _normal_quantiles() -> tuple[float, ...]:
    return tuple(NormalDist().inv_cdf((k + 0.5) / _GRID) for k in range(_GRID))


def demo_dataset(path: Path, max_export_rows: int = 80_000, stream_max_rows: int = 10_000) -> Dataset:
    return Dataset(
        name="samples",
        title="Rock samples",
        source="sqlite",
        url=str(path),
        table=TABLE,
        columns=DEMO_COLUMNS,
        key=("sample_id",),
        importable=True,
        max_export_rows=max_export_rows,
        stream_max_rows=stream_max_rows,
    )


def _create_sql() -> str:
    cols = []
    for c in DEMO_COLUMNS:
        sql = f"{c.name} {_SQL_TYPES.get(c.type, 'TEXT')}"
        if c.name == "sample_id":
            sql += " PRIMARY KEY"
        elif c.required:
            sql += " NOT NULL"
        cols.append(sql)
    return f"CREATE TABLE {TABLE} (\n  " + ",\n  ".join(cols) + "\n)"


def _base_rows(rng: random.Random, start: int, stop: int) -> list[tuple[Any, ...]]:
    """Rows ``start..stop-1`` (1-based ids) without the assays, all from one random stream."""
    r = rng.random
    n_sites, n_proj, n_lith, n_coll = len(SITES), len(PROJECTS), len(LITHOLOGIES), len(COLLECTORS)
    n_labs, n_meth, n_sieve = len(LABS), len(METHODS), len(SIEVES)
    n_note, n_col, n_tex, n_feat = len(NOTE_PARTS), len(COLOURS), len(TEXTURES), len(FEATURES)
    rows = []
    for i in range(start, stop):
        site, code, lat0, lon0, elev0 = SITES[int(r() * n_sites)]
        sample_type = SAMPLE_TYPES[int(r() * 50)]
        lithology, rock_type = LITHOLOGIES[int(r() * n_lith)]
        lab, lab_code = LABS[int(r() * n_labs)]
        day = int(r() * _DAYS)
        collected = _ISO_DAYS[day]
        if r() < 0.04:
            analysed = None  # not back from the lab yet
        else:
            secs = int(r() * 86_400)
            analysed = f"{_ISO_DAYS[day + 3 + int(r() * 60)]}T{_HH_MM[secs // 60]}:{_SS[secs % 60]}Z"
        hole: str | None
        depth_from: float | None
        depth_to: float | None
        if sample_type == "core" or sample_type == "rc chips":
            hole = f"{code}-DH{1 + int(r() * 40):03d}"
            depth_from = int(r() * 85_000) / 100
            depth_to = int(depth_from * 100 + 50 + r() * 250) / 100
            recovery = min(100.0, int(700 + r() * 350) / 10) if sample_type == "core" else None
            box = 1 + int(depth_from / 4.5) if sample_type == "core" else None
            sieve = None
        else:
            hole = depth_from = depth_to = recovery = box = None
            sieve = SIEVES[int(r() * n_sieve)] if sample_type != "rock chip" else None
        if i % 97 == 0:
            label = SPECIAL_LABELS[(i // 97) % len(SPECIAL_LABELS)]
        else:
            label = f"BAG {i:07d}-{'ABCD'[int(r() * 4)]}"
        if i % 89 == 0:
            notes = SPECIAL_NOTES[(i // 89) % len(SPECIAL_NOTES)]
        elif r() < 0.3:
            notes = None
        else:
            a = int(r() * n_note)
            notes = NOTE_PARTS[a]
            if r() < 0.6:
                b = (a + 1 + int(r() * (n_note - 1))) % n_note
                notes = f"{notes}, {NOTE_PARTS[b]}"
                if r() < 0.4:
                    notes = f"{notes}; {NOTE_PARTS[(b + 1 + int(r() * (n_note - 2))) % n_note]}"
        description = (
            f"{COLOURS[int(r() * n_col)]} {TEXTURES[int(r() * n_tex)]} {lithology.lower()},"
            f" {FEATURES[int(r() * n_feat)]}"
        )
        rows.append((
            i,
            f"SMP-{i:06d}",
            PROJECTS[int(r() * n_proj)],
            site,
            sample_type,
            hole,
            lithology,
            rock_type,
            COLLECTORS[int(r() * n_coll)],
            lab,
            METHODS[int(r() * n_meth)],
            f"{lab_code}{collected[2:4]}-{int(r() * 5000):05d}",
            label,
            sieve,
            collected,
            analysed,
            depth_from,
            depth_to,
            int((lat0 + (r() - 0.5) * 0.1) * 1e6) / 1e6,
            int((lon0 + (r() - 0.5) * 0.1) * 1e6) / 1e6,
            int((elev0 + (r() - 0.5) * 80 - (depth_from or 0)) * 10) / 10,
            recovery,
            int(500 + r() * 4500) / 1000,
            int(1e6 * 2.0 ** (r() * 16 - 12)) / 1e6 if r() > 0.2 else None,  # 2.4e-4 .. 16
            box,
            int(r() ** 4 * 30) if r() < 0.5 else None,
            1 + int(r() * 12),
            int(r() < 0.05),
            int(r() < 0.92),
            int(r() < 0.03),
            notes,
            description,
        ))  # fmt: skip
    return rows


def _assay_table(name: str, median: float, sd: float, decimals: int, nulls: float) -> tuple[float | None, ...]:
    """A look-up table for one assay: a cell is ``table[16 random bits]``.

    ``_GRID`` lognormal quantiles rounded to the assay's precision, a share of them replaced by NULL
    (spread over the whole range, so missing values do not depend on the level), repeated to 2**16
    entries. Equal values share one float object.
    """
    mu, scale = math.log(median), 10**decimals
    same: dict[float, float] = {}
    table: list[float | None] = [
        same.setdefault(v, v) for v in (int(math.exp(mu + sd * z) * scale + 0.5) / scale for z in _normal_quantiles())
    ]
    for k in random.Random(f"dataport-demo:nulls:{name}").sample(range(_GRID), round(nulls * _GRID)):
        table[k] = None
    return tuple(table) * (2**16 // _GRID)


def _assay_column(rng: random.Random, table: tuple[float | None, ...], n: int) -> list[float | None]:
    # Whole 32-bit words (an even n), so that batches of any size read the same stream.
    index = array("H", rng.randbytes(4 * ((n + 1) // 2)))
    if sys.byteorder == "big":
        index.byteswap()  # the same cells on every machine
    return list(map(table.__getitem__, index[:n]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        p.unlink(missing_ok=True)


def generate(path: Path, rows: int = 100_000, seed: int = 7) -> None:
    """Write the demo database to ``path``, atomically: a temp file beside it, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    # One random stream for the row body and one per assay: row i never depends on the batch size.
    base_rng = random.Random(f"dataport-demo:{seed}:base")
    assays = [(random.Random(f"dataport-demo:{seed}:{a[0]}"), _assay_table(*a)) for a in ASSAYS]
    insert = f"INSERT INTO {TABLE} VALUES ({', '.join('?' * len(DEMO_COLUMNS))})"
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            # A fresh private file: no rollback journal needed during the load (a crash leaves only
            # the temp file). The file is switched to WAL at the end, for readers beside imports.
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            con.execute("BEGIN")
            con.execute(_create_sql())
            con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("rows", str(rows)), ("seed", str(seed)), ("generator_version", str(GENERATOR_VERSION))],
            )
            for start in range(1, rows + 1, BATCH_ROWS):
                stop = min(start + BATCH_ROWS, rows + 1)
                base = _base_rows(base_rng, start, stop)
                cells = zip(*[_assay_column(rng, table, stop - start) for rng, table in assays], strict=True)
                con.executemany(insert, (b + a for b, a in zip(base, cells, strict=True)))
            for col in ("collected_on", "site", "project", "lithology", "analysed_at"):
                con.execute(f"CREATE INDEX {TABLE}_{col} ON {TABLE} ({col})")
            con.execute("COMMIT")
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()  # the last connection of a WAL file checkpoints it and removes the -wal file
        _fsync(tmp)
        # A stale -wal/-shm of an older database at ``path`` would be replayed into the new file.
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def _recorded_rows(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            found = con.execute("SELECT value FROM meta WHERE key = 'rows'").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return None  # not a database, or no meta table: generate afresh
    return int(found[0]) if found else None


def ensure_demo_database(data_dir: Path, rows: int) -> Path:
    """``data_dir/demo.sqlite3``, generated unless it exists with ``rows`` recorded in its meta table.

    The recorded count, not the table's: rows an import adds or removes do not cause a regeneration.
    Two processes calling this at once serialise on a lock file; the second finds the database made.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / FILE_NAME
    with open(data_dir / f"{FILE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _recorded_rows(path) != rows:
            generate(path, rows)
    return path
