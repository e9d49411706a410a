"""Many GraphQL subscribers from one asyncio process, a raw Redis subscriber as the reference clock,
and a hand on the task store to drive a task as a worker would: what ``tests/test_fanout.py`` and
``bench/subscribers.py`` share."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import psutil
import websockets
from redis.asyncio import Redis

from tasks.models import TaskStatus, stamp
from tasks.store import TaskStore, channel

SNAPSHOT = "id status progress { processedRows totalRows }"
PROGRESS = f"subscription($id: ID!) {{ exportProgress(id: $id) {{ {SNAPSHOT} }} }}"
# The same, padded with aliases to about 2 KB a message: a stalled socket's buffers fill fast.
HEAVY = "subscription($id: ID!) {{ exportProgress(id: $id) {{ {} {} }} }}".format(
    SNAPSHOT, " ".join(f"p{i}: progress {{ processedRows totalRows percent bytes rowsPerSecond }}" for i in range(15))
)
UPDATES = f"subscription {{ taskUpdates {{ __typename ... on ExportTask {{ {SNAPSHOT} owner }} }} }}"


@dataclass
class Subscriber:
    """One WebSocket with one or more subscriptions; every ``next`` payload with its arrival time."""

    ws: Any
    received: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)  # operation id -> complete | error
    reader: asyncio.Task[None] | None = None

    def start_reading(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                kind, op = message["type"], message.get("id")
                if kind == "next":
                    self.received.setdefault(op, []).append((time.monotonic(), message["payload"]))
                elif kind in ("complete", "error"):
                    self.ended[op] = kind
                    if kind == "error":
                        self.received.setdefault(op, []).append((time.monotonic(), {"errors": message["payload"]}))
        except websockets.ConnectionClosed:
            pass

    def first_ready(self, op: str = "1") -> bool:
        return bool(self.received.get(op))

    def snapshots(self, op: str = "1", field_name: str = "exportProgress") -> list[tuple[float, dict[str, Any]]]:
        return [(at, p["data"][field_name]) for at, p in self.received.get(op, []) if p.get("data")]

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


async def subscriber(
    base_url: str,
    token: str,
    query: str,
    variables: dict[str, Any] | None = None,
    operations: int = 1,
    stalled: bool = False,
) -> Subscriber:
    """A socket with ``operations`` subscriptions to ``query``, acknowledged. ``stalled``: a tiny
    receive buffer and no reading at all (call ``start_reading`` to resume)."""
    url = base_url.replace("http", "ws", 1) + "/graphql"
    kwargs: dict[str, Any] = {"subprotocols": ["graphql-transport-ws"], "open_timeout": 60, "ping_interval": None}
    if stalled:
        parsed = urlparse(base_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((parsed.hostname, parsed.port))
        sock.setblocking(False)
        kwargs.update(sock=sock, max_queue=1, compression=None)  # deflate would shrink the padding away
    ws = await websockets.connect(url, **kwargs)
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
    ack = json.loads(await ws.recv())
    assert ack["type"] == "connection_ack", ack
    for op in range(1, operations + 1):
        payload = {"query": query, "variables": variables or {}}
        await ws.send(json.dumps({"id": str(op), "type": "subscribe", "payload": payload}))
    result = Subscriber(ws)
    if not stalled:
        result.start_reading()
    return result


class ReferenceClock:
    """A raw Redis SUBSCRIBE on the task's channel: when each snapshot (by processed rows and
    status) was published, as seen by a client with nothing between it and Redis."""

    def __init__(self, redis_url: str, task_id: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.task_id = task_id
        self.seen: dict[tuple[str, int], float] = {}
        self._pubsub = self.redis.pubsub()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(channel(self.task_id))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message:
                fields = json.loads(message["data"])
                key = (fields["status"], int(fields.get("processed_rows") or 0))
                self.seen.setdefault(key, time.monotonic())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._pubsub.aclose()
        await self.redis.aclose()


class Driver:
    """Moves a PENDING task as a worker would, through the real task store scripts."""

    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url, decode_responses=True)
        self.store = TaskStore(self.redis)

    async def start(self, task_id: str) -> None:
        result = await self.store.transition(
            task_id, TaskStatus.PROCESSING, "attempt 1", fields={"attempts": 1, "started_at": stamp()}
        )
        assert result.ok, result

    async def progress(self, task_id: str, rows: int, total: int) -> None:
        assert await self.store.progress(task_id, 1, {"processed_rows": rows, "total_rows": total})

    async def finish(self, task_id: str, rows: int) -> None:
        fields = {"finished_at": stamp(), "row_count": rows, "processed_rows": rows}
        result = await self.store.transition(task_id, TaskStatus.SUCCEEDED, "done", fields=fields)
        assert result.ok, result

    async def close(self) -> None:
        await self.redis.aclose()


def redis_connections(pid: int, redis_port: int) -> int:
    """TCP connections process ``pid`` holds to the Redis on ``redis_port``."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
