"""Admission control: past its capacity an api process answers at once with 503 and ``Retry-After``
instead of letting every request's latency grow without bound.

One event loop serves all of a process's requests, so each request admitted past what the CPU
can serve adds its cost to every other's latency: at twice its capacity a process answered
nothing in time (issue 19: 200 reads/s offered, ~20/s served, the rest timed out). Here at most
``api_max_in_flight`` HTTP requests are worked on at once; the next ones wait, first come first
served, up to ``api_queue_seconds`` for a slot, and a request still waiting then, or arriving when
``MAX_WAITING_FACTOR`` x the limit are waiting already, is refused: ``/graphql`` with a GraphQL body
(``extensions.code`` ``SERVICE_UNAVAILABLE``, ``extensions.retryAfterSeconds``), the plain routes with
``{"error": {"code": "SERVICE_UNAVAILABLE", …}}``; both HTTP 503 with ``Retry-After``. The whole
budget is for bursts: once the queue has not drained for ``STANDING_AFTER_SECONDS`` the process is
past its capacity, and newcomers wait ``STANDING_WAIT_SECONDS`` at most (``Slots``). A refusal costs
microseconds, so a process past capacity keeps serving what it admits at full speed.

A request holds its slot until its response starts (or it ends): a download or stream then
sends its body without holding one (streams have their own caps, api/stream_slots.py). What is
not counted: ``/healthz``, ``/readyz`` and ``/metrics`` (probes must see a busy process as alive),
WebSockets (bounded by the subscription quota), and ``PUT /uploads/…`` bodies (their time is the
client's network, bounded by the upload size limit). The middleware sits inside
``api/request_limits.py``, so a ``/graphql`` body is read before its request takes a slot: a slow
client holds a connection, not a slot. The bound is per process; ``api_workers`` processes hold
``api_workers`` x ``api_max_in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from dataport import errors
from dataport.settings import Settings

log = logging.getLogger("dataport.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
EXEMPT_PREFIXES = ("/uploads/",)
MAX_WAITING_FACTOR = 4
# A queue that has not drained for this long stands, and newcomers then wait this long at most.
STANDING_AFTER_SECONDS = 0.1
STANDING_WAIT_SECONDS = 0.01
RETRY_AFTER_SECONDS = 1
LOG_EVERY_SECONDS = 1.0
MESSAGE = "Dataport is busy; try again in a moment."

IN_FLIGHT = Gauge("dataport_api_requests_in_flight", "HTTP requests this api process is working on")
SHED = Counter("dataport_api_requests_shed", "HTTP requests this api process refused past its capacity (503)")


class Slots:
    """At most ``limit`` holders; waiters are served first come, first served. A queue that has not
    drained for ``standing_after`` seconds is standing: the process is past its capacity, not taking
    a burst, and a newcomer then waits ``standing_wait`` at most (CoDel's idea, as in Facebook's
    servers): under sustained overload the admitted requests keep their latency and the rest are
    refused at once, instead of every one of them waiting out the whole budget."""

    def __init__(
        self,
        limit: int,
        max_waiting: int,
        standing_after: float = STANDING_AFTER_SECONDS,
        standing_wait: float = STANDING_WAIT_SECONDS,
    ) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.standing_after = standing_after
        self.standing_wait = standing_wait
        self.held = 0
        self.drained_at = time.monotonic()  # when a request last found no queue
        self._waiting: deque[asyncio.Future[None]] = deque()

    def standing(self) -> bool:
        return time.monotonic() - self.drained_at > self.standing_after

    async def acquire(self, wait_seconds: float) -> bool:
        """Whether a slot was had within ``wait_seconds`` (``standing_wait`` when the queue stands)."""
        if self.held < self.limit and not self._waiting:
            self.held += 1
            self.drained_at = time.monotonic()
            return True
        if self.standing():
            wait_seconds = min(wait_seconds, self.standing_wait)
        if wait_seconds <= 0 or len(self._waiting) >= self.max_waiting:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), wait_seconds)
            return True
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return True  # handed a slot as the wait ran out: it is ours
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: pass it on
            waiter.cancel()
            raise

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.held -= 1
        self.drained_at = time.monotonic()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiting if not waiter.done())


class Admission:
    """The ASGI middleware (api/app.py adds it inside the body-size limit)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.queue_seconds = settings.api_queue_seconds
        self.slots = Slots(settings.api_max_in_flight, MAX_WAITING_FACTOR * settings.api_max_in_flight)
        self.refused = 0  # since the last log line
        self.logged_at = -LOG_EVERY_SECONDS

    def _log_refusal(self, scope: Scope, waited: float) -> None:
        """One line a second at most: past capacity, a line per refusal would add to the load."""
        self.refused += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY_SECONDS:
            log.info(
                "%d requests refused (SERVICE_UNAVAILABLE), the last %s %s after %.3f s: %d in flight, %d waiting",
                self.refused,
                scope.get("method"),
                scope["path"],
                waited,
                self.slots.held,
                self.slots.waiting,
            )
            self.refused, self.logged_at = 0, now

    @staticmethod
    def counted(scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        path: str = scope["path"]
        return path not in EXEMPT_PATHS and not path.startswith(EXEMPT_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.counted(scope):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        if not await self.slots.acquire(self.queue_seconds):
            SHED.inc()
            self._log_refusal(scope, time.monotonic() - started)
            await refuse(scope, send)
            return
        IN_FLIGHT.inc()
        held = True

        def free() -> None:
            nonlocal held
            if held:
                held = False
                IN_FLIGHT.dec()
                self.slots.release()

        async def send_freeing(message: Message) -> None:
            if message["type"] == "http.response.start":
                free()  # the work is done; the body may take the client's time
            await send(message)

        try:
            await self.app(scope, receive, send_freeing)
        finally:
            free()


async def refuse(scope: Scope, send: Send) -> None:
    """503 with ``Retry-After``: GraphQL-shaped for ``/graphql``, the plain routes' shape otherwise."""
    if scope["path"].rstrip("/") == "/graphql":
        extensions = {"code": errors.SERVICE_UNAVAILABLE, "retryAfterSeconds": RETRY_AFTER_SECONDS}
        body = orjson.dumps({"errors": [{"message": MESSAGE, "extensions": extensions}]})
    else:
        body = orjson.dumps({"error": {"code": errors.SERVICE_UNAVAILABLE, "message": MESSAGE}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
