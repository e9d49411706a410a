"""A streaming response that drops a client which stops reading, and frees what the stream held.

Starlette's ``StreamingResponse`` waits for a slow client as long as it takes: when the client
reads nothing, the socket's buffers fill, ``send`` blocks, and the stream keeps its source read
open forever. Here every ``send`` may wait at most ``idle_timeout`` seconds; past that the client
is dropped (the response ends without its last chunk, so the client sees a cut body, never a
complete-looking file). Chunks go out in pieces of ``PIECE_BYTES``, so what one slow client holds in
the server's send buffer is bounded by the transport's high-water mark plus one piece.

However the response ends (done, dropped, client gone, never started), ``on_close`` runs once, to
the end, shielded from cancellation: that is where the route closes its source and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("dataport.api")

PIECE_BYTES = 64 * 1024


class IdleTimeoutStreamingResponse(StreamingResponse):
    def __init__(
        self, content: AsyncIterator[bytes], *, idle_timeout: float, on_close: Callable[[], Awaitable[None]], **kwargs
    ) -> None:
        super().__init__(content, **kwargs)
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.dropped = False

    async def _send(self, send: Send, message: dict) -> bool:
        """Send ``message``; False when the client read nothing for the idle timeout."""
        try:
            await asyncio.wait_for(send(message), self.idle_timeout)
        except TimeoutError:
            self.dropped = True
            log.warning("stream dropped: the client read nothing for %g s", self.idle_timeout)
            return False
        return True

    async def stream_response(self, send: Send) -> None:
        if not await self._send(
            send, {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        ):
            return
        async for chunk in self.body_iterator:
            view = memoryview(chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset))
            for start in range(0, len(view), PIECE_BYTES):
                piece = bytes(view[start : start + PIECE_BYTES])
                if not await self._send(send, {"type": "http.response.body", "body": piece, "more_body": True}):
                    return  # uvicorn closes the connection: the response is incomplete
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.on_close()
