"""Export benchmark (issue 2): the demo dataset to CSV through the whole path, and worker memory.

Command (from the repository root)::

    python bench/export_demo.py                      # 100,000 then 1,000,000 rows, CSV, local storage
    python bench/export_demo.py --rows 20000 200000  # any row counts; the first is the RSS reference

What it does, for each row count N:

1. Makes the demo database of N rows under ``bench/out/data-N/`` (cached; generation is not timed)
   and reads it once, so every reader below finds it in the page cache.
2. Starts ``dataport api`` and ``dataport worker`` as subprocesses (fresh ones per N) on a Redis
   started once for the whole run, with local storage in a scratch directory.
3. Sends ``requestExport`` (dataset ``samples``, all columns) and follows the task over the
   ``exportProgress`` subscription until it is SUCCEEDED: that interval is "seconds". Meanwhile a
   thread samples the worker's RSS (with any children) every 10 ms; "peak" is the highest sample,
   "idle" the worker's RSS after start-up, before the request.
4. Downloads the file from ``downloadUrl`` and checks its SHA-256 against ``checksumSha256`` and
   its record count (``csv.reader``: cells hold newlines) against N.
5. Runs the peer: the same table written with nothing but the standard library (``sqlite3``
   cursor + ``csv.writer`` into a file) in a subprocess, timed and sampled the same way.

How to read the result:

* ``rows/s`` and ``MB/s`` (file bytes, 10^6) are for this machine only; compare them across commits
  only on the same machine. ``ratio`` = Dataport seconds / peer seconds is what the whole path
  (GraphQL, queue, typed rows, formula guard, fsync, read-back verification, progress) costs over
  the bare minimum; it should stay roughly the same for every N.
* ``peak RSS`` of the largest N over that of the first N must stay within 1.2x (DESIGN.md: "memory
  does not grow with row count"). The script prints PASS/FAIL and exits 1 on FAIL or when a file
  check fails. All numbers go to ``--out`` (JSON).

Only ``--storage local`` is wired up: the S3 server the tests use lives in the test fixtures.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from _common import (
    OUT_DIR,
    SAMPLE_SECONDS,
    MiB,
    PeakRss,
    Stack,
    console,
    download,
    export_and_follow,
    high_water_mark,
    rss,
    seconds_between,
    warm,
    write_json,
)
from _common import stack_env as common_stack_env
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings
from sources.demo import DEMO_COLUMNS, ensure_demo_database

RSS_LIMIT = 1.2  # peak RSS of the largest N over the first N

# The peer: the least a program can do to turn the table into the same kind of file.
PEER = """
import csv, json, sqlite3, sys
db, out, fmt = sys.argv[1:]
con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
cur = con.execute("SELECT * FROM samples ORDER BY sample_id")
names = [d[0] for d in cur.description]
with open(out, "w", newline="", encoding="utf-8") as f:
    if fmt == "CSV":
        w = csv.writer(f, lineterminator="\\r\\n")
        w.writerow(names)
    while rows := cur.fetchmany(2000):
        if fmt == "CSV":
            w.writerows(rows)
        else:
            f.writelines(json.dumps(dict(zip(names, r)), ensure_ascii=False) + "\\n" for r in rows)
"""


# --- processes -------------------------------------------------------------------------------


def stack_env(
    rows: int, data_dir: Path, files_dir: Path, redis_url: str, secret: str, port: int, storage: str
) -> dict[str, str]:
    return common_stack_env(
        data_dir, files_dir, redis_url, secret, port, storage=storage, demo_rows=str(rows), max_export_rows=str(rows)
    )


# --- one export through Dataport -------------------------------------------------------------


def count_records(path: Path, file_format: str) -> int:
    """Data records in the file: CSV records after the header, or NDJSON lines."""
    with path.open(newline="", encoding="utf-8") as f:
        if file_format == "CSV":
            header = next(csv.reader(f))
            if header != [c.name for c in DEMO_COLUMNS]:
                raise ValueError(f"unexpected header: {header[:5]}...")
            return sum(1 for _ in csv.reader(f))
        return sum(1 for line in f if line.strip())


# --- the peer --------------------------------------------------------------------------------


def run_peer(db: Path, out: Path, file_format: str) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", PEER, str(db), str(out), file_format])
    sampler = PeakRss(process.pid)
    sampler.start()
    code = process.wait()
    seconds = time.perf_counter() - started
    sampler.stop()
    if code != 0:
        raise RuntimeError(f"the peer export exited with {code}")
    return {
        "seconds": seconds,
        "peak_rss": sampler.peak,
        "bytes": out.stat().st_size,
        "records": count_records(out, file_format),
    }


# --- one row count ---------------------------------------------------------------------------


@dataclass
class Result:
    rows: int
    seconds: float = 0.0
    file_bytes: int = 0
    worker_idle_rss: int = 0
    worker_peak_rss: int = 0
    worker_after_rss: int = 0
    worker_hwm: int | None = None
    rss_samples: int = 0
    queued_seconds: float | None = None  # createdAt → startedAt: request handling and queue pick-up
    worker_seconds: float | None = None  # startedAt → finishedAt: the job itself
    download_seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    peer: dict = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.file_bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.peer["seconds"] if self.seconds and self.peer.get("seconds") else None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())

    def as_json(self) -> dict:
        return {
            **asdict(self),
            "rows_per_second": self.rows_per_second,
            "mb_per_second": self.mb_per_second,
            "ratio_to_peer": self.ratio,
            "ok": self.ok,
        }


def prepare_database(rows: int) -> tuple[Path, Path]:
    """``bench/out/data-N`` and its demo database, generated once and then reused (not timed)."""
    data_dir = OUT_DIR / f"data-{rows}"
    if not (data_dir / "demo.sqlite3").exists():
        console.print(f"[dim]generating the {rows:,}-row demo database (once, not timed)…[/dim]")
    db = ensure_demo_database(data_dir, rows)
    warm(db)  # into the page cache, so neither Dataport nor the peer reads it cold
    return data_dir, db


def measure(rows: int, args: argparse.Namespace, redis_url: str, scratch: Path) -> Result:
    result = Result(rows)
    data_dir, db = prepare_database(rows)
    logs = OUT_DIR / "logs" / f"export_demo-{rows}"
    logs.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack = Stack(
        stack_env(rows, data_dir, scratch / f"files-{rows}", redis_url, secret, port, args.storage), port, logs
    )
    exported = scratch / f"dataport-{rows}.{args.format.lower()}"
    try:
        stack.start()
        assert stack.worker is not None
        time.sleep(0.5)  # let start-up settle before the idle reading
        worker = psutil.Process(stack.worker.pid)
        result.worker_idle_rss = rss(worker, worker.children(recursive=True))
        client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}"))
        os.sync()  # no write-back of earlier files during the timed run

        sampler = PeakRss(stack.worker.pid)
        sampler.start()
        try:
            task, result.seconds = asyncio.run(export_and_follow(client, {"dataset": "samples", "format": args.format}))
        finally:
            result.worker_peak_rss = sampler.stop()
            result.rss_samples = sampler.samples
        result.worker_hwm = high_water_mark(stack.worker.pid)
        result.worker_after_rss = rss(worker, worker.children(recursive=True))
        if task["status"] != "SUCCEEDED":
            result.error = f"task {task['status']}: {task.get('error')}"
            return result
        result.file_bytes = task["fileSize"]
        result.queued_seconds = seconds_between(task["createdAt"], task["startedAt"])
        result.worker_seconds = seconds_between(task["startedAt"], task["finishedAt"])

        started = time.perf_counter()
        sha256 = download(task["downloadUrl"], exported)
        result.download_seconds = time.perf_counter() - started
    except Exception as e:  # reported in the table and the JSON; the run goes on with the next N
        result.error = f"{type(e).__name__}: {e}"
        return result
    finally:
        stack.stop()

    result.checks = {
        "sha256": sha256 == task["checksumSha256"],
        "size": exported.stat().st_size == task["fileSize"],
        "row_count": task["rowCount"] == rows,
        "records_in_file": count_records(exported, args.format) == rows,
    }
    exported.unlink()

    os.sync()
    peer_out = scratch / f"peer-{rows}.{args.format.lower()}"
    result.peer = run_peer(db, peer_out, args.format)
    result.checks["peer_records"] = result.peer["records"] == rows
    peer_out.unlink()
    return result


# --- report ----------------------------------------------------------------------------------


def rss_verdict(results: list[Result]) -> tuple[float | None, bool]:
    """Peak RSS of the largest N over the first N, and whether it is within the limit."""
    measured = [r for r in results if r.worker_peak_rss]
    if len(measured) < 2:
        return None, True
    largest = max(measured, key=lambda r: r.rows)
    ratio = largest.worker_peak_rss / measured[0].worker_peak_rss
    return ratio, ratio <= RSS_LIMIT


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    table = Table(
        title=f"Export of the demo dataset: {args.format}, {args.storage} storage, api + 1 worker "
        "(RSS in MiB; ratio = seconds / peer seconds)"
    )
    for name in (
        "rows",
        "seconds",
        "rows/s",
        "MB/s",
        "worker peak MiB",
        "worker idle MiB",
        "peer seconds",
        "peer peak MiB",
        "ratio",
        "checks",
    ):
        table.add_column(name, justify="left" if name == "checks" else "right")
    for r in results:
        if r.error:
            table.add_row(f"{r.rows:,}", *[""] * 8, "[red]FAILED: see below[/red]")
            continue
        failed = [name for name, ok in r.checks.items() if not ok]
        table.add_row(
            f"{r.rows:,}",
            f"{r.seconds:.2f}",
            f"{r.rows_per_second:,.0f}",
            f"{r.mb_per_second:.1f}",
            f"{r.worker_peak_rss / MiB:.1f}",
            f"{r.worker_idle_rss / MiB:.1f}",
            f"{r.peer['seconds']:.2f}",
            f"{r.peer['peak_rss'] / MiB:.1f}",
            f"{r.ratio:.2f}x",
            "[green]ok[/green]" if not failed else f"[red]FAILED: {', '.join(failed)}[/red]",
        )
    console.print(table)
    for r in results:
        if r.error:
            console.print(f"[red]{r.rows:,} rows:[/red] {r.error} (logs in {OUT_DIR / 'logs'})")


def print_verdict(results: list[Result], ratio: float | None, passed: bool) -> None:
    if ratio is None:
        console.print("peak RSS ratio: needs two row counts")
        return
    first, largest = results[0], max(results, key=lambda r: r.rows)
    verdict = "[green]PASS[/green]" if passed else "[red]FAIL[/red]"
    console.print(
        f"worker peak RSS {largest.rows:,} / {first.rows:,} rows: "
        f"{largest.worker_peak_rss / MiB:.1f} / {first.worker_peak_rss / MiB:.1f} MiB = "
        f"{ratio:.3f}x (limit {RSS_LIMIT}x) {verdict}"
    )


def write_report(
    path: Path, results: list[Result], args: argparse.Namespace, ratio: float | None, passed: bool
) -> None:
    write_json(
        path,
        "export_demo",
        settings={"format": args.format, "storage": args.storage, "sample_seconds": SAMPLE_SECONDS},
        results=[r.as_json() for r in results],
        peak_rss_ratio=ratio,
        peak_rss_limit=RSS_LIMIT,
        passed=passed,
    )


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="row counts, in order; the first is the RSS reference",
    )
    parser.add_argument("--format", default="CSV", type=str.upper, choices=["CSV", "NDJSON"])
    parser.add_argument("--storage", default="local", choices=["local"])
    parser.add_argument("--out", type=Path, default=OUT_DIR / "export_demo.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="export_demo-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    results: list[Result] = []
    try:
        redis.start()
        for rows in args.rows:
            console.print(f"[bold]{rows:,} rows[/bold]…")
            results.append(measure(rows, args, redis.url, scratch))
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    ratio, passed = rss_verdict(results)
    print_table(results, args)
    print_verdict(results, ratio, passed)
    write_report(args.out, results, args, ratio, passed)
    console.print(f"numbers in {args.out}")
    return 0 if passed and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
