"""PostgreSQL export benchmark: a typed table and a wide JSONB table to CSV through the whole path.

Command (from the repository root; PostgreSQL must be running, trust auth)::

    python bench/postgres_export.py                 # both cases
    python bench/postgres_export.py --case copy     # 1,000,000 rows x 20 typed columns, against psql \\copy
    python bench/postgres_export.py --case copy --runs 3   # three rounds on one stack, their medians
    python bench/postgres_export.py --case wide     # 40,000 rows x 2,897 JSONB keys (columns = "discover")
    python bench/postgres_export.py --case wide --runs 2 --floor-only   # rounds against the psql floor only
    python bench/postgres_export.py --case copy --rows 200000 --postgres-url postgresql://postgres@host/db

Cases:

``copy``
    Table ``bench_copy_<rows>``: ``id integer primary key`` and 19 more columns (text with unicode,
    commas, quotes, newlines and formula-like cells; dates; timestamptz; floats with nulls; integers;
    booleans). The dataset lists it with ``columns = "discover"`` and ``max_export_rows = <rows>``.
    Peer, in the same run: ``psql -c "\\copy (SELECT <the same 20 columns> FROM t ORDER BY id) TO
    STDOUT WITH CSV HEADER"`` with its output in a file. Target: Dataport seconds / psql seconds <= 1.5.
``wide``
    Table ``bench_wide_<rows>`` ``(id integer primary key, data jsonb)``: every document has 2,897
    keys, 2,890 floats (about 3 % JSON nulls) and 7 text fields (one of them an ISO date-time); about
    1 GB on disk, mostly TOAST. The dataset has ``columns = "discover"``, so the CSV has 2,898
    columns (``id``, ``data.<key>``). Target: under 30 s; the reference system took 260 s (4 min
    20 s), and ``vs reference`` is Dataport seconds / 260. Two peers in the same run:

    1. ``psql \\copy (SELECT id, data FROM t ORDER BY id)``: the documents out as JSON text, not
       flattened into columns. A floor rather than an equal: what PostgreSQL alone costs to hand
       over every document (decompress, render as text) on one connection;
    2. the least a Python program does to write the same CSV: a server-side cursor over
       ``SELECT id, data::text``, ``orjson.loads``, ``csv.writer`` (``PYTHON_FLATTEN`` below). Its
       file is expected to be byte-identical to Dataport's ("same bytes" in the table).

Each table is built once (not timed) and reused while its row count and build version match; it is
read once, untimed, before the measured runs so that nobody reads it cold. For each case:
``dataport api`` + ``dataport worker`` start on an embedded Redis with a datasets file and local
storage; ``requestExport`` (all columns, CSV) is followed over the ``exportProgress`` subscription
until SUCCEEDED ("seconds"), while a thread samples the worker's RSS (with children) every 10 ms;
then the file is downloaded and its SHA-256, size, ``rowCount``, header and CSV record count
(``csv.reader``) are checked. The peers run afterwards, one at a time, timed and sampled the same way;
their record counts (and, with the same columns, their headers) are checked too. That is one round;
``--runs N`` (default 1) runs N rounds on the case's one stack, which stays up while the peers run
(idle, it took 3 % of one CPU here: the worker polls its queue every 50 ms). Each round requests
the export as a new user: the service hands a user's repeated request back as the task already
finished (the same task id: a check says each round had its own).

How to read the result:

* ``seconds`` is request to SUCCEEDED (the file is then in storage, verified: the peer's file is on
  disk too); ``queued`` is createdAt -> startedAt (request handling, counting, queue pick-up),
  ``job`` startedAt -> finishedAt. ``download`` is listed apart and is not in the ratio.
* ``ratio to peer n`` = Dataport seconds / peer seconds; ``target`` says PASS or MISS against the case's goal.
  In the copy case the files are not byte-identical (Dataport writes ``true``/``false``, ``2020-01-02T03:04:05Z``,
  ``3.0`` and guards formula-like text; psql writes ``t``/``f``, ``2020-01-02 03:04:05+00``, ``3``):
  the checks compare record counts and headers, not bytes ("same bytes" is reported, not required).
* With ``--runs N`` above 1, every figure is the median of the N rounds' (peak RSS: the highest), and
  ``ratio to peer n`` is the median of the rounds' ratios, not the ratio of the medians; rows "each
  round" list the rounds' seconds and ratios, and the JSON has every round under ``rounds``. Why: on
  a shared machine the same export can take 30-60 % longer one minute than the next, so one Dataport
  run and one peer run a minute apart gave anything from 1.1x to 1.7x for the same code. Inside a
  round both see the machine in about the same state, and the median keeps one disturbed round from
  deciding the figure. ``target`` judges the median ratio (copy) or the median seconds (wide).
* RSS in MiB: the worker's peak (and idle, after start-up) and the peer's peak.

The script exits 1 when a file check fails or an export fails, in any round; a missed target is
printed as MISS and, only with ``--strict``, also exits 1. Numbers go to ``--out`` (JSON); logs to
``bench/out/logs/postgres_export-<case>/``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import psycopg
from _common import (
    OUT_DIR,
    SAMPLE_SECONDS,
    MiB,
    PeerComparison,
    Stack,
    console,
    csv_records,
    download,
    export_sampled,
    high_water_mark,
    mib,
    note_load,
    run_peer,
    sha256_of,
    stack_env,
    tree_rss,
    write_json,
)
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
COPY_TARGET_RATIO = 1.5
WIDE_TARGET_SECONDS = 30.0
WIDE_REFERENCE_SECONDS = 260.0  # the reference system: 4 min 20 s
WIDE_FLOAT_KEYS = 2890
WIDE_TEXT_KEYS = ("batch", "collected_at", "comment", "lab", "method", "operator", "site")
WIDE_KEYS = WIDE_FLOAT_KEYS + len(WIDE_TEXT_KEYS)  # 2,897
BUILD_VERSION = "dataport-bench-2"  # in the table's comment: a table of an older build is rebuilt

# --- the tables (built once, not timed) --------------------------------------------------------

COPY_COLUMNS = (
    ("id", "integer PRIMARY KEY"),
    ("site", "text NOT NULL"),
    ("sample_code", "text NOT NULL"),
    ("lithology", "text"),
    ("collected_on", "date NOT NULL"),
    ("analysed_at", "timestamptz"),
    ("depth_m", "double precision"),
    ("au_ppm", "double precision"),
    ("ag_ppm", "double precision"),
    ("cu_pct", "double precision"),
    ("zn_pct", "double precision NOT NULL"),
    ("pb_pct", "double precision"),
    ("grain_count", "integer NOT NULL"),
    ("box_no", "bigint"),
    ("is_duplicate", "boolean NOT NULL"),
    ("qc_passed", "boolean"),
    ("received_on", "date"),
    ("updated_at", "timestamptz NOT NULL"),
    ("weight_g", "double precision"),
    ("notes", "text"),
)

COPY_SELECT = """
SELECT i,
  (ARRAY['North Ridge', 'Ørsted Fell', 'Mount "Grey"', 'Lake, East', '東京 Basin', 'Zoë''s Creek'])[1 + i % 6],
  'S-' || lpad(i::text, 8, '0'),
  CASE WHEN i % 11 = 0 THEN NULL ELSE (ARRAY['granite', 'basalt', 'schist', 'gneiss', 'tuff'])[1 + i % 5] END,
  date '2010-01-01' + (i % 5000),
  CASE WHEN i % 13 = 0 THEN NULL
       ELSE timestamptz '2010-01-01 00:00:00+00' + i * interval '317 seconds'
            + (CASE WHEN i % 4 = 0 THEN (i % 1000) * interval '1 millisecond' ELSE interval '0' END) END,
  CASE WHEN i % 9 = 0 THEN NULL ELSE round((random() * 800)::numeric, 1)::float8 END,
  CASE WHEN i % 7 = 0 THEN NULL ELSE random() * 12 END,
  CASE WHEN i % 5 = 0 THEN NULL ELSE round((random() * 90)::numeric, 3)::float8 END,
  CASE WHEN i % 6 = 0 THEN NULL ELSE random() END,
  round((random() * 40)::numeric, 2)::float8,
  CASE WHEN i % 4 = 0 THEN NULL ELSE (random() * 1e6)::integer / 100.0 END,
  (random() * 100000)::integer,
  CASE WHEN i % 17 = 0 THEN NULL ELSE i / 40 END,
  i % 23 = 0,
  CASE WHEN i % 10 = 0 THEN NULL ELSE i % 3 <> 0 END,
  CASE WHEN i % 8 = 0 THEN NULL ELSE date '2010-01-01' + (i % 5000) + (i % 30) END,
  timestamptz '2020-01-01 00:00:00+00' + i * interval '31 seconds',
  CASE WHEN i % 12 = 0 THEN NULL ELSE round((random() * 5000)::numeric, 2)::float8 END,
  CASE WHEN i % 3 = 0 THEN NULL
       WHEN i % 97 = 0 THEN '=HYPERLINK("http://example.com")'
       WHEN i % 89 = 0 THEN '-5 dilution'
       WHEN i % 53 = 0 THEN E'two lines,\\nand "quotes"'
       WHEN i % 31 = 0 THEN ''
       ELSE 'note ' || i END
FROM generate_series({first}, {last}) AS i
"""

WIDE_SELECT = f"""
SELECT i, (
  -- "+ 0 * i" ties the subquery to the row: uncorrelated, PostgreSQL ran it once per INSERT, so that
  -- (build 1) every 5,000 documents had the same values and the same keys null in all of them.
  SELECT jsonb_object_agg('f' || lpad(k::text, 4, '0'),
                          CASE WHEN random() + 0 * i < 0.03 THEN NULL ELSE round((random() * 1000)::numeric, 3) END)
  FROM generate_series(1, {WIDE_FLOAT_KEYS}) AS k
) || jsonb_build_object(
  'batch', 'B-' || (i / 100),
  'collected_at', to_char(timestamp '2020-01-01' + i * interval '17 minutes', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
  'comment', (ARRAY['ok', 're-assay, low recovery', 'split "B"', 'Zoë checked'])[1 + i % 4],
  'lab', (ARRAY['Perth', 'Vancouver', 'Santiago'])[1 + i % 3],
  'method', (ARRAY['FA-AAS', 'ICP-MS', 'XRF'])[1 + i % 3],
  'operator', 'op-' || (i % 17),
  'site', 'Site ' || (i % 50)
)
FROM generate_series({{first}}, {{last}}) AS i
"""


def table_ready(conn: psycopg.Connection, table: str, rows: int) -> bool:
    """The table exists, was built by this version of the script and holds ``rows`` rows."""
    comment = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (table,)).fetchone()[0]
    if comment != f"{BUILD_VERSION} rows={rows}":
        return False
    return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == rows


def build_table(url: str, table: str, rows: int, create: str, select: str, chunk: int) -> None:
    """(Re)build ``table`` unless it is ready; rows inserted ``chunk`` at a time with progress."""
    with psycopg.connect(url, autocommit=True) as conn:
        if table_ready(conn, table, rows):
            console.print(f"[dim]reusing table {table} ({rows:,} rows)[/dim]")
            return
        console.print(f"[dim]building table {table} ({rows:,} rows; once, not timed)…[/dim]")
        started = time.perf_counter()
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.execute(create)
        conn.execute("SELECT setseed(0.42)")
        for first in range(1, rows + 1, chunk):
            last = min(rows, first + chunk - 1)
            conn.execute(f'INSERT INTO "{table}" ' + select.format(first=first, last=last))
            console.print(f"[dim]  {last:,} / {rows:,} rows, {time.perf_counter() - started:.0f} s[/dim]")
        conn.execute(f'VACUUM (ANALYZE) "{table}"')
        conn.execute(f"COMMENT ON TABLE \"{table}\" IS '{BUILD_VERSION} rows={rows}'")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size(%s))", (table,)).fetchone()[0]
        console.print(f"[dim]  built in {time.perf_counter() - started:.0f} s, {size}[/dim]")


def ensure_copy_table(url: str, rows: int) -> str:
    table = f"bench_copy_{rows}"
    create = f'CREATE TABLE "{table}" (' + ", ".join(f'"{n}" {t}' for n, t in COPY_COLUMNS) + ")"
    build_table(url, table, rows, create, COPY_SELECT, chunk=250_000)
    return table


def ensure_wide_table(url: str, rows: int) -> str:
    table = f"bench_wide_{rows}"
    create = f'CREATE TABLE "{table}" (id integer PRIMARY KEY, data jsonb NOT NULL)'
    build_table(url, table, rows, create, WIDE_SELECT, chunk=5_000)
    return table


# --- the peers ----------------------------------------------------------------------------------

# The least a Python program can do to flatten the documents into the same CSV: one server-side
# cursor, each document as JSON text parsed by orjson, csv.writer. Columns: the first document's
# keys, sorted (every document of the bench table has the same keys), as discovery names them.
PYTHON_FLATTEN = """
import csv, sys, orjson, psycopg
url, table, out = sys.argv[1:]
with psycopg.connect(url) as conn, open(out, "w", newline="", encoding="utf-8") as f:
    cur = conn.cursor(name="peer")
    cur.itersize = 200
    cur.execute(f'SELECT id, data::text FROM "{table}" ORDER BY id')
    w = csv.writer(f, lineterminator="\\r\\n")
    keys = None
    for id_, text in cur:
        doc = orjson.loads(text)
        if keys is None:
            keys = sorted(doc)
            w.writerow(["id", *("data." + k for k in keys)])
        w.writerow([id_, *map(doc.get, keys)])
"""


@dataclass
class Peer:
    name: str
    command: list[str]  # writes the file to its standard output, or to its last argument (to_file)
    to_file: bool = False
    same_columns: bool = True  # its header must equal Dataport's


def psql_copy(url: str, select: str) -> list[str]:
    """The psql command that writes ``select`` as CSV with a header to its standard output."""
    return [
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        f"\\copy ({select}) TO STDOUT WITH CSV HEADER",
    ]


def warm_up(url: str, table: str) -> float:
    """Read the whole table once (its TOAST too), untimed, so no measured reader finds it cold."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run(psql_copy(url, f'SELECT * FROM "{table}"'), stdout=sink, check=True)
    return time.perf_counter() - started


def measure_peer(peer: Peer, out: Path, rows: int, header: list[str], dataport_sha256: str) -> dict:
    if peer.to_file:
        seconds, peak = run_peer([*peer.command, str(out)])
    else:
        with out.open("wb") as f:
            seconds, peak = run_peer(peer.command, stdout=f)
    peer_header, records = csv_records(out)
    return {
        "name": peer.name,
        "seconds": seconds,
        "peak_rss": peak,
        "bytes": out.stat().st_size,
        "records": records,
        "records_ok": records == rows,
        "header_ok": peer_header == header if peer.same_columns else None,
        "same_bytes_as_dataport": sha256_of(out) == dataport_sha256,
    }


# --- one case ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    table: str
    rows: int
    columns: int  # in the CSV
    peers: list[Peer]
    target: str


@dataclass
class Round(PeerComparison):
    """One round: one Dataport export (its file checked), then each peer once, in the same minute."""

    task_id: str = ""
    seconds: float = 0.0
    queued_seconds: float | None = None
    worker_seconds: float | None = None
    download_seconds: float = 0.0
    file_bytes: int = 0
    sha256: str = ""
    worker_peak_rss: int = 0
    rss_samples: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    peers: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {**asdict(self), "ratios_to_peers": {p["name"]: self.ratio_to(p) for p in self.peers}}


@dataclass
class Result(PeerComparison):
    case: str
    rows: int
    columns: int
    table: str = ""
    seconds: float = 0.0
    file_bytes: int = 0
    worker_idle_rss: int = 0
    worker_peak_rss: int = 0
    worker_hwm: int | None = None
    rss_samples: int = 0
    queued_seconds: float | None = None
    worker_seconds: float | None = None
    download_seconds: float = 0.0
    warm_up_seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    peers: list[dict] = field(default_factory=list)  # the first is the one ``ratio`` is to
    target: str = ""
    target_met: bool | None = None
    rounds: list[Round] = field(default_factory=list)  # the figures above are their medians

    def ratio_to(self, peer: dict) -> float | None:
        """The median over the rounds of Dataport seconds / this peer's seconds in the same round (with
        one round, that round's ratio)."""
        ratios = [rnd.ratio_to(p) for rnd in self.rounds for p in rnd.peers if p["name"] == peer["name"]]
        ratios = [r for r in ratios if r is not None]
        return median(ratios) if ratios else None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.file_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict:
        extra = {
            "rows_per_second": self.rows_per_second,
            "mb_per_second": self.mb_per_second,
            "ratio_to_peer": self.ratio,
            "ratios_to_peers": {p["name"]: self.ratio_to(p) for p in self.peers},
            "ok": self.ok,
        }
        if self.case == "wide":
            extra["reference_seconds"] = WIDE_REFERENCE_SECONDS
            extra["ratio_to_reference"] = self.seconds / WIDE_REFERENCE_SECONDS if self.seconds else None
        return {**asdict(self), **extra, "rounds": [rnd.as_json() for rnd in self.rounds]}


def datasets_toml(case: Case, url: str) -> str:
    return f"""
[datasets.{case.name}]
title = "bench: {case.table}"
source = "postgres"
url = "{url}"
table = "{case.table}"
key = ["id"]
max_export_rows = {case.rows}
columns = "discover"
"""


def measure(case: Case, args: argparse.Namespace, redis_url: str, scratch: Path) -> Result:
    """One stack for the case, then ``args.runs`` rounds on it; the result holds their medians."""
    result = Result(case.name, case.rows, case.columns, case.table, target=case.target)
    logs = OUT_DIR / "logs" / f"postgres_export-{case.name}"
    datasets = scratch / f"datasets-{case.name}.toml"
    datasets.write_text(datasets_toml(case, args.postgres_url))
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack = Stack(
        stack_env(
            scratch / f"data-{case.name}", scratch / f"files-{case.name}", redis_url, secret, port, datasets=datasets
        ),
        port,
        logs,
    )
    try:
        result.warm_up_seconds = warm_up(args.postgres_url, case.table)
        stack.start()
        assert stack.worker is not None
        time.sleep(0.5)  # let start-up settle before the idle reading
        result.worker_idle_rss = tree_rss(stack.worker.pid)
        for n in range(1, args.runs + 1):
            if args.runs > 1:
                console.print(f"[dim]  round {n} of {args.runs}[/dim]")
            result.rounds.append(measure_round(case, stack, secret, scratch))
            result.worker_hwm = high_water_mark(stack.worker.pid)
            if result.rounds[-1].error:
                break
    except Exception as e:  # reported in the table and the JSON; the run goes on with the next case
        result.error = f"{type(e).__name__}: {e}"
    finally:
        stack.stop()
    summarize(result)
    return result


def measure_round(case: Case, stack: Stack, secret: str, scratch: Path) -> Round:
    """One Dataport export, then each peer: alternating inside a round, both see the machine in the
    same state. Each round is a new user: the service hands a user's repeated request back finished."""
    rnd = Round()
    client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}"))
    exported = scratch / f"dataport-{case.name}.csv"
    try:
        header = export_once(case, stack, client, exported, rnd)
    except Exception as e:
        rnd.error = f"{type(e).__name__}: {e}"
        return rnd
    finally:
        exported.unlink(missing_ok=True)
    if rnd.error:
        return rnd

    for i, peer in enumerate(case.peers):
        os.sync()
        peer_out = scratch / f"peer-{case.name}-{i}.csv"
        try:
            measured = measure_peer(peer, peer_out, case.rows, header, rnd.sha256)
            rnd.peers.append(measured)
            rnd.checks[f"peer {i + 1} records"] = measured["records_ok"]
            if measured["header_ok"] is not None:
                rnd.checks[f"peer {i + 1} header"] = measured["header_ok"]
        except Exception as e:
            rnd.error = f"peer {peer.name}: {type(e).__name__}: {e}"
        finally:
            peer_out.unlink(missing_ok=True)
    return rnd


def export_once(case: Case, stack: Stack, client: DataportClient, exported: Path, rnd: Round) -> list[str]:
    """Request the export, follow it to SUCCEEDED, download and check its file: the file's header."""
    assert stack.worker is not None
    os.sync()  # no write-back of earlier files during the timed run
    followed = export_sampled(stack, client, {"dataset": case.name, "format": "CSV"})
    task, rnd.seconds = followed.task, followed.seconds
    rnd.task_id = task["id"]
    rnd.worker_peak_rss, rnd.rss_samples = followed.worker_peak_rss, followed.rss_samples
    if task["status"] != "SUCCEEDED":
        rnd.error = f"task {task['status']}: {task.get('error')}"
        return []
    rnd.file_bytes = task["fileSize"]
    rnd.queued_seconds, rnd.worker_seconds = followed.queued_seconds, followed.worker_seconds
    started = time.perf_counter()
    rnd.sha256 = download(task["downloadUrl"], exported)
    rnd.download_seconds = time.perf_counter() - started

    header, records = csv_records(exported)
    rnd.checks = {
        "sha256": rnd.sha256 == task["checksumSha256"],
        "size": exported.stat().st_size == task["fileSize"],
        "row_count": task["rowCount"] == case.rows,
        "records_in_file": records == case.rows,
        "header": len(header) == case.columns and header[0] == "id",
    }
    return header


def summarize(result: Result) -> None:
    """The case's figures from its rounds: medians of the seconds, the highest peak RSS, every check of
    every round (a check is ok only if it passed in all rounds), the first error."""
    rounds = result.rounds
    if not rounds:
        return
    result.seconds = median(r.seconds for r in rounds)
    result.queued_seconds = median_or_none([r.queued_seconds for r in rounds])
    result.worker_seconds = median_or_none([r.worker_seconds for r in rounds])
    result.download_seconds = median(r.download_seconds for r in rounds)
    result.file_bytes = rounds[0].file_bytes
    result.worker_peak_rss = max(r.worker_peak_rss for r in rounds)
    result.rss_samples = sum(r.rss_samples for r in rounds)
    for rnd in rounds:
        for name, ok in rnd.checks.items():
            result.checks[name] = result.checks.get(name, True) and ok
    if len(rounds) > 1:  # a repeated request handed back finished would be the same task
        result.checks["a new task each round"] = len({r.task_id for r in rounds}) == len(rounds)
    for i in range(max(len(r.peers) for r in rounds)):
        result.peers.append(summarize_peer([r.peers[i] for r in rounds if i < len(r.peers)]))
    failed = [(n, r.error) for n, r in enumerate(rounds, 1) if r.error]
    if failed and result.error is None:
        n, error = failed[0]
        result.error = f"round {n}: {error}" if len(rounds) > 1 else error


def summarize_peer(runs: list[dict]) -> dict:
    """One peer over the rounds: the median of its seconds, its highest peak RSS, its checks in all rounds."""
    last = runs[-1]
    return {
        **last,
        "seconds": median(p["seconds"] for p in runs),
        "peak_rss": max(p["peak_rss"] for p in runs),
        "records_ok": all(p["records_ok"] for p in runs),
        "header_ok": None if last["header_ok"] is None else all(p["header_ok"] for p in runs),
        "same_bytes_as_dataport": all(p["same_bytes_as_dataport"] for p in runs),
    }


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def judge(result: Result) -> None:
    if not result.ok:
        return
    if result.case == "copy":
        result.target_met = result.ratio is not None and result.ratio <= COPY_TARGET_RATIO
    else:
        result.target_met = result.seconds < WIDE_TARGET_SECONDS


# --- report --------------------------------------------------------------------------------------


def print_table(results: list[Result], runs: int) -> None:
    """One column per case, one row per figure: the table fits a terminal however many figures. With
    more than one round, the figures are medians and rows "each round" list the rounds'."""
    table = Table(
        title="PostgreSQL to CSV through api + 1 worker, local storage",
        caption=f"medians of {runs} rounds; peak RSS: the highest" if runs > 1 else None,
    )
    table.add_column("")
    for r in results:
        table.add_column(f"{r.case}: {r.rows:,} rows x {r.columns:,} cols", justify="right")

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(r) if r.seconds else "" for r in results))

    def each_round(label: str, figure) -> None:  # figure(round) -> float | None
        if runs > 1:
            table.add_row(label, *(" / ".join(two_places(figure(rnd)) for rnd in r.rounds) for r in results))

    row("seconds (request to SUCCEEDED)", lambda r: f"{r.seconds:.2f}")
    each_round("  seconds, each round", lambda rnd: rnd.seconds)
    row("  queued (createdAt to startedAt)", lambda r: f"{r.queued_seconds or 0:.2f}")
    row("  job (startedAt to finishedAt)", lambda r: f"{r.worker_seconds or 0:.2f}")
    row("download seconds (not in ratio)", lambda r: f"{r.download_seconds:.2f}")
    row("rows/s", lambda r: f"{r.rows_per_second:,.0f}")
    row("file MB, MB/s", lambda r: f"{r.file_bytes / 1e6:,.1f}, {r.mb_per_second:.1f}")
    row("worker peak RSS MiB (idle)", lambda r: f"{mib(r.worker_peak_rss)} ({mib(r.worker_idle_rss)})")
    for i in range(max(len(r.peers) for r in results) if results else 0):

        def peer(r: Result | Round, i: int = i) -> dict:  # of the case, or of one round
            return r.peers[i] if i < len(r.peers) else {}

        row(f"peer {i + 1}", lambda r, peer=peer: peer(r).get("name", ""))
        row(f"  peer {i + 1} seconds", lambda r, peer=peer: f"{peer(r)['seconds']:.2f}" if peer(r) else "")
        each_round(f"  peer {i + 1} seconds, each round", lambda rnd, peer=peer: peer(rnd).get("seconds"))
        row(
            f"  peer {i + 1} file MB (same bytes)",
            lambda r, peer=peer: (
                f"{peer(r)['bytes'] / 1e6:,.1f} ({'yes' if peer(r)['same_bytes_as_dataport'] else 'no'})"
                if peer(r)
                else ""
            ),
        )
        row(f"  peer {i + 1} peak RSS MiB", lambda r, peer=peer: mib(peer(r).get("peak_rss")))
        ratio_label = f"  ratio to peer {i + 1}" + (f" (median of {runs} rounds)" if runs > 1 else "")
        row(ratio_label, lambda r, peer=peer: f"{r.ratio_to(peer(r)):.2f}x" if peer(r) else "")
        each_round(f"  ratio to peer {i + 1}, each round", lambda rnd, peer=peer: rnd.ratio_to(peer(rnd)))
    row("vs reference 260 s", lambda r: f"{r.seconds / WIDE_REFERENCE_SECONDS:.3f}x" if r.case == "wide" else "")
    row(
        "target",
        lambda r: f"{r.target} " + {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: ""}[r.target_met],
    )
    table.add_row("checks", *(check_cell(r) for r in results))
    console.print(table)
    for r in results:
        if r.error:
            console.print(f"[red]{r.case}:[/red] {r.error} (logs in {OUT_DIR / 'logs'})")


def two_places(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def check_cell(r: Result) -> str:
    failed = [name for name, ok in r.checks.items() if not ok]
    if r.error:
        return "[red]FAILED: see below[/red]"
    return "[green]ok[/green]" if not failed else f"[red]FAILED: {', '.join(failed)}[/red]"


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["copy", "wide", "all"], default="all")
    parser.add_argument("--postgres-url", default=DEFAULT_URL)
    parser.add_argument("--copy-rows", type=int, default=1_000_000, help="rows of the copy case")
    parser.add_argument("--wide-rows", type=int, default=40_000, help="rows of the wide case")
    parser.add_argument("--rows", type=int, help="rows of the chosen case (with --case copy or wide)")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="rounds on the case's one stack, each a Dataport export then each peer; medians",
    )
    parser.add_argument(
        "--floor-only",
        action="store_true",
        help="wide: leave out the Python flattener peer (~2 minutes a round), for A/B rounds",
    )
    parser.add_argument("--strict", action="store_true", help="also exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "postgres_export.json")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.rows is not None:
        if args.case == "all":
            parser.error("--rows needs --case copy or --case wide")
        setattr(args, f"{args.case}_rows", args.rows)
    return args


def cases(args: argparse.Namespace) -> list[Case]:
    chosen = []
    if args.case in ("copy", "all"):
        table = ensure_copy_table(args.postgres_url, args.copy_rows)
        columns = ", ".join(f'"{n}"' for n, _ in COPY_COLUMNS)
        peers = [Peer("psql \\copy", psql_copy(args.postgres_url, f'SELECT {columns} FROM "{table}" ORDER BY id'))]
        chosen.append(Case("copy", table, args.copy_rows, len(COPY_COLUMNS), peers, f"ratio <= {COPY_TARGET_RATIO}x"))
    if args.case in ("wide", "all"):
        table = ensure_wide_table(args.postgres_url, args.wide_rows)
        peers = [
            Peer(
                "psql \\copy of the documents (floor)",
                psql_copy(args.postgres_url, f'SELECT id, data FROM "{table}" ORDER BY id'),
                same_columns=False,
            )
        ]
        if not args.floor_only:
            peers.append(
                Peer(
                    "python: psycopg + orjson + csv.writer",
                    [sys.executable, "-c", PYTHON_FLATTEN, args.postgres_url, table],
                    to_file=True,
                )
            )
        chosen.append(Case("wide", table, args.wide_rows, 1 + WIDE_KEYS, peers, f"< {WIDE_TARGET_SECONDS:.0f} s"))
    return chosen


def main() -> int:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    chosen = cases(args)  # tables first: building them is not part of any measurement
    scratch = Path(tempfile.mkdtemp(prefix="postgres_export-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    results: list[Result] = []
    try:
        redis.start()
        for case in chosen:
            console.print(f"[bold]{case.name}: {case.rows:,} rows x {case.columns:,} columns[/bold]…")
            results.append(measure(case, args, redis.url, scratch))
            judge(results[-1])
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(results, args.runs)
    for r in results:
        if r.worker_peak_rss:
            peers = "; ".join(f"{p['name']} {mib(p['peak_rss'])} MiB" for p in r.peers)
            console.print(
                f"{r.case}: worker peak RSS {r.worker_peak_rss / MiB:.1f} MiB (kernel high-water mark "
                f"{mib(r.worker_hwm)} MiB, {r.rss_samples:,} samples); peer peak RSS: {peers}"
            )
    write_json(
        args.out,
        "postgres_export",
        load_average_at_start=load,
        settings={
            "postgres_url": args.postgres_url,
            "storage": "local",
            "format": "CSV",
            "sample_seconds": SAMPLE_SECONDS,
            "case": args.case,
            "runs": args.runs,
        },
        results=[r.as_json() for r in results],
        targets={
            "copy_ratio": COPY_TARGET_RATIO,
            "wide_seconds": WIDE_TARGET_SECONDS,
            "wide_reference_seconds": WIDE_REFERENCE_SECONDS,
        },
    )
    console.print(f"numbers in {args.out}")
    if not all(r.ok for r in results):
        return 1
    if args.strict and not all(r.target_met for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
