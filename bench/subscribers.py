"""Live progress at scale (issue 19, item 1): N subscribers on one running export, against a raw
Redis ``SUBSCRIBE`` on the task's channel in the same run as the reference clock.

    python bench/subscribers.py                    # 1,000 subscribers
    python bench/subscribers.py --subscribers 1000 5000
    python bench/subscribers.py --rows 300000      # a longer export, more snapshots
    python bench/subscribers.py --generator websockets   # the previous load generator, to compare

Each size is one run: ``dataport api`` on an embedded Redis with the demo dataset of ``--rows``
rows; this process (the load generator, its own process) opens N WebSockets, each with one
``exportProgress`` subscription to the same export requested while no worker runs (PENDING); once
every subscriber has its first snapshot, the api's RSS is read (idle subscribers), then a
``dataport worker`` starts and runs the export (NDJSON, every column) to the end. Every snapshot a
subscriber receives is matched, by status and processed rows, with the moment the raw subscriber
saw it published: the difference is the extra delay the api adds (its fan-out, coalescing,
GraphQL execution and WebSocket write, plus this process's own reading of N sockets).

The load generator competes with the api for the same cores, so it is kept lean
(``bench/ws_clients.py``: one ``asyncio.Protocol`` per socket on uvloop, frames read by hand, each
message kept as bytes with its arrival time and parsed after the run); ``--generator websockets``
runs the previous one (``tests/fanout_client.py``: the ``websockets`` library, a reader task and a
``json.loads`` per message) against the same api. The reference clock (``RedisClock``) is on the
same loop as the clients and read the same way, its time taken as the bytes arrive, so both
timestamps come from one clock at the same point of the loop.

Reported per size: extra delay p50/p95/p99 over every delivery, the api's Redis connections (the
most seen, counted every 100 ms by ``RedisConnections``; checked against psutil's count once at the
end), the api's RSS per idle subscriber ((RSS with N idle - RSS before) / N), pushes per
subscriber, the api's CPU per snapshot delivered (from the worker's start to the last completion),
this process's own CPU per snapshot read over the same time (the clients: on a small machine they
compete with the api for the same cores; the connection counter's /proc reading is given apart in
the JSON), and the load average. Checked: every subscriber ends with the final status, its
snapshots in the order the reference clock saw them published, and no errors.
Targets (issue 19): p95 extra delay < 250 ms at 1,000 and < 1 s at 5,000; Redis connections
<= 10; < 100 KiB per idle subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import httpx
import psutil
import uvloop
import ws_clients
from _common import OUT_DIR, REPO_DIR, Stack, console, note_load, stack_env, write_json
from redis.asyncio import Redis
from rich.table import Table

sys.path.insert(0, str(REPO_DIR))
from api.auth import issue_token  # noqa: E402
from dataport.embedded_redis import EmbeddedRedis  # noqa: E402
from dataport.net import free_port, wait_for_port  # noqa: E402
from dataport.processes import stop  # noqa: E402
from dataport.settings import Settings  # noqa: E402
from sources.demo import ensure_demo_database  # noqa: E402
from tasks.store import channel  # noqa: E402
from tests.fanout_client import PROGRESS, Subscriber, percentile, redis_connections, subscriber  # noqa: E402

KiB = 1024
Snapshot = tuple[str, int, int | None]  # status, processed rows, total rows


class RedisClock(asyncio.Protocol):
    """The reference clock: a raw Redis ``SUBSCRIBE`` on the task's channel, on the clients' loop and
    read like them, the time taken in ``data_received``. ``tests.fanout_client.ReferenceClock`` takes
    it in a task, once the loop has run every callback ready before it: on a busy loop that is late
    (with the ``websockets`` generator at 5,000, 190 ms late at the median and 1.2 s at worst, so
    that deliveries came out up to 1.7 s "before" their publication)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel.encode()
        self.messages: list[tuple[float, bytes]] = []  # (arrival, payload), parsed after the run
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(self.channel), self.channel))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        data, pos = self._buffer + data, 0
        while (parsed := resp(data, pos)) is not None:
            reply, pos = parsed
            if isinstance(reply, list) and reply[0] == b"message":
                self.messages.append((now, reply[2]))
            elif isinstance(reply, list) and reply[0] == b"subscribe" and not self.subscribed.done():
                self.subscribed.set_result(None)
        self._buffer = data[pos:]

    @property
    def seen(self) -> dict[Snapshot, list[float]]:
        """When each snapshot, by status, processed rows and total rows, was published: every time,
        in order. A key can come twice (the worker writes PROCESSING with 0 rows twice as it starts,
        and a write may change no number shown); a subscriber's n-th delivery of a key is matched
        with its n-th publication, never a later one, so a delay is never understated."""
        seen: dict[Snapshot, list[float]] = {}
        for at, payload in self.messages:
            fields = json.loads(payload)
            rows, total = int(fields.get("processed_rows") or 0), fields.get("total_rows")
            seen.setdefault((fields["status"], rows, int(total) if total else None), []).append(at)
        return seen


def resp(data: bytes, pos: int) -> tuple[Any, int] | None:
    """One RESP2 reply from ``data`` at ``pos`` and the position after it; None if incomplete."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, head = data[pos : pos + 1], data[pos + 1 : end]
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, end + 2
        if len(data) < end + 2 + size + 2:
            return None
        return data[end + 2 : end + 2 + size], end + 2 + size + 2
    if kind == b"*":
        items, pos = [], end + 2
        for _ in range(int(head)):
            parsed = resp(data, pos)
            if parsed is None:
                return None
            item, pos = parsed
            items.append(item)
        return items, pos
    return head, end + 2  # +simple, -error, :integer


class RedisConnections:
    """The api's established connections to Redis, cheaply enough to count every 100 ms with thousands
    of sockets open. ``tests.fanout_client.redis_connections`` (psutil) reads every fd of the api and
    parses the whole TCP table on each call: 30-65 ms of CPU at 1,000 subscribers, 90-185 ms at 5,000
    (both ends of every WebSocket are on this host), on the clients' own loop. Here each count is Redis's
    ``CLIENT LIST`` (a few dozen lines); /proc is read only when a connection appears that has not
    been seen before, to learn whether the api holds it."""

    def __init__(self, api_pid: int, redis_url: str) -> None:
        self.pid = api_pid
        self.redis = Redis.from_url(redis_url)
        self.api_holds: dict[int, bool] = {}  # Redis's client id -> whether the api holds that connection
        self.cpu = 0.0  # seconds spent reading /proc
        port = urlparse(redis_url).port or 6379
        # a line of /proc/net/tcp{,6} for an established connection to Redis: the local port, the inode
        self._line = re.compile(rb"^ *\d+: [0-9A-F]+:([0-9A-F]{4}) [0-9A-F]+:%04X 01 (?:\S+ +){5}(\d+)" % port, re.M)

    async def count(self) -> int:
        clients = [(int(c["id"]), int(c["addr"].rsplit(":", 1)[1])) for c in await self.redis.client_list()]
        new = {cid: port for cid, port in clients if cid not in self.api_holds}
        if new:
            started = time.thread_time()
            self._attribute(new)
            self.cpu += time.thread_time() - started
        return sum(self.api_holds[cid] for cid, _ in clients)

    def _attribute(self, new: dict[int, int]) -> None:
        inode_of: dict[int, bytes] = {}
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(name, "rb") as f:
                inode_of.update((int(port, 16), inode) for port, inode in self._line.findall(f.read()))
        api: set[bytes] = set()
        fds = f"/proc/{self.pid}/fd/"
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                link = os.readlink(fds + fd)
                if link.startswith("socket:["):
                    api.add(link[8:-1].encode())
        for cid, port in new.items():
            self.api_holds[cid] = inode_of.get(port) in api

    async def close(self) -> None:
        await self.redis.aclose()


def request_export(url: str, token: str) -> str:
    # every column; each run's user is new, so the export is too
    query = (
        'mutation { requestExport(input: {dataset: "samples", format: NDJSON}) { task { id } userErrors { message } } }'
    )
    body = httpx.post(f"{url}/graphql", json={"query": query}, headers={"Authorization": f"Bearer {token}"}).json()
    payload = body["data"]["requestExport"]
    assert not payload["userErrors"], payload
    return payload["task"]["id"]


async def connect_lean(url: str, token: str, task_id: str, count: int) -> ws_clients.Fleet:
    fleet = ws_clients.Fleet(count)
    await fleet.connect(url, token, PROGRESS, {"id": task_id})
    await asyncio.wait_for(fleet.all_first, 120)
    return fleet


async def connect_websockets(url: str, token: str, task_id: str, count: int) -> list[Subscriber]:
    gate = asyncio.Semaphore(100)

    async def connect() -> Subscriber:
        async with gate:
            return await subscriber(url, token, PROGRESS, {"id": task_id})

    subs = list(await asyncio.gather(*(connect() for _ in range(count))))
    deadline = time.monotonic() + 120
    while not all(s.first_ready() for s in subs):
        assert time.monotonic() < deadline, "not every subscriber got its first snapshot"
        await asyncio.sleep(0.05)
    return subs


async def one_size(count: int, rows: int, redis_url: str, scratch: Path, generator: str) -> dict[str, Any]:
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
    fleet: ws_clients.Fleet | None = None
    subs: list[Subscriber] = []
    connections: list[int] = []
    clock: RedisClock | None = None
    counter: RedisConnections | None = None
    try:
        stack.api = stack._spawn("api", "--port", str(port), log=stack.logs / "api.log")
        wait_for_port("127.0.0.1", port, timeout=60)
        api = psutil.Process(stack.api.pid)
        task_id = request_export(stack.url, token)
        clock = RedisClock(channel(task_id))
        redis_address = urlparse(redis_url)
        await asyncio.get_running_loop().create_connection(lambda: clock, redis_address.hostname, redis_address.port)
        await asyncio.wait_for(clock.subscribed, 10)
        rss_before = api.memory_info().rss

        counter = RedisConnections(api.pid, redis_url)

        async def sample() -> None:
            assert counter is not None
            while True:
                connections.append(await counter.count())
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        if generator == "lean":
            fleet = await connect_lean(stack.url, token, task_id, count)
        else:
            subs = await connect_websockets(stack.url, token, task_id, count)
        await asyncio.sleep(1.0)
        rss_idle = api.memory_info().rss

        cpu = api.cpu_times()
        cpu_before = cpu.user + cpu.system
        own_before, times_before, sampler_before = time.process_time(), os.times(), counter.cpu
        stack.worker = stack._spawn("worker", log=stack.logs / "worker.log")
        worker_started = time.monotonic()
        if fleet is not None:
            await asyncio.wait_for(fleet.all_ended, 600)
        else:
            deadline = time.monotonic() + 600
            while not all(s.ended.get("1") for s in subs):
                assert time.monotonic() < deadline, "not every subscription completed"
                await asyncio.sleep(0.1)
        sampler.cancel()
        cpu = api.cpu_times()
        api_cpu = cpu.user + cpu.system - cpu_before
        sampler_own = counter.cpu - sampler_before
        own_cpu = time.process_time() - own_before - sampler_own
        own_times = os.times()
        own_user, own_system = own_times.user - times_before.user, own_times.system - times_before.system
        running = time.monotonic() - worker_started
        # the count checked against psutil's, once, after the measured time
        started = time.process_time()
        psutil_count = redis_connections(api.pid, urlparse(redis_url).port or 0)
        psutil_ms = (time.process_time() - started) * 1000
        counted = await counter.count()
        if psutil_count != counted:
            console.print(f"[red]the api's Redis connections: {counted} counted, {psutil_count} by psutil[/red]")

        # Per subscriber: its snapshots (arrival time, snapshot) and its errors; parsed only now.
        if fleet is not None:
            outcomes = [(sub.snapshots(), sub.errors()) for sub in fleet.subscribers]
            ended = Counter(sub.ended for sub in fleet.subscribers)
            problems = [sub.problem for sub in fleet.subscribers if sub.problem]
        else:
            outcomes = [(sub.snapshots(), [p for _, p in sub.received.get("1", []) if p.get("errors")]) for sub in subs]
            ended = Counter(sub.ended.get("1") for sub in subs)
            problems = []
        seen = clock.seen
        published = {key: i for i, key in enumerate(seen)}  # the order the clock saw them in
        delays: list[float] = []
        pushes: list[int] = []
        finals = out_of_order = 0
        errors = [e for _, errs in outcomes for e in errs]
        if errors:
            console.print(f"[red]{len(errors)} subscriptions ended with an error, e.g. {errors[0]}[/red]")
        for snapshots, _ in outcomes:
            pushes.append(len(snapshots))
            finals += bool(snapshots) and snapshots[-1][1]["status"] == "SUCCEEDED"
            order = []
            delivered: Counter[Snapshot] = Counter()
            for at, snap in snapshots[1:]:  # the first is read, not published
                progress = snap["progress"]
                key = (snap["status"], progress["processedRows"], progress["totalRows"])
                if key in published:
                    times = seen[key]
                    delays.append(at - times[min(delivered[key], len(times) - 1)])
                    delivered[key] += 1
                    order.append(published[key])
            # non-decreasing: two versions can share a key (a write that changed no number shown)
            out_of_order += any(a > b for a, b in zip(order, order[1:], strict=False))
        if out_of_order or problems:
            console.print(f"[red]{out_of_order} subscribers out of order; problems: {problems[:3]}[/red]")
        return {
            "subscribers": count,
            "generator": generator,
            "published": len(seen),
            "deliveries": len(delays),
            "final_status_received": finals,
            "errors": len(errors),
            "out_of_order": out_of_order,
            "ended": dict(ended),
            "protocol_problems": len(problems),
            "delay_ms": {p: round(percentile(delays, p) * 1000, 1) for p in (50, 95, 99)},
            "pushes_per_subscriber_median": sorted(pushes)[len(pushes) // 2],
            "api_redis_connections_max": max(connections),
            "api_redis_connections_at_end_psutil": psutil_count,
            "psutil_count_cpu_ms": round(psutil_ms, 1),  # what one count cost when psutil sampled every 100 ms
            # the api's CPU from the worker's start to the last completion, per snapshot delivered
            "api_cpu_us_per_delivery": round(api_cpu / max(1, sum(pushes)) * 1e6),
            # this process's own (the N clients reading their sockets, and the reference clock), to
            # tell whose CPU ran out; the connection counter's reading of /proc apart
            "loadgen_cpu_us_per_delivery": round(own_cpu / max(1, sum(pushes)) * 1e6),
            "sampler_cpu_us_per_delivery": round(sampler_own / max(1, sum(pushes)) * 1e6),
            # the whole process's, user and kernel (reading N sockets is N recv() and epoll events)
            "loadgen_user_us_per_delivery": round(own_user / max(1, sum(pushes)) * 1e6),
            "loadgen_system_us_per_delivery": round(own_system / max(1, sum(pushes)) * 1e6),
            "seconds_from_worker_start_to_last_completion": round(running, 1),
            "api_rss_before_mib": round(rss_before / 2**20, 1),
            "api_rss_idle_mib": round(rss_idle / 2**20, 1),
            "api_rss_per_idle_subscriber_kib": round((rss_idle - rss_before) / count / KiB, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        if fleet is not None:
            await fleet.close()
        await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
        if clock is not None and clock.transport is not None:
            clock.transport.close()
        if counter is not None:
            await counter.close()
        for process in (stack.worker, stack.api):
            if process is not None:
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1000])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--generator", choices=("lean", "websockets"), default="lean")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * max(args.subscribers) + 1024)), hard))
    note_load()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-subscribers-") as scratch:
        redis = EmbeddedRedis(Path(scratch) / "redis").start()
        try:
            for count in args.subscribers:
                size = one_size(count, args.rows, redis.url, Path(scratch), args.generator)
                # the lean clients on uvloop; the previous generator as it ran, on asyncio's own loop
                results.append(uvloop.run(size) if args.generator == "lean" else asyncio.run(size))
        finally:
            redis.stop()
    title = f"N subscribers on one export: extra delay over a raw Redis SUBSCRIBE (clients: {args.generator})"
    table = Table(title=title)
    columns = ["subscribers", "p50 ms", "p95 ms", "p99 ms", "pushes", "final", "redis conns", "KiB/idle sub"]
    columns += ["api µs/push", "clients µs/push", "load"]
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
