"""Live progress at scale (issue 19, item 1): N subscribers on one running export, against a raw
Redis ``SUBSCRIBE`` on the task's channel in the same run as the reference clock.

    python bench/subscribers.py                    # 1,000 subscribers
    python bench/subscribers.py --subscribers 1000 5000
    python bench/subscribers.py --rows 300000      # a longer export, more snapshots

Each size is one run: ``dataport api`` on an embedded Redis with the demo dataset of ``--rows``
rows; this process (the load generator, its own process) opens N WebSockets, each with one
``exportProgress`` subscription to the same export requested while no worker runs (PENDING); once
every subscriber has its first snapshot, the api's RSS is read (idle subscribers), then a
``dataport worker`` starts and runs the export (NDJSON, every column) to the end. Every snapshot a
subscriber receives is matched, by status and processed rows, with the moment the raw subscriber
saw it published: the difference is the extra delay the api adds (its fan-out, coalescing,
GraphQL execution and WebSocket write, plus this process's own reading of N sockets).

Reported per size: extra delay p50/p95/p99 over every delivery, the api's Redis connections (the
most seen, sampled every 100 ms), the api's RSS per idle subscriber ((RSS with N idle - RSS
before) / N), pushes per subscriber, the api's CPU per snapshot delivered (from the worker's start
to the last completion), this process's own CPU per snapshot read over the same time (the clients:
on a small machine they compete with the api for the same cores), and the load average.
Targets (issue 19): p95 extra delay < 250 ms at 1,000 and < 1 s at 5,000; Redis connections
<= 10; < 100 KiB per idle subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil
from _common import OUT_DIR, REPO_DIR, Stack, console, note_load, stack_env, write_json
from rich.table import Table

sys.path.insert(0, str(REPO_DIR))
from api.auth import issue_token  # noqa: E402
from dataport.embedded_redis import EmbeddedRedis  # noqa: E402
from dataport.net import free_port, wait_for_port  # noqa: E402
from dataport.processes import stop  # noqa: E402
from dataport.settings import Settings  # noqa: E402
from sources.demo import ensure_demo_database  # noqa: E402
from tests.fanout_client import PROGRESS, ReferenceClock, Subscriber, percentile, redis_connections, subscriber  # noqa: E402

KiB = 1024


def request_export(url: str, token: str) -> str:
    # every column; each run's user is new, so the export is too
    query = (
        'mutation { requestExport(input: {dataset: "samples", format: NDJSON}) { task { id } userErrors { message } } }'
    )
    body = httpx.post(f"{url}/graphql", json={"query": query}, headers={"Authorization": f"Bearer {token}"}).json()
    payload = body["data"]["requestExport"]
    assert not payload["userErrors"], payload
    return payload["task"]["id"]


async def one_size(count: int, rows: int, redis_url: str, scratch: Path) -> dict[str, Any]:
    data_dir = OUT_DIR / f"data-{rows}"
    ensure_demo_database(data_dir, rows)
    secret, port = secrets.token_urlsafe(32), free_port()
    env = stack_env(
        data_dir,
        scratch / f"files-{count}",
        redis_url,
        secret,
        port,
        demo_rows=str(rows),
        max_export_rows=str(rows),
        max_subscriptions_per_user=str(count + 10),
        max_active_tasks_per_user="1000",
        log_format="text",
    )
    stack = Stack(env, port, OUT_DIR / "logs" / f"subscribers-{count}")
    stack.logs.mkdir(parents=True, exist_ok=True)
    token = issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(3)}")
    subs: list[Subscriber] = []
    connections: list[int] = []
    clock: ReferenceClock | None = None
    try:
        stack.api = stack._spawn("api", "--port", str(port), log=stack.logs / "api.log")
        wait_for_port("127.0.0.1", port, timeout=60)
        api = psutil.Process(stack.api.pid)
        task_id = request_export(stack.url, token)
        clock = ReferenceClock(redis_url, task_id)
        await clock.start()
        rss_before = api.memory_info().rss

        async def sample() -> None:
            while True:
                connections.append(redis_connections(api.pid, urlparse(redis_url).port or 0))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        gate = asyncio.Semaphore(100)

        async def connect() -> Subscriber:
            async with gate:
                return await subscriber(stack.url, token, PROGRESS, {"id": task_id})

        subs = list(await asyncio.gather(*(connect() for _ in range(count))))
        deadline = time.monotonic() + 120
        while not all(s.first_ready() for s in subs):
            assert time.monotonic() < deadline, "not every subscriber got its first snapshot"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        rss_idle = api.memory_info().rss

        cpu = api.cpu_times()
        cpu_before = cpu.user + cpu.system
        own_before = time.process_time()
        stack.worker = stack._spawn("worker", log=stack.logs / "worker.log")
        worker_started = time.monotonic()
        deadline = time.monotonic() + 600
        while not all(s.ended.get("1") for s in subs):
            assert time.monotonic() < deadline, "not every subscription completed"
            await asyncio.sleep(0.1)
        sampler.cancel()
        cpu = api.cpu_times()
        api_cpu = cpu.user + cpu.system - cpu_before
        own_cpu = time.process_time() - own_before
        running = time.monotonic() - worker_started

        delays: list[float] = []
        pushes: list[int] = []
        finals = 0
        errors = [p for sub in subs for _, p in sub.received.get("1", []) if p.get("errors")]
        if errors:
            console.print(f"[red]{len(errors)} subscriptions ended with an error, e.g. {errors[0]}[/red]")
        for sub in subs:
            snapshots = sub.snapshots()
            pushes.append(len(snapshots))
            finals += bool(snapshots) and snapshots[-1][1]["status"] == "SUCCEEDED"
            for at, snap in snapshots[1:]:  # the first is read, not published
                published = clock.seen.get((snap["status"], snap["progress"]["processedRows"]))
                if published is not None:
                    delays.append(at - published)
        return {
            "subscribers": count,
            "published": len(clock.seen),
            "deliveries": len(delays),
            "final_status_received": finals,
            "errors": len(errors),
            "delay_ms": {p: round(percentile(delays, p) * 1000, 1) for p in (50, 95, 99)},
            "pushes_per_subscriber_median": sorted(pushes)[len(pushes) // 2],
            "api_redis_connections_max": max(connections),
            # the api's CPU from the worker's start to the last completion, per snapshot delivered
            "api_cpu_us_per_delivery": round(api_cpu / max(1, sum(pushes)) * 1e6),
            # this process's own (the N clients reading their sockets), to tell whose CPU ran out
            "loadgen_cpu_us_per_delivery": round(own_cpu / max(1, sum(pushes)) * 1e6),
            "seconds_from_worker_start_to_last_completion": round(running, 1),
            "api_rss_before_mib": round(rss_before / 2**20, 1),
            "api_rss_idle_mib": round(rss_idle / 2**20, 1),
            "api_rss_per_idle_subscriber_kib": round((rss_idle - rss_before) / count / KiB, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
        if clock is not None:
            await clock.stop()
        for process in (stack.worker, stack.api):
            if process is not None:
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1000])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * max(args.subscribers) + 1024)), hard))
    note_load()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-subscribers-") as scratch:
        redis = EmbeddedRedis(Path(scratch) / "redis").start()
        try:
            for count in args.subscribers:
                results.append(asyncio.run(one_size(count, args.rows, redis.url, Path(scratch))))
        finally:
            redis.stop()
    table = Table(title="N subscribers on one export: extra delay over a raw Redis SUBSCRIBE")
    columns = ("subscribers", "p50 ms", "p95 ms", "p99 ms", "pushes", "final", "redis conns", "KiB/idle sub")
    columns += ("api µs/push", "clients µs/push", "load")
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        d = r["delay_ms"]
        table.add_row(
            f"{r['subscribers']:,}",
            f"{d[50]:.0f}",
            f"{d[95]:.0f}",
            f"{d[99]:.0f}",
            str(r["pushes_per_subscriber_median"]),
            f"{r['final_status_received']:,}",
            str(r["api_redis_connections_max"]),
            f"{r['api_rss_per_idle_subscriber_kib']:.1f}",
            str(r["api_cpu_us_per_delivery"]),
            str(r["loadgen_cpu_us_per_delivery"]),
            " ".join(f"{x:.2f}" for x in r["load_average"]),
        )
    console.print(table)
    write_json(OUT_DIR / "subscribers.json", "subscribers", results=results)


if __name__ == "__main__":
    main()
