"""Fault benchmark (issue 16): N rounds of each production fault against real processes, and whether
every round ended right, with the same bytes or rows, nothing left behind and a quick recovery.

Command (from the repository root; PostgreSQL on 127.0.0.1:5432, trust auth)::

    python bench/faults.py                         # 10 rounds of each fault but S3
    python bench/faults.py --rounds 3 --s3         # 3 rounds each, SeaweedFS too (~10-25 s to start it)
    python bench/faults.py --only redis --rounds 20
    python bench/faults.py --postgres-url postgresql://postgres@host:5432/postgres --strict

What runs: an embedded Redis with its append-only file (so it can be stopped and started on the same
port), one ``dataport api`` on local storage and ``dataport worker`` processes started and stopped
by each round (tests/fixtures/stack.py's ``Stack``), with the settings in ``SETTINGS`` (a 2 s lease,
retries from 0.5 s doubling to 4 s over a 60 s window, as the fault tests use). The datasets: the
SQLite demo rows (``samples``, 100,000 rows, every column to CSV: ~51 MB, a few seconds), and in a
fresh PostgreSQL database made for the run and dropped at its end, the tests' 40,000-row
``_big`` table (``big_pg``) and an empty copy of their special table to import into (``imp``).
With ``--s3`` a SeaweedFS of its own (``tests.fixtures.s3.start_server``) and a second api + worker
on it. Each fault is injected as its test in ``tests/faults/`` does, with the tests'
helpers where they fit (``freeze_after_commit`` says why it is the bench's own):

- ``kill``: SIGKILL the worker once the export has read rows (plus 0-1 s), then start another;
- ``redis``: two workers; Redis stopped (SIGTERM, AOF written) for 2 s mid-export and started on the
  same port; the workers are not restarted and must still run at the end;
- ``pg``: ``pg_terminate_backend`` of every backend answering the export's FETCH or COPY of
  ``big_pg``, the format turning JSON, NDJSON, CSV round by round;
- ``sigterm``: three workers in turn, each SIGTERMed (grace 0.2 s) once its run has read rows, then
  one (grace 60 s) that finishes it: SUCCEEDED with ``attempts`` 1;
- ``import``: a 20,000-row CSV import (INSERT) into ``imp``; the worker is frozen (SIGSTOP) the
  moment its receipt appears in ``dataport_import_receipts``, SIGKILLed, and another started; a
  round where the task had already succeeded missed the window and is tried again (``retried``);
- ``s3`` (``--s3``): SeaweedFS SIGKILLed once the export is writing, restarted after 2 s.

A round whose export ended before the fault could be injected is also tried again and counted under
``retried`` (at most ``MAX_TRIES_PER_ROUND`` tries a round).

How to read the table, one row a fault:

- ``right``: rounds that reached the right final state (SUCCEEDED with every row; ``sigterm`` also
  ``attempts`` 1; ``import`` ``rowsImported`` 20,000 and ``rowsFailed`` 0; ``redis`` also both
  workers still running);
- ``exact``: exports, the downloaded file's SHA-256 equals that of an undisturbed run of the same
  request made at the start (and the task's ``checksumSha256``); imports, the table holds exactly
  the file's rows (the same count and md5 over ``t::text`` in id order as a ``COPY`` of the file
  into a reference table);
- ``leftovers``: after the round, ``.partial-`` files under the files directory, open multipart
  uploads in the bucket, and stray processes (anything but the api still running with the stack's
  queue name in its environment, once the round's workers are stopped: orphaned helpers, a worker
  that would not exit);
- ``recovery``: from the moment the fault is cleared (a new worker started; Redis back; the backend
  terminated; the last worker started; SeaweedFS answering again) to the task's ``finishedAt``,
  median (max). It includes the run that follows, so the target for a round is the lease plus the
  longest retry delay plus the undisturbed run's own job time (``startedAt`` to ``finishedAt``; 0
  for the import, whose re-run only finds its receipt): the ``bound`` column.

Target: every round right and exact, zero leftovers, every recovery within its bound; a miss prints
MISS and exits 1 only with ``--strict``. A round that did not end right is printed below the table
with its task. Numbers go to ``--out`` (JSON, every round); logs to ``bench/out/logs/faults/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from _common import OUT_DIR, REPO_DIR, console, download, median_of, note_load, stack_env, write_json
from rich.table import Table

from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from sources.demo import DEMO_COLUMNS, ensure_demo_database
from sources.receipts import TABLE as RECEIPTS

sys.path.insert(0, str(REPO_DIR))  # the test fixtures and the fault tests' injections, from tests/
from tests.faults.test_graceful_shutdown import start_worker, wait_reading  # noqa: E402
from tests.faults.test_postgres_connection_lost import _terminate_a_read as terminate_a_read  # noqa: E402
from tests.faults.test_redis_outage import _outage  # noqa: E402
from tests.faults.test_storage_outage import _open_uploads, _writing  # noqa: E402
from tests.fixtures.postgres import _with_database  # noqa: E402
from tests.fixtures.s3 import S3Server, start_server  # noqa: E402
from tests.fixtures.stack import BIG_ROWS, IMPORT_COLUMNS_TOML, Stack, _columns_toml, _load_postgres  # noqa: E402
from tests.test_imports import big_csv  # noqa: E402

DEMO_ROWS = 100_000
IMPORT_ROWS = 20_000
PG_TABLE = "faults"  # _load_postgres makes faults, faults_docs and faults_big (BIG_ROWS rows)
WIDE = dict(dataset="samples", format="CSV")  # every column of the demo rows
PG_FORMATS = ("JSON", "NDJSON", "CSV")
SETTINGS = dict(  # passed to the api and every worker
    worker_lease_seconds="2",
    retry_delay_seconds="0.5",
    retry_max_delay_seconds="4",
    retry_window_seconds="60",
    worker_shutdown_grace_seconds="1",
    export_reuse_seconds="0",
    max_export_rows="150000",
    max_active_tasks_per_user="1000000",
    mutation_rate_per_user="1000000",
    mutation_rate_per_ip="1000000",
    log_format="text",
)
LEASE = float(SETTINGS["worker_lease_seconds"])
LONGEST_DELAY = float(SETTINGS["retry_max_delay_seconds"])
MAX_TRIES_PER_ROUND = 8
ROUND_TIMEOUT = 180.0
FAULTS = ("kill", "redis", "pg", "sigterm", "import", "s3")
TITLES = {
    "kill": "worker SIGKILLed mid-export, another started",
    "redis": "Redis stopped 2 s mid-export",
    "pg": "pg_terminate_backend of the FETCH/COPY",
    "sigterm": "SIGTERM x3 on one export, then a worker",
    "import": "worker SIGKILLed right after an import's COMMIT",
    "s3": "SeaweedFS SIGKILLed mid-upload, back after 2 s",
}


class MissedWindow(Exception):
    """The task ended before the fault could be injected: the round is tried again."""


@dataclass
class Round:
    fault: str
    index: int
    tries: int = 1
    status: str | None = None
    right: bool = False
    exact: bool = False
    leftovers: list[str] = field(default_factory=list)
    recovery_seconds: float | None = None
    bound_seconds: float | None = None
    task: dict | None = None
    note: str = ""
    error: str | None = None

    @property
    def in_time(self) -> bool:
        return self.recovery_seconds is not None and self.recovery_seconds <= (self.bound_seconds or 0)


@dataclass
class Reference:
    sha256: str
    job_seconds: float


@dataclass
class Bench:
    """What the rounds share: the stack(s), Redis, the PostgreSQL database, the references."""

    stack: Stack
    redis: EmbeddedRedis
    db_url: str
    scratch: Path
    references: dict[str, Reference] = field(default_factory=dict)
    s3_stack: Stack | None = None
    s3: S3Server | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(16))


# --- set-up -------------------------------------------------------------------------------------


def datasets_toml(demo_db: Path, db_url: str) -> str:
    return f"""
[datasets.samples]
source = "sqlite"
url = "{demo_db}"
table = "samples"
key = ["sample_id"]
max_export_rows = 150000

[datasets.samples.columns]
{_columns_toml(DEMO_COLUMNS)}

[datasets.big_pg]
source = "postgres"
url = "{db_url}"
table = "{PG_TABLE}_big"
key = ["id"]

[datasets.imp]
source = "postgres"
url = "{db_url}"
table = "{PG_TABLE}_imp"
key = ["id"]
importable = true

[datasets.imp.columns]
{IMPORT_COLUMNS_TOML}
"""


def make_stack(name: str, scratch: Path, redis_url: str, datasets: Path, **extra: str) -> Stack:
    """An api on ``name``'s own queue and files directory; workers are started by the rounds."""
    port = free_port()
    data_dir = scratch / name
    logs = OUT_DIR / "logs" / "faults" / name
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    (data_dir / "files").mkdir(parents=True)
    env = stack_env(
        data_dir,
        data_dir / "files",
        redis_url,
        secrets.token_urlsafe(32),
        port,
        datasets=datasets,
        **{**SETTINGS, **extra},
    )
    stack = Stack(name, env, port, logs)  # tests/fixtures/stack.py: logs go to its data_dir
    stack.start_api()
    return stack


def prepare_postgres(url: str) -> None:
    _load_postgres(url, PG_TABLE)  # the tests' tables, faults_big among them
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {PG_TABLE}_imp (LIKE {PG_TABLE} INCLUDING ALL)")
        conn.execute(f"CREATE TABLE {PG_TABLE}_imp_ref (LIKE {PG_TABLE} INCLUDING ALL)")
        with conn.cursor().copy(f"COPY {PG_TABLE}_imp_ref FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
            copy.write(big_csv(1, IMPORT_ROWS))


def table_digest(url: str, table: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY id), '')) FROM {table} t"
        ).fetchone()


# --- checks -------------------------------------------------------------------------------------


def at(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def wait_final(read: Callable[[], dict | None], timeout: float = ROUND_TIMEOUT) -> dict:
    """Poll until a final status, riding out errors (during a Redis outage the api answers
    SERVICE_UNAVAILABLE)."""
    deadline = time.monotonic() + timeout
    task: dict | None = None
    while time.monotonic() < deadline:
        try:
            task = read()
        except Exception:  # the store is down: ask again
            task = None
        if task and task["status"] in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
            return task
        time.sleep(0.05)
    raise TimeoutError(f"no final status after {timeout:.0f} s: {task and task['status']}")


def file_sha256(bench: Bench, task: dict) -> str | None:
    if not task.get("downloadUrl"):
        return None
    path = bench.scratch / f"download-{task['id']}"
    try:
        return download(task["downloadUrl"], path)
    finally:
        path.unlink(missing_ok=True)


def stray_processes(stack: Stack) -> list[str]:
    """Processes other than the api still running with the stack's queue name in their environment,
    once the round's workers are stopped (given 3 s to go)."""
    queue = stack.env["DATAPORT_QUEUE_NAME"]
    api_pids = {p.pid for p in stack.processes if p not in stack.workers}
    deadline = time.monotonic() + 3
    while True:
        found = []
        for process in psutil.process_iter(["pid", "name", "status"]):
            if process.pid in api_pids or process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if process.environ().get("DATAPORT_QUEUE_NAME") == queue:
                    found.append(f"pid {process.pid} {' '.join(process.cmdline())[:80]}")
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def leftovers(bench: Bench, stack: Stack) -> list[str]:
    stack.stop_workers()
    files_dir = Path(stack.env["DATAPORT_FILES_DIR"])
    left = [f"partial file {p.relative_to(files_dir)}" for p in files_dir.rglob("*.partial-*")]
    if stack is bench.s3_stack and bench.s3 is not None:
        left += [f"open multipart upload {u['Key']}" for u in _open_uploads(bench.s3, stack.env["DATAPORT_S3_BUCKET"])]
    return left + [f"stray process {p}" for p in stray_processes(stack)]


def judge_export(bench: Bench, rnd: Round, done: dict, reference: str, rows: int, cleared_at: float) -> None:
    rnd.task, rnd.status = done, done["status"]
    rnd.right = done["status"] == "SUCCEEDED" and done["rowCount"] == rows
    if done["status"] == "SUCCEEDED":
        sha = file_sha256(bench, done)
        rnd.exact = sha == bench.references[reference].sha256 == done["checksumSha256"]
    if done.get("finishedAt"):
        rnd.recovery_seconds = at(done["finishedAt"]) - cleared_at
    rnd.bound_seconds = LEASE + LONGEST_DELAY + bench.references[reference].job_seconds


def reference_run(bench: Bench, stack: Stack, name: str, **request: Any) -> None:
    """One undisturbed export of ``request`` on a fresh worker: its file's SHA-256 and job time."""
    api = stack.api()
    task = api.export(**request)
    stack.start_worker()
    done = wait_final(lambda: api.task(task["id"]))
    stack.stop_workers()
    if done["status"] != "SUCCEEDED":
        raise RuntimeError(f"the undisturbed {name} export ended {done['status']}: {done['error']}")
    bench.references[name] = Reference(file_sha256(bench, done), at(done["finishedAt"]) - at(done["startedAt"]))
    console.print(
        f"reference {name}: {done['rowCount']:,} rows, {done['fileSize'] / 1e6:.1f} MB, "
        f"job {bench.references[name].job_seconds:.2f} s"
    )


# --- the faults ---------------------------------------------------------------------------------


def kill_mid_export(bench: Bench, rnd: Round) -> None:
    stack, api = bench.stack, bench.stack.api()
    task = api.export(**WIDE)
    worker = stack.start_worker()
    wait_reading(api, task["id"])
    time.sleep(bench.rng.uniform(0, 1))
    stack.kill(worker)
    if api.task(task["id"])["status"] == "SUCCEEDED":
        raise MissedWindow
    stack.start_worker()
    cleared_at = time.time()
    judge_export(bench, rnd, wait_final(lambda: api.task(task["id"])), "samples", DEMO_ROWS, cleared_at)


def redis_outage(bench: Bench, rnd: Round) -> None:
    stack, api = bench.stack, bench.stack.api()
    workers = [stack.start_worker(), stack.start_worker()]
    task = api.export(**WIDE)
    wait_reading(api, task["id"])
    _outage(bench.redis, 2.0)
    cleared_at = time.time()
    done = wait_final(lambda: api.task(task["id"]))
    judge_export(bench, rnd, done, "samples", DEMO_ROWS, cleared_at)
    exited = [w.pid for w in workers if w.poll() is not None]
    if exited:
        rnd.right = False
        rnd.note = f"workers exited: {exited}"


def pg_terminate(bench: Bench, rnd: Round) -> None:
    stack, api = bench.stack, bench.stack.api()
    file_format = PG_FORMATS[rnd.index % len(PG_FORMATS)]
    stack.start_worker()
    task = api.export(dataset="big_pg", format=file_format)
    terminated = terminate_a_read(bench.db_url, api, task["id"])
    cleared_at = time.time()
    if not terminated:
        raise MissedWindow
    rnd.note = f"{file_format}, {terminated} backend(s) terminated"
    judge_export(bench, rnd, wait_final(lambda: api.task(task["id"])), f"big_pg {file_format}", BIG_ROWS, cleared_at)


def sigterm_three_times(bench: Bench, rnd: Round) -> None:
    stack, api = bench.stack, bench.stack.api()
    task = api.export(**WIDE)
    for deploy in range(3):
        worker = start_worker(stack, grace=0.2)
        try:
            wait_reading(api, task["id"], after_starts=deploy)
        except AssertionError:
            if api.task(task["id"])["status"] == "SUCCEEDED":
                raise MissedWindow from None
            raise
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    start_worker(stack, grace=60)
    cleared_at = time.time()
    done = wait_final(lambda: api.task(task["id"]))
    judge_export(bench, rnd, done, "samples", DEMO_ROWS, cleared_at)
    if done["attempts"] != 1:
        rnd.right = False
        rnd.note = f"attempts {done['attempts']}"


def freeze_after_commit(bench: Bench, api: Any, task_id: str, worker: Any) -> bool:
    """SIGSTOP ``worker`` the moment its import's receipt is committed (as the SIGSTOP version of
    tests/faults/test_import_exactly_once.py did); True if the task was then still PROCESSING (the
    worker frozen between its COMMIT and SUCCEEDED), else the worker is let go."""
    deadline = time.monotonic() + 60
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        while True:
            try:
                if conn.execute(f"SELECT 1 FROM {RECEIPTS} WHERE task_id = %s", (task_id,)).fetchone():
                    break
            except psycopg.errors.UndefinedTable:
                pass  # no receipt table yet
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"no receipt: {api.import_task(task_id)}")
    os.kill(worker.pid, signal.SIGSTOP)
    if api.import_task(task_id)["status"] == "PROCESSING":
        return True
    os.kill(worker.pid, signal.SIGCONT)
    return False


def import_after_commit(bench: Bench, rnd: Round) -> None:
    stack, api = bench.stack, bench.stack.api()
    with psycopg.connect(bench.db_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {PG_TABLE}_imp")
    task = api.start_import("imp", big_csv(1, IMPORT_ROWS))
    worker = stack.start_worker()
    if not freeze_after_commit(bench, api, task["id"], worker):
        wait_final(lambda: api.import_task(task["id"]))
        raise MissedWindow
    stack.kill(worker)
    stack.start_worker()
    cleared_at = time.time()
    done = wait_final(lambda: api.import_task(task["id"]))
    rnd.task, rnd.status = done, done["status"]
    rnd.right = done["status"] == "SUCCEEDED" and done["rowsImported"] == IMPORT_ROWS and done["rowsFailed"] == 0
    rnd.exact = table_digest(bench.db_url, f"{PG_TABLE}_imp") == table_digest(bench.db_url, f"{PG_TABLE}_imp_ref")
    rnd.note = f"attempts {done['attempts']}"
    if done.get("finishedAt"):
        rnd.recovery_seconds = at(done["finishedAt"]) - cleared_at
    rnd.bound_seconds = LEASE + LONGEST_DELAY


def s3_outage(bench: Bench, rnd: Round) -> None:
    assert bench.s3_stack is not None and bench.s3 is not None
    stack, api = bench.s3_stack, bench.s3_stack.api()
    stack.start_worker()
    task = api.export(**WIDE)
    _writing(api, task["id"])
    bench.s3.kill()
    if api.task(task["id"])["status"] == "SUCCEEDED":
        bench.s3.restart()
        raise MissedWindow
    time.sleep(2)
    bench.s3.restart()
    cleared_at = time.time()
    judge_export(bench, rnd, wait_final(lambda: api.task(task["id"])), "samples S3", DEMO_ROWS, cleared_at)


INJECT: dict[str, Callable[[Bench, Round], None]] = {
    "kill": kill_mid_export,
    "redis": redis_outage,
    "pg": pg_terminate,
    "sigterm": sigterm_three_times,
    "import": import_after_commit,
    "s3": s3_outage,
}


def run_round(bench: Bench, fault: str, index: int) -> Round:
    stack = bench.s3_stack if fault == "s3" else bench.stack
    assert stack is not None
    for tries in range(1, MAX_TRIES_PER_ROUND + 1):
        rnd = Round(fault, index, tries)
        try:
            INJECT[fault](bench, rnd)
        except MissedWindow:
            leftovers(bench, stack)
            continue
        except Exception as e:  # reported in the table; the next round goes on
            rnd.error = f"{type(e).__name__}: {e}"
        rnd.leftovers = leftovers(bench, stack)
        return rnd
    rnd = Round(fault, index, MAX_TRIES_PER_ROUND, error=f"missed the fault's window {MAX_TRIES_PER_ROUND} times")
    return rnd


# --- report -------------------------------------------------------------------------------------


def passed(rounds: list[Round]) -> bool:
    return bool(rounds) and all(r.right and r.exact and not r.leftovers and r.in_time and not r.error for r in rounds)


def print_table(results: dict[str, list[Round]]) -> None:
    table = Table(
        title=f"Faults against real processes (lease {LEASE:g} s, retry delays "
        f"{SETTINGS['retry_delay_seconds']}-{LONGEST_DELAY:g} s)"
    )
    for column in (
        "fault",
        "runs",
        "retried",
        "right",
        "exact",
        "leftovers",
        "recovery median (max)",
        "bound",
        "target",
    ):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for fault, rounds in results.items():
        recoveries = [r.recovery_seconds for r in rounds if r.recovery_seconds is not None]
        bounds = [r.bound_seconds for r in rounds if r.bound_seconds is not None]
        table.add_row(
            f"{fault}: {TITLES[fault]}",
            str(len(rounds)),
            str(sum(r.tries - 1 for r in rounds)),
            f"{sum(r.right for r in rounds)}/{len(rounds)}",
            f"{sum(r.exact for r in rounds)}/{len(rounds)}",
            str(sum(len(r.leftovers) for r in rounds)),
            f"{median_of(recoveries):.2f} s ({max(recoveries):.2f})" if recoveries else "",
            f"{median_of(bounds):.2f} s" if bounds else "",
            "met" if passed(rounds) else "MISS",
        )
    console.print(table)


def print_wrong(results: dict[str, list[Round]]) -> None:
    for rounds in results.values():
        for r in rounds:
            if passed([r]):
                continue
            task = r.task or {}
            console.print(
                f"[yellow]{r.fault} round {r.index + 1}[/yellow]: status {r.status}, right {r.right}, "
                f"exact {r.exact}, recovery {r.recovery_seconds and round(r.recovery_seconds, 2)} s "
                f"(bound {r.bound_seconds and round(r.bound_seconds, 2)} s), attempts "
                f"{task.get('attempts')}, {r.note} {r.error or ''}"
            )
            if task.get("error"):
                console.print(f"  error: {task['error']}")
            for item in r.leftovers:
                console.print(f"  left: {item}")
            for event in (task.get("events") or [])[-8:]:
                console.print(f"  {event['at']} {event['status']} {event['message'] or ''}")


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each fault")
    parser.add_argument("--only", choices=FAULTS, help="this fault alone")
    parser.add_argument("--s3", action="store_true", help="also SeaweedFS killed mid-upload (~10-25 s to start)")
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where the bench may create (and drop) a database of its own",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on a missed target")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "faults.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    faults = [args.only] if args.only else [f for f in FAULTS if f != "s3" or args.s3]
    note_load()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="faults-", dir=OUT_DIR))
    database = f"bench_faults_{secrets.token_hex(4)}"
    with psycopg.connect(args.postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    db_url = _with_database(args.postgres_url, database)
    redis = EmbeddedRedis(scratch)
    stacks: list[Stack] = []
    s3: S3Server | None = None
    results: dict[str, list[Round]] = {}
    bench: Bench | None = None
    try:
        prepare_postgres(db_url)
        demo_db = ensure_demo_database(OUT_DIR / f"data-{DEMO_ROWS}", DEMO_ROWS)
        datasets = scratch / "datasets.toml"
        datasets.write_text(datasets_toml(demo_db, db_url))
        redis.start()
        stack = make_stack("local", scratch, redis.url, datasets)
        stacks.append(stack)
        bench = Bench(stack, redis, db_url, scratch)
        if {"kill", "redis", "sigterm"} & set(faults):
            reference_run(bench, stack, "samples", **WIDE)
        if "pg" in faults:
            for file_format in PG_FORMATS:
                reference_run(bench, stack, f"big_pg {file_format}", dataset="big_pg", format=file_format)
        if "s3" in faults:
            s3 = start_server(scratch / "s3")
            console.print(f"SeaweedFS ready in {s3.startup_seconds:.1f} s")
            bench.s3 = s3
            bench.s3_stack = make_stack(
                "s3",
                scratch,
                redis.url,
                datasets,
                **{
                    k.removeprefix("DATAPORT_").lower(): v for k, v in s3.settings_env(s3.make_bucket("faults")).items()
                },
            )
            stacks.append(bench.s3_stack)
            reference_run(bench, bench.s3_stack, "samples S3", **WIDE)
        for fault in faults:
            results[fault] = []
            for index in range(args.rounds):
                started = time.monotonic()
                rnd = run_round(bench, fault, index)
                results[fault].append(rnd)
                console.print(
                    f"{fault} {index + 1}/{args.rounds}: {rnd.status or rnd.error}, right {rnd.right}, "
                    f"exact {rnd.exact}, leftovers {len(rnd.leftovers)}, recovery "
                    f"{rnd.recovery_seconds and round(rnd.recovery_seconds, 2)} s, tries {rnd.tries} "
                    f"({time.monotonic() - started:.1f} s)"
                )
    finally:
        for stack in stacks:
            stack.stop()
        if s3 is not None:
            s3.stop()
        redis.stop()
        with psycopg.connect(args.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(results)
    print_wrong(results)
    met = all(passed(rounds) for rounds in results.values())
    console.print(
        f"target (every round right and exact, no leftovers, recovery within its bound): {'met' if met else 'MISS'}"
    )
    write_json(
        args.out,
        "faults",
        settings=SETTINGS,
        rounds_per_fault=args.rounds,
        met=met,
        references={k: asdict(v) for k, v in bench.references.items()} if bench else {},
        results={fault: [asdict(r) for r in rounds] for fault, rounds in results.items()},
    )
    console.print(f"numbers in {args.out}")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
