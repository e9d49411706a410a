"""Streaming-route benchmark: 10,000 rows straight to the response against the background path.

Command (from the repository root)::

    python bench/stream_route.py                 # 10,000 demo rows, CSV and NDJSON, 5 runs each
    python bench/stream_route.py --runs 9 --rows 5000

What it does:

1. Makes the demo database of N rows (default 10,000 = the default ``streamMaxRows``) under
   ``bench/out/data-N/`` (cached, as bench/export_demo.py does) and reads it once into the page cache.
2. Starts ``dataport api`` + ``dataport worker`` on an embedded Redis, local storage, the demo
   dataset ``samples`` (all 58 columns), rate limits raised so that no request of the bench is refused.
3. For each format (CSV, NDJSON), after one untimed warm-up of each path, ``--runs`` rounds, the two
   paths taking turns:

   * stream: ``GET /exports/stream?dataset=samples&format=…`` read with ``httpx`` streaming;
     TTFB = request sent -> first body byte, first row = -> first byte of the first data row (for
     CSV the header line comes before any row is read, so its TTFB is the header's), total = -> last
     byte;
   * background (the peer): ``requestExport`` -> ``exportProgress`` subscription until SUCCEEDED ->
     GET the ``downloadUrl``; TTFB (and first row) = ``requestExport`` sent -> first byte (of the
     first row) of the download, total = -> last byte. Each round asks as a fresh user, so no finished task is reused.

   Every file is checked: the download's SHA-256 against ``checksumSha256``, the record count of
   both (CSV records via ``csv.reader``; NDJSON lines), and that the streamed bytes equal the
   worker's file (DESIGN.md: the same pipeline, the same bytes).

How to read the result: medians of the runs (min-max beside them) in milliseconds; ``background /
stream`` is how many times longer the queued path takes for the same rows -- why small exports skip
the queue. The background path pays for the GraphQL request (validation, counting), the queue
(the worker polls Redis), the progress and status writes, the storage round trip and verification,
the subscription and a second HTTP request; the stream pays only for the read. The script exits 1
when a check fails; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from _common import (
    FINAL,
    OUT_DIR,
    Stack,
    console,
    median_of,
    note_load,
    stack_env,
    warm,
    write_json,
)
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings
from sources.demo import ensure_demo_database

FORMATS = ("CSV", "NDJSON")


@dataclass
class Run:
    """One export of the rows by one path: milliseconds to the first and the last byte."""

    ttfb_ms: float
    first_row_ms: float  # the first byte of the first data row: after CSV's header line
    total_ms: float
    bytes: int
    sha256: str
    records: int
    checksum_ok: bool = True  # background only: the download's SHA-256 is the task's checksumSha256


@dataclass
class Series:
    format: str
    path: str  # "stream" or "background"
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return median_of([getattr(r, name) for r in self.runs])

    def spread(self, name: str) -> str:
        values = [getattr(r, name) for r in self.runs]
        return f"{min(values):.0f}-{max(values):.0f}" if values else ""


def count_records(data: bytes, file_format: str) -> int:
    if file_format == "CSV":
        reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
        next(reader, None)
        return sum(1 for _ in reader)
    return sum(1 for line in data.splitlines() if line.strip())


async def read_timed(
    http: httpx.AsyncClient, method: str, url: str, started: float, file_format: str, **kwargs
) -> tuple[float, float, float, bytes]:
    """(ms to the first body byte, to the first byte of the first data row, to the last byte; the
    body), all from ``started``. CSV's first row starts after the header line (names hold no newline)."""
    first = first_row = None
    body = bytearray()
    async with http.stream(method, url, **kwargs) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{method} {url}: HTTP {response.status_code} {response.text[:300]}")
        async for chunk in response.aiter_raw():
            now = time.perf_counter()
            body += chunk
            if first is None and chunk:
                first = now
            if first_row is None and body:
                header_end = body.find(b"\n") + 1 if file_format == "CSV" else 0
                if (header_end > 0 or file_format != "CSV") and len(body) > header_end:
                    first_row = now
    done = time.perf_counter()
    ttfb, first_row_ms, total = (((t or done) - started) * 1000 for t in (first, first_row, done))
    return ttfb, first_row_ms, total, bytes(body)


async def stream_once(base_url: str, token: str, file_format: str) -> Run:
    async with httpx.AsyncClient(timeout=120) as http:
        started = time.perf_counter()
        ttfb, first_row, total, body = await read_timed(
            http,
            "GET",
            f"{base_url}/exports/stream",
            started,
            file_format,
            params={"dataset": "samples", "format": file_format.lower()},
            headers={"Authorization": f"Bearer {token}"},
        )
    return Run(ttfb, first_row, total, len(body), hashlib.sha256(body).hexdigest(), count_records(body, file_format))


async def background_once(base_url: str, secret: str, file_format: str) -> Run:
    """The same rows through requestExport, the queue and the worker, followed and downloaded."""
    client = DataportClient(base_url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(6)}"))
    async with httpx.AsyncClient(timeout=120) as http:
        started = time.perf_counter()
        task = await client.request_export({"dataset": "samples", "format": file_format})
        async for snapshot in client.follow(task["id"]):
            task = snapshot
            if task["status"] in FINAL:
                break
        if task["status"] != "SUCCEEDED" or not task.get("downloadUrl"):
            raise RuntimeError(f"the export ended {task['status']}: {task.get('error')}")
        ttfb, first_row, total, body = await read_timed(http, "GET", task["downloadUrl"], started, file_format)
    sha256 = hashlib.sha256(body).hexdigest()
    return Run(
        ttfb,
        first_row,
        total,
        len(body),
        sha256,
        count_records(body, file_format),
        checksum_ok=sha256 == task["checksumSha256"],
    )


async def measure(stack: Stack, secret: str, runs: int) -> list[Series]:
    token = issue_token(Settings(jwt_secret=secret), "bench-stream")
    series: list[Series] = []
    for file_format in FORMATS:
        stream, background = Series(file_format, "stream"), Series(file_format, "background")
        await stream_once(stack.url, token, file_format)  # warm-up: connections, caches, imports
        await background_once(stack.url, secret, file_format)
        for i in range(runs):
            order = [
                (stream, stream_once(stack.url, token, file_format)),
                (background, background_once(stack.url, secret, file_format)),
            ]
            for target, run in order if i % 2 == 0 else reversed(order):
                target.runs.append(await run)
        console.print(f"  {file_format}: {runs} runs of each path done")
        series += [stream, background]
    return series


def checks_of(series: list[Series], rows: int) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    by = {(s.format, s.path): s for s in series}
    for file_format in FORMATS:
        stream, background = by[(file_format, "stream")], by[(file_format, "background")]
        checks[f"{file_format} records"] = all(r.records == rows for r in stream.runs + background.runs)
        checks[f"{file_format} sha256"] = all(r.checksum_ok for r in background.runs)
        hashes = {r.sha256 for r in stream.runs + background.runs}
        checks[f"{file_format} stream == worker file"] = len(hashes) == 1
    return checks


# --- report --------------------------------------------------------------------------------------


def print_table(series: list[Series], rows: int, runs: int) -> None:
    table = Table(
        title=f"{rows:,} demo rows (58 columns): GET /exports/stream against requestExport -> "
        f"SUCCEEDED -> download; median (min-max) of {runs} runs, ms; x = background / stream"
    )
    for name in ("format", "path", "TTFB", "first row", "total", "bytes", "x TTFB", "x first row", "x total"):
        table.add_column(name, justify="left" if name in ("format", "path") else "right")
    by = {(s.format, s.path): s for s in series}
    for s in series:
        ratios = ["", "", ""]
        if s.path == "background":
            peer = by[(s.format, "stream")]
            ratios = [f"{s.median(n) / peer.median(n):.1f}x" for n in ("ttfb_ms", "first_row_ms", "total_ms")]
        table.add_row(
            s.format,
            s.path,
            *(f"{s.median(n):.0f} ({s.spread(n)})" for n in ("ttfb_ms", "first_row_ms", "total_ms")),
            f"{s.runs[0].bytes:,}",
            *ratios,
        )
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="demo rows (at most the stream limit)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "stream_route.json")
    args = parser.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    data_dir = OUT_DIR / f"data-{args.rows}"
    warm(ensure_demo_database(data_dir, args.rows))  # cached between runs; not timed
    scratch = Path(tempfile.mkdtemp(prefix="stream_route-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack: Stack | None = None
    series: list[Series] = []
    error = None
    try:
        redis.start()
        stack = Stack(
            stack_env(
                data_dir,
                scratch / "files",
                redis.url,
                secret,
                port,
                demo_rows=str(args.rows),
                max_export_rows=str(args.rows),
                stream_max_rows=str(max(args.rows, 10_000)),
                stream_rate_per_user="100000",
                stream_rate_per_ip="100000",
            ),
            port,
            OUT_DIR / "logs" / "stream_route",
        )
        stack.start()
        os.sync()
        series = asyncio.run(measure(stack, secret, args.runs))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    checks = checks_of(series, args.rows) if series else {}
    if series:
        print_table(series, args.rows, args.runs)
    failed = [name for name, ok in checks.items() if not ok]
    if error:
        console.print(f"[red]error:[/red] {error} (logs in {OUT_DIR / 'logs' / 'stream_route'})")
    console.print(
        "checks: "
        + (
            "[green]ok[/green]"
            if checks and not failed
            else f"[red]FAILED: {', '.join(failed) or 'nothing measured'}[/red]"
        )
    )
    write_json(
        args.out,
        "stream_route",
        load_average_at_start=load,
        settings={"rows": args.rows, "runs": args.runs, "storage": "local"},
        series=[
            {
                **asdict(s),
                "median_ttfb_ms": s.median("ttfb_ms"),
                "median_first_row_ms": s.median("first_row_ms"),
                "median_total_ms": s.median("total_ms"),
            }
            for s in series
        ],
        checks=checks,
        error=error,
    )
    console.print(f"numbers in {args.out}")
    return 0 if checks and not failed and error is None else 1


if __name__ == "__main__":
    sys.exit(main())
