"""PostgreSQL import benchmark: a 1,000,000-row CSV into a table through the whole path, against psql.

Command (from the repository root; PostgreSQL must be running, trust auth)::

    python bench/postgres_import.py                         # 100,000 then 1,000,000 rows, 1 run each
    python bench/postgres_import.py --rows 200000 --runs 3  # 20,000 then 200,000 rows, 3 runs each
    python bench/postgres_import.py --no-flat-check         # only N rows (no memory comparison)
    python bench/postgres_import.py --profile               # also py-spy the worker (slower; for diagnosis)
    python bench/postgres_import.py --set import_batch_rows=50000   # any DATAPORT_* setting, for experiments
    python bench/postgres_import.py --postgres-url postgresql://postgres@host:5432/db --strict

The case (the issue's): a CSV of N rows (``--rows``, default 1,000,000) x 10 columns, ~110 MB at
1M: ``id`` (the key, 1..N), ``site`` (text with unicode, commas and quotes), ``score`` (float, 1 in
7 empty = null), ``count`` (integer), ``active`` (``true``/``false``), ``sampled_on``
(``YYYY-MM-DD``), ``measured_at`` (ISO date-time with ``Z``, some with milliseconds), ``notes``
(text: nulls, commas, quotes, a line break, unicode), ``weight`` (float at full precision, 1 in 11
null), ``rank`` (integer up to 10^12). It is generated once under ``bench/out/data-import/``
(seeded, not timed) and reused while its row count and ``CSV_VERSION`` match; the first M rows of
the N file are the M file's rows. Every cell is valid for the dataset, so nothing fails.

Target tables: ``bench_import_dp`` (Dataport's) and ``bench_import_psql`` (the peer's), the same
schema (``id integer PRIMARY KEY``, text, double precision, integer, boolean, date, timestamptz,
text, double precision, bigint), dropped and created afresh at the start, and truncated (then a
``CHECKPOINT``) before every timed import. The datasets file declares dataset ``bench_import``:
source postgres, table ``bench_import_dp``, ``key = ["id"]``, ``importable = true`` and the ten
columns with their types (integer, string, float, boolean, date, datetime).

For each row count (N/10, then N, unless ``--no-flat-check``): ``dataport api`` + ``dataport
worker`` start afresh on an embedded Redis with local storage; the file is read once (page cache).
Each run then times, from the client:

1. ``requestImport`` (CSV, INSERT, with ``fileSize``);
2. the upload: ``PUT`` to the signed URL with the target's headers, the file streamed by httpx
   from the open file (64 KiB reads, ``Content-Length``), through the api to local storage;
3. ``startImport``; then ``importTask`` is polled every 100 ms until a final status.

"seconds" is 1 to 3 end to end (request to the poll that saw SUCCEEDED). The split comes from the
task: ``queued`` is its PENDING event (startImport) to ``startedAt``, ``job`` is ``startedAt`` to
``finishedAt`` (reading, checking and COPYing every row, and the COMMIT). Meanwhile threads sample
the RSS (with children) of the worker and of the api (the upload passes through it) every 10 ms.

The peer, in the same run, right after: ``psql -c "\\copy bench_import_psql (cols) FROM '<file>'
WITH (FORMAT csv, HEADER true)"``, timed and sampled the same way (``run_peer``). PostgreSQL parses
the text itself: this is the least any client can do to load the file.

Checks (any failed check exits 1): status SUCCEEDED, ``rowsImported`` = N, ``rowsFailed`` = 0,
``progress.processedRows`` = N, ``progress.bytes`` = file size; both tables hold N rows with ids
summing to N(N+1)/2, and their content is the same: an md5 over every row's text
(``t::text``, in id order, 10,000 rows at a time, then an md5 of those) matches between Dataport's
table and psql's, so both loaded the same values.

How to read the result:

* ``seconds`` and its split (``request``, ``upload``, ``start``, ``queued``, ``job``; the rest is
  the polling interval and timestamps kept to the millisecond); with ``--runs`` > 1 the table shows
  the median and the JSON every run.
* ``ratio`` = Dataport seconds / psql seconds (medians). Target: at most 2.0 at N rows
  (``TARGET_RATIO``), PASS or MISS. At N/10 the ratio is printed for information only: there the
  fixed costs (start-up of the job, the queue, polling) weigh more.
* Memory: the worker's peak RSS at N over its peak at N/10 must stay within 1.2x (``RSS_LIMIT``):
  "flat". The api's peak (the upload streams through it) is listed and judged the same way.
* ``--profile`` runs ``py-spy record --gil`` on the worker during each Dataport import (raw collapsed
  stacks in ``bench/out/postgres_import-profile-<rows>-<run>.txt``) and prints where the worker's
  Python time went: "self" is the function running, "total" a project function anywhere on the
  stack, as shares of the samples; samples / 100 is about the seconds the worker held the GIL. The
  sampling slows the worker down a little, so those runs' seconds are not comparable.

The script exits 1 when a check fails or an import fails; a missed target (ratio or memory) is
printed as MISS and, only with ``--strict``, also exits 1. Numbers go to ``--out`` (JSON); the
api's and worker's logs to ``bench/out/logs/postgres_import/<rows>/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import psycopg
from _common import (
    OUT_DIR,
    REPO_DIR,
    SAMPLE_SECONDS,
    MiB,
    PeakRss,
    PeerComparison,
    Stack,
    console,
    high_water_mark,
    mib,
    note_load,
    run_peer,
    seconds_between,
    stack_env,
    tree_rss,
    warm,
    write_json,
)
from rich.table import Table

from api.auth import issue_token
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATIO = 2.0  # Dataport seconds / psql \copy seconds, at N rows
RSS_LIMIT = 1.2  # peak RSS at N over peak RSS at N/10
POLL_SECONDS = 0.1
PROFILE_RATE = 100  # py-spy samples a second
CSV_VERSION = "1"  # in the cached file's name: change it when the generator changes
SEED = 20261121
DATASET = "bench_import"
DP_TABLE = "bench_import_dp"
PEER_TABLE = "bench_import_psql"
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
# The code that ran: the import path is new (some of it untracked), so its files are hashed into the JSON.
IMPORT_CODE = (
    "workers/imports.py",
    "formats/readers.py",
    "formats/records.py",
    "formats/utf8.py",
    "formats/csv_reader.py",
    "formats/converters.py",
    "formats/column_checker.py",
    "formats/row_converter.py",
    "formats/header_check.py",
    "sources/sinks.py",
    "sources/sink_base.py",
    "sources/postgres_sink.py",
    "api/uploads.py",
    "storage/local.py",
    "tasks/imports.py",
)

# name, Dataport type, PostgreSQL type
COLUMNS = (
    ("id", "integer", "integer PRIMARY KEY"),
    ("site", "string", "text"),
    ("score", "float", "double precision"),
    ("count", "integer", "integer"),
    ("active", "boolean", "boolean"),
    ("sampled_on", "date", "date"),
    ("measured_at", "datetime", "timestamptz"),
    ("notes", "string", "text"),
    ("weight", "float", "double precision"),
    ("rank", "integer", "bigint"),
)
NAMES = [name for name, _, _ in COLUMNS]

SITES = (
    "North Ridge",
    "Ørsted Fell",
    'Mount "Grey"',
    "Lake, East",
    "東京 Basin",
    "Zoë's Creek",
    "Site 7",
    'Río Tinto, "Upper"',
)

IMPORT_FIELDS = """id status rowsImported rowsFailed createdAt startedAt finishedAt attempts
  progress { processedRows bytes percent } error { code message } events { at status message }"""
REQUEST_IMPORT = """mutation($i: ImportInput!) { requestImport(input: $i) {
  task { id status upload { url method headers fields expiresAt } } userErrors { field message code } } }"""
START_IMPORT = "mutation($id: ID!) { startImport(id: $id) { task { id status } userErrors { field message code } } }"
IMPORT_STATUS = "query($id: ID!) { importTask(id: $id) { id status } }"
IMPORT_TASK = f"query($id: ID!) {{ importTask(id: $id) {{ {IMPORT_FIELDS} }} }}"

# --- the file (generated once, not timed) ------------------------------------------------------


def csv_path(rows: int) -> Path:
    return OUT_DIR / "data-import" / f"bench_import-{rows}-v{CSV_VERSION}.csv"


def notes_for(i: int) -> str:
    if i % 3 == 0:
        return ""  # null
    if i % 101 == 0:
        return 'split "B", re-assay'
    if i % 89 == 0:
        return "two lines,\nthe second"
    if i % 53 == 0:
        return "Zoë ✓ 東京 🙂"
    if i % 47 == 0:
        return "-5 dilution"
    return f"note {i}"


def generate_rows(rows: int):
    """The rows of the file, seeded: the first M rows are the same whatever ``rows`` is."""
    rng = random.Random(SEED)
    first_day = dt.date(2000, 1, 1).toordinal()
    epoch = dt.datetime(2015, 1, 1, tzinfo=dt.UTC)
    for i in range(1, rows + 1):
        moment = epoch + dt.timedelta(seconds=i * 97)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
        if i % 4 == 0:
            stamp += f".{i % 1000:03d}"
        yield (
            i,
            SITES[rng.randrange(len(SITES))],
            "" if i % 7 == 0 else repr(round(rng.random() * 1000, 3)),
            rng.randrange(-50_000, 50_000),
            "true" if rng.random() < 0.5 else "false",
            dt.date.fromordinal(first_day + i % 9000).isoformat(),
            stamp + "Z",
            notes_for(i),
            "" if i % 11 == 0 else repr(rng.uniform(0, 5000)),
            rng.randrange(0, 10**12),
        )


def ensure_csv(rows: int, quiet: bool = False) -> Path:
    path = csv_path(rows)
    if path.exists():
        if not quiet:
            console.print(f"[dim]reusing {path.relative_to(REPO_DIR)} ({path.stat().st_size / 1e6:,.1f} MB)[/dim]")
        return path
    console.print(f"[dim]generating {path.relative_to(REPO_DIR)} ({rows:,} rows; once, not timed)…[/dim]")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(NAMES)
        writer.writerows(generate_rows(rows))
    partial.replace(path)
    return path


# --- the tables ---------------------------------------------------------------------------------


def create_tables(url: str) -> None:
    columns = ", ".join(f'"{name}" {sql}' for name, _, sql in COLUMNS)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in (DP_TABLE, PEER_TABLE):
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            conn.execute(f'CREATE TABLE "{table}" ({columns})')


def empty_tables(url: str) -> None:
    """Both tables empty, and nothing dirty left for the next import to pay for."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'TRUNCATE "{DP_TABLE}", "{PEER_TABLE}"')
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass
    os.sync()


# Per 10,000 ids: count, sum and an md5 of the rows' text in id order; then the md5 of those md5s.
# PostgreSQL holds one group's text at a time (~1.5 MB), not the table's.
CHECKSUM_SQL = """
WITH g AS (
  SELECT t.id / 10000 AS g, count(*) AS n, sum(t.id) AS ids,
         md5(string_agg(t::text, E'\\n' ORDER BY t.id)) AS h
  FROM "{table}" t GROUP BY 1
)
SELECT coalesce(sum(n), 0)::bigint, coalesce(sum(ids), 0)::bigint, md5(coalesce(string_agg(h, '' ORDER BY g), ''))
FROM g
"""


def table_summary(url: str, table: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET extra_float_digits = 1")
        rows, ids, digest = conn.execute(CHECKSUM_SQL.format(table=table)).fetchone()
    return {"rows": rows, "sum_of_ids": ids, "md5": digest}


# --- Dataport ----------------------------------------------------------------------------------


def datasets_toml(url: str, rows: int) -> str:
    columns = "\n".join(
        f'{name} = {{ type = "{kind}"{", required = true" if name == "id" else ""} }}' for name, kind, _ in COLUMNS
    )
    return f"""
[datasets.{DATASET}]
title = "bench: PostgreSQL import"
source = "postgres"
url = "{url}"
table = "{DP_TABLE}"
key = ["id"]
importable = true
max_export_rows = {max(rows, 1)}

[datasets.{DATASET}.columns]
{columns}
"""


def gql(http: httpx.Client, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/graphql", json={"query": query, "variables": variables})
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise RuntimeError("; ".join(e["message"] for e in body["errors"]))
    return body["data"]


def user_errors(payload: dict[str, Any]) -> None:
    if payload["userErrors"]:
        raise RuntimeError("; ".join(f"{e['message']} [{e['code']}]" for e in payload["userErrors"]))


@dataclass
class Imported:
    """One import through Dataport, timed from the client."""

    task: dict
    seconds: float
    request_seconds: float
    upload_seconds: float
    start_seconds: float


def import_file(http: httpx.Client, path: Path, timeout: float) -> Imported:
    """requestImport, upload (streamed), startImport, then importTask every 100 ms until final."""
    size = path.stat().st_size
    started = time.perf_counter()
    payload = gql(
        http,
        REQUEST_IMPORT,
        {"i": {"dataset": DATASET, "format": "CSV", "mode": "INSERT", "fileName": path.name, "fileSize": size}},
    )["requestImport"]
    user_errors(payload)
    task = payload["task"]
    target = task["upload"]
    if target is None or target["method"] != "PUT":
        raise RuntimeError(f"expected a PUT upload target (local storage), got {target}")
    requested = time.perf_counter()
    with path.open("rb") as f:  # httpx reads it 64 KiB at a time and sends Content-Length
        response = http.request("PUT", target["url"], content=f, headers=target["headers"])
    if response.status_code not in (200, 204):
        raise RuntimeError(f"upload refused: HTTP {response.status_code} {response.text[:300]}")
    uploaded = time.perf_counter()
    user_errors(gql(http, START_IMPORT, {"id": task["id"]})["startImport"])
    queued = time.perf_counter()
    deadline = queued + timeout
    while True:
        status = gql(http, IMPORT_STATUS, {"id": task["id"]})["importTask"]["status"]
        if status in FINAL:
            seconds = time.perf_counter() - started
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"import {task['id']} still {status} after {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    task = gql(http, IMPORT_TASK, {"id": task["id"]})["importTask"]
    return Imported(task, seconds, requested - started, uploaded - requested, queued - uploaded)


def event_at(task: dict, status: str) -> str | None:
    return next((e["at"] for e in task.get("events") or [] if e["status"] == status), None)


# --- profiling (optional) ------------------------------------------------------------------------


def start_profile(pid: int, out: Path) -> subprocess.Popen | None:
    if shutil.which("py-spy") is None:
        console.print("[yellow]--profile: py-spy is not on PATH; not profiling[/yellow]")
        return None
    # --gil: only the thread holding the GIL is sampled, so the samples are the worker's Python CPU time.
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(PROFILE_RATE),
            "--gil",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profile(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_LINE_NO = re.compile(r":\d+\)")


def profile_summary(path: Path, top: int = 15) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """From py-spy's raw output: the number of samples, the functions with the most samples on top of
    the stack (self), and the project's functions with the most samples anywhere on the stack (total);
    as fractions of the samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_LINE_NO.sub(")", frame) for frame in stack.split(";")[1:]]  # the first is the thread
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            if any(f"({part}/" in frame for part in ("workers", "formats", "sources", "storage", "tasks")):
                total[frame] += n
    if not samples:
        return 0, [], []
    return (
        samples,
        [(f, n / samples) for f, n in own.most_common(top)],
        [(f, n / samples) for f, n in total.most_common(top)],
    )


# --- one run, one row count ------------------------------------------------------------------------


@dataclass
class Run:
    rows: int
    run: int
    seconds: float = 0.0
    request_seconds: float = 0.0
    upload_seconds: float = 0.0
    start_seconds: float = 0.0
    queued_seconds: float | None = None  # PENDING event (startImport) → startedAt
    created_to_started_seconds: float | None = None  # createdAt → startedAt (includes the upload)
    job_seconds: float | None = None  # startedAt → finishedAt
    worker_peak_rss: int = 0
    api_peak_rss: int = 0
    rss_samples: int = 0
    status: str = ""
    rows_imported: int | None = None
    rows_failed: int | None = None
    task_error: dict | None = None
    peer_seconds: float = 0.0
    peer_peak_rss: int = 0
    dataport_table: dict = field(default_factory=dict)
    peer_table: dict = field(default_factory=dict)
    profile: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.peer_seconds if self.seconds and self.peer_seconds else None


@dataclass
class Size(PeerComparison):
    """The runs at one row count; ``seconds`` and the peer's are medians over the runs."""

    rows: int
    file_bytes: int = 0
    worker_idle_rss: int = 0
    api_idle_rss: int = 0
    worker_hwm: int | None = None
    api_hwm: int | None = None
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def _median(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.runs if not r.error and getattr(r, name) is not None]
        return median(values) if values else None

    @property
    def seconds(self) -> float:
        return self._median("seconds") or 0.0

    @property
    def peers(self) -> list[dict]:
        peer = self._median("peer_seconds")
        return [{"name": "psql \\copy", "seconds": peer}] if peer else []

    @property
    def checks(self) -> dict[str, bool]:
        return {f"run {r.run}: {name}": ok for r in self.runs for name, ok in r.checks.items()}

    @property
    def failed(self) -> str | None:
        return self.error or next((f"run {r.run}: {r.error}" for r in self.runs if r.error), None)

    @property
    def ok(self) -> bool:
        return self.failed is None and bool(self.checks) and all(self.checks.values())

    @property
    def worker_peak_rss(self) -> int:
        return max((r.worker_peak_rss for r in self.runs), default=0)

    @property
    def api_peak_rss(self) -> int:
        return max((r.api_peak_rss for r in self.runs), default=0)

    def as_json(self) -> dict:
        medians = {
            name: self._median(name)
            for name in (
                "seconds",
                "request_seconds",
                "upload_seconds",
                "start_seconds",
                "queued_seconds",
                "job_seconds",
                "peer_seconds",
            )
        }
        return {
            **asdict(self),
            "medians": medians,
            "ratio_to_psql": self.ratio,
            "ratios_per_run": [r.ratio for r in self.runs],
            "worker_peak_rss": self.worker_peak_rss,
            "api_peak_rss": self.api_peak_rss,
            "rows_per_second": self.rows / self.seconds if self.seconds else 0,
            "ok": self.ok,
        }


def measure_run(run: Run, stack: Stack, http: httpx.Client, path: Path, args: argparse.Namespace) -> None:
    assert stack.worker is not None and stack.api is not None
    rows, url = run.rows, args.postgres_url
    empty_tables(url)
    warm(path)
    profiler = None
    if args.profile:
        run.profile = str(OUT_DIR / f"postgres_import-profile-{rows}-{run.run}.txt")
        profiler = start_profile(stack.worker.pid, Path(run.profile))
        time.sleep(1.0)  # py-spy attaches
    worker, api = PeakRss(stack.worker.pid), PeakRss(stack.api.pid)
    worker.start()
    api.start()
    try:
        imported = import_file(http, path, timeout=args.timeout)
    finally:
        run.worker_peak_rss, run.api_peak_rss = worker.stop(), api.stop()
        run.rss_samples = worker.samples
        stop_profile(profiler)
    task = imported.task
    run.seconds, run.request_seconds = imported.seconds, imported.request_seconds
    run.upload_seconds, run.start_seconds = imported.upload_seconds, imported.start_seconds
    run.status, run.rows_imported, run.rows_failed = task["status"], task["rowsImported"], task["rowsFailed"]
    run.task_error = task.get("error")
    run.queued_seconds = seconds_between(event_at(task, "PENDING"), task.get("startedAt"))
    run.created_to_started_seconds = seconds_between(task.get("createdAt"), task.get("startedAt"))
    run.job_seconds = seconds_between(task.get("startedAt"), task.get("finishedAt"))

    os.sync()
    columns = ", ".join(f'"{n}"' for n in NAMES)
    run.peer_seconds, run.peer_peak_rss = run_peer(
        [
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            f"\\copy \"{PEER_TABLE}\" ({columns}) FROM '{path}' WITH (FORMAT csv, HEADER true)",
        ]
    )

    run.dataport_table = table_summary(url, DP_TABLE)
    run.peer_table = table_summary(url, PEER_TABLE)
    ids = rows * (rows + 1) // 2
    progress = task.get("progress") or {}
    run.checks = {
        "status SUCCEEDED": task["status"] == "SUCCEEDED",
        "rowsImported = N": task["rowsImported"] == rows,
        "rowsFailed = 0": task["rowsFailed"] == 0,
        "processedRows = N": progress.get("processedRows") == rows,
        "bytes = file size": progress.get("bytes") == path.stat().st_size,
        "table count = N": run.dataport_table["rows"] == rows,
        "table ids": run.dataport_table["sum_of_ids"] == ids,
        "psql table count = N": run.peer_table["rows"] == rows,
        "same content as psql's": run.dataport_table["md5"] == run.peer_table["md5"],
    }


def measure_size(rows: int, args: argparse.Namespace, redis_url: str, scratch: Path) -> Size:
    size = Size(rows)
    path = ensure_csv(rows, quiet=True)
    size.file_bytes = path.stat().st_size
    logs = OUT_DIR / "logs" / "postgres_import" / str(rows)
    datasets = scratch / f"datasets-{rows}.toml"
    datasets.write_text(datasets_toml(args.postgres_url, rows))
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack = Stack(
        stack_env(
            scratch / f"data-{rows}",
            scratch / f"files-{rows}",
            redis_url,
            secret,
            port,
            datasets=datasets,
            **args.settings,
        ),
        port,
        logs,
    )
    try:
        stack.start()
        assert stack.worker is not None and stack.api is not None
        time.sleep(0.5)  # let start-up settle before the idle readings
        size.worker_idle_rss, size.api_idle_rss = tree_rss(stack.worker.pid), tree_rss(stack.api.pid)
        token = issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}")
        with httpx.Client(
            base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(600, connect=10)
        ) as http:
            for n in range(1, args.runs + 1):
                console.print(f"[bold]{rows:,} rows, run {n}/{args.runs}[/bold]…")
                run = Run(rows, n)
                size.runs.append(run)
                try:
                    measure_run(run, stack, http, path, args)
                except Exception as e:  # reported in the table and the JSON; the next run goes on
                    run.error = f"{type(e).__name__}: {e}"
        size.worker_hwm, size.api_hwm = high_water_mark(stack.worker.pid), high_water_mark(stack.api.pid)
    except Exception as e:
        size.error = f"{type(e).__name__}: {e}"
    finally:
        stack.stop()
    return size


# --- report ----------------------------------------------------------------------------------------


def rss_verdicts(sizes: list[Size]) -> dict[str, float | None]:
    """Peak RSS at the largest N over the smallest, for the worker and the api."""
    measured = [s for s in sizes if s.worker_peak_rss and s.api_peak_rss]
    if len(measured) < 2:
        return {"worker": None, "api": None}
    small, large = min(measured, key=lambda s: s.rows), max(measured, key=lambda s: s.rows)
    return {"worker": large.worker_peak_rss / small.worker_peak_rss, "api": large.api_peak_rss / small.api_peak_rss}


def verdict(ok: bool | None) -> str:
    return {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: ""}[ok]


def print_table(sizes: list[Size], args: argparse.Namespace) -> None:
    many = args.runs > 1
    table = Table(
        title=f"CSV into PostgreSQL through api + 1 worker, local storage "
        f"({'median of ' + str(args.runs) + ' runs' if many else '1 run'})"
    )
    table.add_column("")
    for s in sizes:
        table.add_column(f"{s.rows:,} rows ({s.file_bytes / 1e6:,.1f} MB)", justify="right")

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(s) if s.seconds else "" for s in sizes))

    def seconds(name: str):
        def cell(s: Size) -> str:
            value = s._median(name)
            if value is None:
                return ""
            spread = [getattr(r, name) for r in s.runs if not r.error and getattr(r, name) is not None]
            return f"{value:.2f}" + (f" ({min(spread):.2f}-{max(spread):.2f})" if many else "")

        return cell

    row("Dataport seconds (request to SUCCEEDED)", seconds("seconds"))
    row("  requestImport", seconds("request_seconds"))
    row("  upload (PUT, streamed)", seconds("upload_seconds"))
    row("  startImport", seconds("start_seconds"))
    row("  queued (PENDING to startedAt)", seconds("queued_seconds"))
    row("  job (startedAt to finishedAt)", seconds("job_seconds"))
    row("rows/s, MB/s", lambda s: f"{s.rows / s.seconds:,.0f}, {s.file_bytes / 1e6 / s.seconds:.1f}")
    row("psql \\copy seconds", seconds("peer_seconds"))
    row("ratio Dataport / psql", lambda s: f"{s.ratio:.2f}x" if s.ratio else "")
    row("worker peak RSS MiB (idle)", lambda s: f"{mib(s.worker_peak_rss)} ({mib(s.worker_idle_rss)})")
    row("api peak RSS MiB (idle)", lambda s: f"{mib(s.api_peak_rss)} ({mib(s.api_idle_rss)})")
    row("psql peak RSS MiB", lambda s: mib(max((r.peer_peak_rss for r in s.runs), default=0)))
    largest = max((s.rows for s in sizes), default=0)
    row(
        f"target ratio <= {TARGET_RATIO}",
        lambda s: verdict(s.ratio <= TARGET_RATIO if s.ratio else None) if s.rows == largest else "(information)",
    )
    table.add_row("checks", *(check_cell(s) for s in sizes))
    console.print(table)
    for s in sizes:
        if s.failed:
            console.print(f"[red]{s.rows:,} rows:[/red] {s.failed} (logs in {OUT_DIR / 'logs' / 'postgres_import'})")
        for r in s.runs:
            if r.task_error:
                console.print(f"[red]{s.rows:,} rows, run {r.run}:[/red] the task ended {r.status}: {r.task_error}")


def check_cell(s: Size) -> str:
    if s.failed:
        return "[red]FAILED: see below[/red]"
    failed = [name for name, ok in s.checks.items() if not ok]
    return "[green]ok[/green]" if not failed else f"[red]FAILED: {', '.join(failed)}[/red]"


def print_memory(sizes: list[Size], ratios: dict[str, float | None]) -> None:
    if ratios["worker"] is None:
        console.print("peak RSS: needs two row counts (see --flat-check)")
        return
    small, large = min(sizes, key=lambda s: s.rows), max(sizes, key=lambda s: s.rows)
    for who in ("worker", "api"):
        peak_large, peak_small = getattr(large, f"{who}_peak_rss"), getattr(small, f"{who}_peak_rss")
        console.print(
            f"{who} peak RSS {large.rows:,} / {small.rows:,} rows: {peak_large / MiB:.1f} / "
            f"{peak_small / MiB:.1f} MiB = {ratios[who]:.3f}x (limit {RSS_LIMIT}x, flat) "
            f"{verdict(ratios[who] <= RSS_LIMIT)}"
        )
    console.print(
        f"[dim]kernel high-water marks at {large.rows:,}: worker {mib(large.worker_hwm)} MiB, "
        f"api {mib(large.api_hwm)} MiB[/dim]"
    )


def print_profiles(sizes: list[Size]) -> None:
    for s in sizes:
        for r in s.runs:
            if not r.profile or not Path(r.profile).exists():
                continue
            samples, own, total = profile_summary(Path(r.profile))
            held = samples / PROFILE_RATE
            table = Table(
                title=f"worker holding the GIL (py-spy --gil), {s.rows:,} rows, run {r.run}: {held:.1f} s "
                f"of samples over a {r.seconds:.1f} s import ({r.profile})"
            )
            table.add_column("self: function (file)")
            table.add_column("share", justify="right")
            table.add_column("total: project function (file)")
            table.add_column("share", justify="right")
            for i in range(max(len(own), len(total))):
                a = own[i] if i < len(own) else ("", 0.0)
                b = total[i] if i < len(total) else ("", 0.0)
                table.add_row(a[0], f"{a[1]:.0%}" if a[0] else "", b[0], f"{b[1]:.0%}" if b[0] else "")
            console.print(table)


def import_code() -> dict[str, str | None]:
    """SHA-256 of the import path's files as they ran (some are not committed yet)."""
    hashes = {}
    for name in IMPORT_CODE:
        path = REPO_DIR / name
        hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return hashes


# --- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="N, the rows of the file (default 1,000,000)")
    parser.add_argument(
        "--flat-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also import N/10 rows first and compare peak RSS (default: on)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per row count (default 1)")
    parser.add_argument("--postgres-url", default=DEFAULT_URL)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one import")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker during each import")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Dataport setting for the api and worker, e.g. import_batch_rows=20000 "
        "(DATAPORT_IMPORT_BATCH_ROWS); repeatable",
    )
    parser.add_argument("--strict", action="store_true", help="also exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "postgres_import.json")
    args = parser.parse_args()
    if args.rows < 10 or args.runs < 1:
        parser.error("--rows must be at least 10 and --runs at least 1")
    if any("=" not in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    args.settings = dict(item.split("=", 1) for item in args.set)
    return args


def main() -> int:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    counts = [args.rows // 10, args.rows] if args.flat_check else [args.rows]
    for rows in counts:  # the files first: generating them is not part of any measurement
        ensure_csv(rows)
    create_tables(args.postgres_url)
    scratch = Path(tempfile.mkdtemp(prefix="postgres_import-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    sizes: list[Size] = []
    try:
        redis.start()
        for rows in counts:
            sizes.append(measure_size(rows, args, redis.url, scratch))
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(sizes, args)
    ratios = rss_verdicts(sizes)
    print_memory(sizes, ratios)
    print_profiles(sizes)
    largest = max(sizes, key=lambda s: s.rows)
    ratio_met = largest.ratio is not None and largest.ratio <= TARGET_RATIO
    flat = None if ratios["worker"] is None else ratios["worker"] <= RSS_LIMIT and ratios["api"] <= RSS_LIMIT
    write_json(
        args.out,
        "postgres_import",
        load_average_at_start=load,
        settings={
            "postgres_url": args.postgres_url,
            "storage": "local",
            "format": "CSV",
            "mode": "INSERT",
            "runs": args.runs,
            "poll_seconds": POLL_SECONDS,
            "sample_seconds": SAMPLE_SECONDS,
            "csv_version": CSV_VERSION,
            "profile": args.profile,
            "dataport_settings": args.settings,
        },
        import_code_sha256=import_code(),
        results=[s.as_json() for s in sizes],
        targets={"ratio": TARGET_RATIO, "rss_limit": RSS_LIMIT},
        verdict={"ratio": largest.ratio, "ratio_met": ratio_met, "peak_rss_ratios": ratios, "flat": flat},
    )
    console.print(f"numbers in {args.out}")
    if not all(s.ok for s in sizes):
        return 1
    if args.strict and not (ratio_met and flat is not False):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
