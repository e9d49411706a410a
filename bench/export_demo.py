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
import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.demo_data import DEMO_COLUMNS, ensure_demo_database
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port, wait_for_port
from dataport.processes import stop
from dataport.settings import Settings

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RSS_LIMIT = 1.2  # peak RSS of the largest N over the first N
SAMPLE_SECONDS = 0.01
MiB = 1024 * 1024
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
# After the subscription: the signed link, the checksum and when the worker started and finished.
FINISHED_TASK = """query($id: ID!) { exportTask(id: $id) {
  id status rowCount fileSize checksumSha256 downloadUrl createdAt startedAt finishedAt error { code message } } }"""

console = Console(width=None if sys.stdout.isatty() else 132)  # a pipe or file gets the whole table

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


# --- memory ----------------------------------------------------------------------------------


def rss(process: psutil.Process, children: list[psutil.Process]) -> int:
    """Resident bytes of ``process`` and ``children`` (those that still run)."""
    total = process.memory_info().rss
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss(threading.Thread):
    """Samples a process tree's RSS every ``interval`` seconds until ``stop()`` or the process ends."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        children: list[psutil.Process] = []
        next_scan = 0.0
        try:
            while not self._done.is_set():
                now = time.monotonic()
                if now >= next_scan:  # listing children scans /proc: twice a second is enough
                    children = self.process.children(recursive=True)
                    next_scan = now + 0.5
                self.peak = max(self.peak, rss(self.process, children))
                self.samples += 1
                self._done.wait(self.interval)
        except psutil.NoSuchProcess:  # also a zombie: the process is done
            pass

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def high_water_mark(pid: int) -> int | None:
    """The kernel's own peak RSS of ``pid`` (Linux ``VmHWM``): a check on the sampled peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- processes -------------------------------------------------------------------------------


@dataclass
class Stack:
    """``dataport api`` + ``dataport worker`` for one row count."""

    env: dict[str, str]
    port: int
    logs: Path
    api: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, *args: str, log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            return subprocess.Popen([sys.executable, "-m", "dataport.cli", *args], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 60) -> None:
        self.api = self._spawn("api", "--port", str(self.port), log=self.logs / "api.log")
        self.worker = self._spawn("worker", log=self.logs / "worker.log")
        wait_for_port("127.0.0.1", self.port, timeout=timeout)
        deadline = time.monotonic() + timeout
        while "worker ready" not in (self.logs / "worker.log").read_text(errors="replace"):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {self.logs / 'worker.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in (self.worker, self.api):
            stop(process)


def stack_env(rows: int, data_dir: Path, files_dir: Path, redis_url: str, secret: str, port: int,
              storage: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")},
        "DATAPORT_DATA_DIR": str(data_dir),
        "DATAPORT_FILES_DIR": str(files_dir),
        "DATAPORT_REDIS_URL": redis_url,
        "DATAPORT_DEMO_ROWS": str(rows),
        "DATAPORT_MAX_EXPORT_ROWS": str(rows),
        "DATAPORT_JWT_SECRET": secret,
        "DATAPORT_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DATAPORT_QUEUE_NAME": f"dataport:bench:{secrets.token_hex(4)}",
        "DATAPORT_STORAGE": storage,
    }


# --- one export through Dataport -------------------------------------------------------------


async def export_and_follow(client: DataportClient, file_format: str) -> tuple[dict, float]:
    """requestExport, then the subscription until a final status: (final task, seconds)."""
    started = time.perf_counter()
    task = await client.request_export({"dataset": "samples", "format": file_format})
    seconds = None
    async for snapshot in client.follow(task["id"]):
        task = snapshot
        if task["status"] in FINAL and seconds is None:
            seconds = time.perf_counter() - started
    if seconds is None:
        raise RuntimeError(f"the subscription ended before a final status: {task}")
    task = (await client.execute(FINISHED_TASK, {"id": task["id"]}))["exportTask"]
    return task, seconds


def download(url: str, path: Path) -> str:
    """Stream ``url`` into ``path``; its SHA-256."""
    sha = hashlib.sha256()
    with httpx.stream("GET", url, timeout=None) as response, path.open("wb") as f:
        response.raise_for_status()
        for chunk in response.iter_bytes(1024 * 1024):
            sha.update(chunk)
            f.write(chunk)
    return sha.hexdigest()


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
    return {"seconds": seconds, "peak_rss": sampler.peak, "bytes": out.stat().st_size,
            "records": count_records(out, file_format)}


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
        return {**asdict(self), "rows_per_second": self.rows_per_second, "mb_per_second": self.mb_per_second,
                "ratio_to_peer": self.ratio, "ok": self.ok}


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def prepare_database(rows: int) -> tuple[Path, Path]:
    """``bench/out/data-N`` and its demo database, generated once and then reused (not timed)."""
    data_dir = OUT_DIR / f"data-{rows}"
    if not (data_dir / "demo.sqlite3").exists():
        console.print(f"[dim]generating the {rows:,}-row demo database (once, not timed)…[/dim]")
    db = ensure_demo_database(data_dir, rows)
    with db.open("rb") as f:  # into the page cache, so neither Dataport nor the peer reads it cold
        while f.read(8 * MiB):
            pass
    return data_dir, db


def measure(rows: int, args: argparse.Namespace, redis_url: str, scratch: Path) -> Result:
    result = Result(rows)
    data_dir, db = prepare_database(rows)
    logs = OUT_DIR / "logs" / f"export_demo-{rows}"
    logs.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack = Stack(stack_env(rows, data_dir, scratch / f"files-{rows}", redis_url, secret, port, args.storage),
                  port, logs)
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
            task, result.seconds = asyncio.run(export_and_follow(client, args.format))
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
    table = Table(title=f"Export of the demo dataset: {args.format}, {args.storage} storage, api + 1 worker "
                        "(RSS in MiB; ratio = seconds / peer seconds)")
    for name in ("rows", "seconds", "rows/s", "MB/s", "worker peak MiB", "worker idle MiB",
                 "peer seconds", "peer peak MiB", "ratio", "checks"):
        table.add_column(name, justify="left" if name == "checks" else "right")
    for r in results:
        if r.error:
            table.add_row(f"{r.rows:,}", *[""] * 8, "[red]FAILED: see below[/red]")
            continue
        failed = [name for name, ok in r.checks.items() if not ok]
        table.add_row(
            f"{r.rows:,}", f"{r.seconds:.2f}", f"{r.rows_per_second:,.0f}", f"{r.mb_per_second:.1f}",
            f"{r.worker_peak_rss / MiB:.1f}", f"{r.worker_idle_rss / MiB:.1f}",
            f"{r.peer['seconds']:.2f}", f"{r.peer['peak_rss'] / MiB:.1f}", f"{r.ratio:.2f}x",
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
    console.print(f"worker peak RSS {largest.rows:,} / {first.rows:,} rows: "
                  f"{largest.worker_peak_rss / MiB:.1f} / {first.worker_peak_rss / MiB:.1f} MiB = "
                  f"{ratio:.3f}x (limit {RSS_LIMIT}x) {verdict}")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path, results: list[Result], args: argparse.Namespace, ratio: float | None,
               passed: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "bench": "export_demo",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total},
        "settings": {"format": args.format, "storage": args.storage, "sample_seconds": SAMPLE_SECONDS},
        "results": [r.as_json() for r in results],
        "peak_rss_ratio": ratio,
        "peak_rss_limit": RSS_LIMIT,
        "passed": passed,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="row counts, in order; the first is the RSS reference")
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
    write_json(args.out, results, args, ratio, passed)
    console.print(f"numbers in {args.out}")
    return 0 if passed and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
