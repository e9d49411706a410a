"""Audit-log benchmark: ``requestExport`` and ``exportTask`` with the audit log on against off.

Command (from the repository root)::

    python bench/audit.py                    # 5 rounds of 200 requests each, 8 at a time
    python bench/audit.py --rounds 9 --requests 400 --concurrency 16

What it does:

1. Two stacks on one embedded Redis, side by side: ``dataport api`` + ``dataport worker`` with
   ``DATAPORT_AUDIT_STORE=sqlite`` (on: every request appends to the outbox, the worker drains it
   every second) and with ``none`` (off). Same demo dataset (1,000 rows), limits and quota out of
   reach.
2. ``--rounds`` rounds, the two stacks taking turns within each round (on, off; then off, on), so
   drift in the machine's load hits both alike. A round sends ``--requests`` requests,
   ``--concurrency`` at a time, of each operation:

   * ``requestExport``: each request as a fresh user, so each creates a task (the whole path: rate
     limits, access, the count on the source, the task script with its audit record, the queue);
   * ``exportTask``: one finished task read again and again, ``downloadUrl`` included (with the log
     on, reading the link remembers who it was issued to: one Redis SET).

How to read the result: per operation and stack, the median over rounds of the median latency
(ms), of the 95th percentile, and of requests per second; ``on / off`` is the ratio of the medians
(latency: lower is better; the target is within 10 %, i.e. at most 1.10, and requests per second at
least 0.90). The JSON goes to ``--out``; the script exits 1 when a request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import OUT_DIR, Stack, console, median_of, note_load, stack_env, write_json
from rich.table import Table

from api.auth import issue_token
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings
from sources.demo import ensure_demo_database

REQUEST = """mutation($i: ExportInput!) { requestExport(input: $i) { task { id status } userErrors { code } } }"""
READ = """query($id: ID!) { exportTask(id: $id) { id status rowCount downloadUrl } }"""
DATASET = """
[datasets.samples]
source = "sqlite"
url = "{db}"
table = "samples"
key = ["sample_id"]
"""


@dataclass
class Series:
    stack: str
    operation: str
    latencies_ms: list[list[float]] = field(default_factory=list)  # one list per round
    rates: list[float] = field(default_factory=list)

    def median(self) -> float:
        return median_of([statistics.median(r) for r in self.latencies_ms])

    def p95(self) -> float:
        return median_of([statistics.quantiles(r, n=20)[18] for r in self.latencies_ms])

    def rate(self) -> float:
        return median_of(self.rates)


async def burst(url: str, bodies: list[tuple[str, dict]], concurrency: int) -> tuple[list[float], float]:
    """Send every (token, body), ``concurrency`` at a time: (latencies in ms, requests per second)."""
    latencies: list[float] = []
    queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def client() -> None:
            while not queue.empty():
                token, body = queue.get_nowait()
                started = time.perf_counter()
                response = await http.post(f"{url}/graphql", json=body, headers={"Authorization": f"Bearer {token}"})
                latencies.append((time.perf_counter() - started) * 1000)
                data = response.json()
                if response.status_code != 200 or data.get("errors"):
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
                payload = data["data"].get("requestExport")
                if payload is not None and payload["userErrors"]:
                    raise RuntimeError(f"requestExport: {payload['userErrors']}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, len(bodies) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "audit.json")
    args = parser.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="audit-", dir=OUT_DIR))
    db = ensure_demo_database(scratch / "data", 1000)
    datasets = scratch / "datasets.toml"
    datasets.write_text(DATASET.format(db=db))
    redis = EmbeddedRedis(scratch / "redis")
    secret = secrets.token_urlsafe(32)
    stacks: dict[str, Stack] = {}
    series = {(s, op): Series(s, op) for s in ("on", "off") for op in ("requestExport", "exportTask")}
    try:
        redis.start()
        for name, store in (("on", "sqlite"), ("off", "none")):
            port = free_port()
            env = stack_env(
                scratch / name,
                scratch / name / "files",
                redis.url,
                secret,
                port,
                datasets=datasets,
                audit_store=store,
                audit_drain_seconds="1",
                mutation_rate_per_user="1000000",
                mutation_rate_per_ip="1000000",
                max_active_tasks_per_user="1000000",
            )
            stacks[name] = Stack(env, port, scratch / name / "logs")
            stacks[name].start()
        settings = Settings(jwt_secret=secret)
        reader = issue_token(settings, "bench-reader")
        finished: dict[str, str] = {}
        for name, stack in stacks.items():  # the task exportTask reads, finished
            body = {"query": REQUEST, "variables": {"i": {"dataset": "samples", "format": "CSV", "limit": 10}}}
            asked = httpx.post(f"{stack.url}/graphql", json=body, headers={"Authorization": f"Bearer {reader}"})
            finished[name] = asked.json()["data"]["requestExport"]["task"]["id"]
        for round_ in range(args.rounds + 1):  # round 0 warms both up, untimed
            order = ("on", "off") if round_ % 2 else ("off", "on")
            for name in order:
                url = stacks[name].url
                tokens = [issue_token(settings, f"bench-{uuid.uuid4().hex[:10]}") for _ in range(args.requests)]
                ask = {"query": REQUEST, "variables": {"i": {"dataset": "samples", "format": "CSV", "limit": 10}}}
                latencies, rate = asyncio.run(burst(url, [(t, ask) for t in tokens], args.concurrency))
                if round_:
                    series[name, "requestExport"].latencies_ms.append(latencies)
                    series[name, "requestExport"].rates.append(rate)
                read = {"query": READ, "variables": {"id": finished[name]}}
                latencies, rate = asyncio.run(burst(url, [(reader, read)] * args.requests, args.concurrency))
                if round_:
                    series[name, "exportTask"].latencies_ms.append(latencies)
                    series[name, "exportTask"].rates.append(rate)
    finally:
        for stack in stacks.values():
            stack.stop()
        redis.stop()

    title = f"audit log on vs off: {args.rounds} rounds x {args.requests} requests, {args.concurrency} at once"
    table = Table(title=title)
    for column in ("operation", "stack", "median ms", "p95 ms", "requests/s", "on / off"):
        table.add_column(column, justify="right" if column not in ("operation", "stack") else "left")
    result = {}
    missed = False
    for op in ("requestExport", "exportTask"):
        on, off = series["on", op], series["off", op]
        latency_ratio, rate_ratio = on.median() / off.median(), on.rate() / off.rate()
        missed |= latency_ratio > 1.10 or rate_ratio < 0.90
        for s in (off, on):
            ratio = f"latency {latency_ratio:.3f}, rate {rate_ratio:.3f}" if s is on else ""
            table.add_row(op, s.stack, f"{s.median():.1f}", f"{s.p95():.1f}", f"{s.rate():.0f}", ratio)
        result[op] = {
            s.stack: {"median_ms": s.median(), "p95_ms": s.p95(), "requests_per_second": s.rate()} for s in (off, on)
        } | {"latency_on_off": latency_ratio, "rate_on_off": rate_ratio}
    console.print(table)
    console.print("target (within 10 %):", "MISS" if missed else "met")
    write_json(args.out, "audit", load=note_load(), args=vars(args) | {"out": str(args.out)}, result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
