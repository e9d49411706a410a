"""One request to OpenSearch, retried while the failure may pass, its answer parsed and digested
with the cyclic garbage collector paused (``Requests``: the part of ``OpenSearchSource`` that the
other parts send their requests through).

Failures: 429, 5xx, connection errors and timeouts are retried with exponential backoff (4 tries
over about 5 s), then raised as ``TransientSourceError``; the worker retries the whole export.
A scroll page is only retried when the request cannot have reached the cluster (429, refused
connection): a scroll cannot be rewound, and a replayed page would silently skip rows (so a long
read in key order, being a scroll, starts again where a point in time would retry the page). Other
4xx answers (missing index, bad credentials, refused query) are ``SourceError`` with a message
that says what to change.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opensearchpy import AsyncOpenSearch
from opensearchpy.exceptions import SerializationError, TransportError

from sources.base import Dataset, SourceError, TransientSourceError
from sources.opensearch.decoding import parse
from sources.opensearch.errors import _context_gone, _never_reached, error_reason, explain_error, is_transient, redact

log = logging.getLogger("dataport.sources.opensearch")

# Pauses between tries: 4 tries over about 5 seconds (each pause varies by up to ±20 %).
RETRY_DELAYS = (0.7, 1.4, 2.8)
REQUEST_TIMEOUT_SECONDS = 30.0


def gave_up(url: str, what: str, started: float, tries: int, error: TransportError) -> str:
    """Why a request that failed ``tries`` times since ``started`` (``time.monotonic``) is given up."""
    return (
        f"OpenSearch at {redact(url)} failed {tries} times while {what} over "
        f"{time.monotonic() - started:.1f} s (last: {error.status_code} {error_reason(error)}); it may be "
        f"overloaded or down."
    )


async def back_off(
    logger: logging.Logger, index: str, what: str, error: TransportError, attempt: int, delays: tuple[float, ...]
) -> None:
    """The pause after try ``attempt`` (from 0) failed with a passing ``error``: ``delays[attempt]``,
    ±20 %, said at INFO."""
    delay = delays[attempt] * random.uniform(0.8, 1.2)
    logger.info(
        "index '%s': %s failed (%s %s); try %d of %d in %.1f s",
        index,
        what,
        error.status_code,
        error_reason(error),
        attempt + 2,
        len(delays) + 1,
        delay,
    )
    await asyncio.sleep(delay)


class Requests:
    """``_call``: one request, retried, its answer digested."""

    # Set by ``OpenSearchSource``.
    client: AsyncOpenSearch
    dataset: Dataset
    index: str
    retry_delays: tuple[float, ...]

    async def _call(
        self,
        what: str,
        request: Callable[[], Awaitable[Any]],
        *,
        replay_safe: bool = True,
        digest: Callable[[Any], Any] | None = None,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Any:
        """One request, retried with backoff while the failure may pass. ``replay_safe=False``
        (a scroll page) retries only what cannot have reached the cluster. The answer, parsed, or
        what ``digest`` makes of it: of what ``decode`` makes of its bytes if that is not None (and
        ``digest`` takes it), else of the parsed answer."""
        answer = await self._request(what, request, replay_safe)
        if answer.__class__ is not bytes:
            return digest(answer) if digest is not None else answer
        # A page is ~10,000 hits of dicts and lists (no cycles) that live only until ``digest`` has
        # taken their cells. Left on, the cyclic collector would scan them (and, every so often, the
        # whole heap) over and over while they are made, then once more: ~20 % of an export's CPU.
        # Paused from the parse until they are freed, it never sees them.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            if decode is not None and digest is not None:
                page = decode(answer)
                if page is not None:
                    out = digest(page)
                    if out is not None:
                        return out
            try:
                parsed = parse(answer)
            except ValueError as e:
                raise SourceError(f"OpenSearch sent an answer that is not JSON while {what}: {e}") from e
            if digest is None:
                return parsed
            out = digest(parsed)
            del parsed
            return out
        finally:
            if paused:
                gc.enable()

    async def _request(self, what: str, request: Callable[[], Awaitable[Any]], replay_safe: bool) -> Any:
        started = time.monotonic()
        tries = len(self.retry_delays) + 1
        for attempt in range(tries):
            try:
                return await request()
            except TransportError as e:
                if not is_transient(e):
                    if _context_gone(e):
                        raise TransientSourceError(
                            f"The point in time or scroll over index '{self.index}' expired while {what}; "
                            f"the read has to start again."
                        ) from e
                    raise SourceError(explain_error(e, what, self.index, self.dataset.url)) from e
                if not replay_safe and not _never_reached(e):
                    raise TransientSourceError(
                        f"OpenSearch failed while {what} ({error_reason(e)}); a scroll cannot be resumed after an "
                        f"unanswered page, so the read has to start again."
                    ) from e
                if attempt == tries - 1:
                    raise TransientSourceError(gave_up(self.dataset.url, what, started, tries, e)) from e
                await back_off(log, self.index, what, e, attempt, self.retry_delays)
            except SerializationError as e:
                raise SourceError(f"OpenSearch sent an answer that is not JSON while {what}: {e}") from e
        raise AssertionError("unreachable")
