"""The size of a request to ``/graphql``, refused before it is read whole.

An ASGI middleware in front of the app: a body is counted while it arrives, and GraphQL only ever
sees one within the limit. Past the limit nothing is kept: a ``Content-Length`` over
``DRAIN_BYTES`` (8 MiB) is answered at once without reading a byte of the body, and a smaller one
or a chunked body is read and dropped up to ``DRAIN_BYTES`` before the answer, because closing a
socket with unread data resets it and a client that sends its whole body before reading (most
do) would see a reset instead of the 413. The refusal is HTTP 413 with a GraphQL-shaped body
(``errors[0].extensions.code`` ``PAYLOAD_TOO_LARGE``, ``extensions.limit``) and ``Connection:
close``. A GET's query string is held to the same limit.

The limit is ``max_request_bytes`` (1 MiB) for a request with a valid token and
``max_anonymous_request_bytes`` (16 KiB) without one: all an anonymous request can do is
introspect, so the token is checked here before any body is read, with the api's one
``Authenticator``; the outcome is kept in the request's state (``VERIFIED``) for the GraphQL context,
so a request's token is verified once. WebSocket messages are bounded in ``api.websockets``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from api.auth import Authenticator, AuthError
from dataport import errors
from dataport.settings import Settings

# The request state's key for this request's verified credentials (or the AuthError).
VERIFIED = "dataport_verified"
# Past the limit, a body is read and dropped up to this size so that its client sees the answer.
DRAIN_BYTES = 8 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(message: str, code: str, **extensions: Any) -> bytes:
    """A GraphQL response carrying one top-level error, for refusals made outside GraphQL."""
    return orjson.dumps({"errors": [{"message": message, "extensions": {"code": code, **extensions}}]})


class RequestSizeLimit:
    def __init__(self, app: ASGIApp, settings: Settings, authenticator: Authenticator, path: str = "/graphql"):
        self.app = app
        self.settings = settings
        self.authenticator = authenticator
        self.path = path

    async def _limit(self, scope: Scope) -> tuple[int, bool]:
        """The limit for this request, and whether it is the anonymous one."""
        header = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), None)
        try:
            verified: object = await self.authenticator.authenticate(header.decode("latin-1") if header else None)
        except AuthError as e:
            # Without its traceback: this frame, which holds the scope, would keep itself alive
            # (scope → state → the error → its traceback → this frame) until a cyclic collection.
            verified = e.with_traceback(None)
        scope.setdefault("state", {})[VERIFIED] = verified
        if isinstance(verified, AuthError):
            return self.settings.max_anonymous_request_bytes, True
        return self.settings.max_request_bytes, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        limit, anonymous = await self._limit(scope)
        if len(scope.get("query_string", b"")) > limit:
            await self._refuse(send, limit, anonymous)
            return
        length = next((value for name, value in scope.get("headers", ()) if name == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > DRAIN_BYTES:
            await self._refuse(send, limit, anonymous)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif chunks:
                chunks.clear()  # over the limit: from here on the body is only counted
            more = message.get("more_body", False)
            if size > limit and (not more or size > DRAIN_BYTES):
                await self._refuse(send, limit, anonymous)
                return
            if not more:
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, limit: int, anonymous: bool) -> None:
        message = f"The request is larger than {limit} bytes, the most allowed"
        message += " without a valid token; sign in for more." if anonymous else "."
        body = error_body(message, errors.PAYLOAD_TOO_LARGE, limit=limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, read already, as one message; after it, the server's own messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
