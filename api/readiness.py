"""``GET /readyz``: can this api serve? Redis, storage, live workers, and every dataset's source.

Workers count as live while their heartbeat (``workers/heartbeat.py``) is fresh: with none, tasks
queue up and never run, so the service is not ready even though the api itself answers.

Each dataset is checked through the registry exactly as a request would read it: its source opens
and counts the rows of a one-column, one-row query, stopping at one. The checks run side by side,
each within ``timeout`` seconds, and the whole answer is kept ``cache_seconds``, shared by the
probes that arrive meanwhile, so a storm of probes reaches the stores once per period. Error
reasons are short and never carry a secret: credentials in URLs and connection strings are masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

from sources.base import Dataset
from sources.query import NO_ROWS, build_query
from tasks.services import Services
from workers.heartbeat import STALE_SECONDS, live_workers

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")
_KEY_VALUE_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api_key|apikey)\s*=\s*('[^']*'|\S+)")
MAX_REASON_CHARS = 200


def redact(text: str, *secrets: str) -> str:
    """``text`` without passwords: ``scheme://user:…@`` loses the password, ``password=…`` its
    value, and each of ``secrets`` (a dataset's URL) shows as its masked form."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", secret))
    text = _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
    return _KEY_VALUE_SECRET.sub(lambda m: f"{m.group(1)}=***", text)


def reason(error: BaseException, *secrets: str) -> str:
    """``error: <Type>: <first line of the message>``, masked and cut short."""
    message = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    text = redact(text, *secrets)
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return f"error: {text}"


class NoWorkers(Exception):
    pass


@dataclass
class Report:
    ready: bool
    body: dict[str, Any]


class Readiness:
    def __init__(self, timeout: float = 3.0, cache_seconds: float = 2.0):
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, Report] | None = None
        self._running: asyncio.Future[Report] | None = None

    async def report(self, services: Services) -> Report:
        """The cached report while it is fresh; else one run of the checks, shared by every caller
        that asks while it runs."""
        if self._cached is not None and time.monotonic() < self._cached[0]:
            return self._cached[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._run(services))
            self._running.add_done_callback(self._finished)
        return await asyncio.shield(self._running)

    def _finished(self, future: asyncio.Future[Report]) -> None:
        self._running = None
        if not future.cancelled() and future.exception() is None:
            self._cached = (time.monotonic() + self.cache_seconds, future.result())

    async def _run(self, services: Services) -> Report:
        names = [ds.name for ds in services.registry]
        settings = services.settings
        results = await asyncio.gather(
            self._guarded(self._redis(services), settings.redis_url),
            self._guarded(self._storage(services), settings.s3_secret_access_key or ""),
            self._guarded(self._workers(services)),
            *(self._guarded(self._dataset(services, ds), ds.url) for ds in services.registry),
        )
        checks = {"redis": results[0], "storage": results[1], "workers": results[2]}
        datasets = dict(zip(names, results[3:], strict=True))
        ready = all(v == "ok" for v in (*checks.values(), *datasets.values()))
        return Report(ready, {"ready": ready, "checks": checks, "datasets": datasets})

    async def _guarded(self, check, *secrets: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                await check
            return "ok"
        except TimeoutError:
            return f"error: no answer within {self.timeout:g} s"
        except Exception as e:  # readiness reports, it does not raise
            return reason(e, *secrets)

    @staticmethod
    async def _redis(services: Services) -> None:
        await services.redis.ping()

    @staticmethod
    async def _workers(services: Services) -> None:
        if not await live_workers(services.redis, services.settings.queue_name):
            raise NoWorkers(
                f"no worker on queue {services.settings.queue_name} has reported in the last {STALE_SECONDS:g} s"
            )

    @staticmethod
    async def _storage(services: Services) -> None:
        await services.storage.check()

    @staticmethod
    async def _dataset(services: Services, dataset: Dataset) -> None:
        columns = [dataset.columns[0].name] if dataset.columns else None
        # A scoped dataset has no caller here: it is checked reading no tenant's rows (the statement
        # still names its table and columns); an unscoped one ignores the scope.
        query = build_query(dataset, columns, limit=1, scope=NO_ROWS)
        source = services.registry.open(dataset)
        try:
            await source.count(query, cap=1)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(source.close(), 1.0))
