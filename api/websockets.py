"""GraphQL over WebSockets, both protocols, for hostile clients: no valid token, no ack; a malformed
or oversized message closes the socket instead of raising; no socket outlives its token.

Close codes (graphql-transport-ws; the legacy graphql-ws protocol gets the same codes, after its
``connection_error`` message):

- 4401 ``Unauthorized``: ``connection_init`` without a valid token (missing, malformed, not a string,
  expired), and the socket of a token that has expired (a second after its subscriptions were told
  ``UNAUTHENTICATED``). DESIGN.md says 4401; graphql-transport-ws suggests 4403 for a refused init
  and Strawberry sends that, but 4401 is what the token problem is (and what web/graphql-ws.js
  reads as "not acknowledged"); the reference client treats both as fatal, without retrying.
- 4400: a message that is not a JSON object of the protocol's shape (Strawberry raised on those).
- 1009 ``Message too big``: a message over ``max_anonymous_request_bytes`` before the ack, over
  ``max_request_bytes`` after it.
- 4408: no ``connection_init`` within ``CONNECTION_INIT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from datetime import timedelta
from json import JSONDecodeError
from typing import Any

from starlette.websockets import WebSocketDisconnect, WebSocketState
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http.exceptions import NonJsonMessageReceived, NonTextMessageReceived, WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.unset import UnsetType

from api.subscription_push import start_push
from api.subscription_results import frame

UNAUTHORIZED = 4401
INVALID_MESSAGE = 4400
MESSAGE_TOO_BIG = 1009
CONNECTION_INIT_SECONDS = 10
CONNECTION_INIT_TIMEOUT = timedelta(seconds=CONNECTION_INIT_SECONDS)
# Subscriptions end with UNAUTHENTICATED at the token's expiry; the socket closes this much later.
EXPIRY_GRACE_SECONDS = 1.0


class BoundedWebSocketAdapter(ASGIWebSocketAdapter):
    """Strawberry's adapter with a size bound on each message, and a close that may come twice."""

    def __init__(self, view: Any, request: Any, response: Any) -> None:
        super().__init__(view, request, response)
        self.max_message_bytes: int = view.settings.max_anonymous_request_bytes

    async def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object, None]:
        try:
            while self.ws.application_state != WebSocketState.DISCONNECTED:
                try:
                    text = await self.ws.receive_text()
                    if len(text.encode("utf-8", "surrogatepass")) > self.max_message_bytes:
                        await self.close(MESSAGE_TOO_BIG, f"Message too big (at most {self.max_message_bytes} bytes)")
                        return
                    yield self.view.decode_json(text)
                except JSONDecodeError as e:
                    if not ignore_parsing_errors:
                        raise NonJsonMessageReceived from e
        except KeyError as e:  # a binary message
            raise NonTextMessageReceived from e
        except WebSocketDisconnect:
            pass

    async def send_text(self, text: str) -> None:
        """A text frame already encoded (a shared subscription result, ``api.subscription_results``)."""
        try:
            await self.ws.send_text(text)
        except WebSocketDisconnect as e:
            raise WebSocketDisconnected from e

    async def close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        with contextlib.suppress(RuntimeError):  # the client closed first
            await self.ws.close(code=code, reason=reason[:120])


def _is_str(value: object, optional: bool = False) -> bool:
    return isinstance(value, str) or (optional and value is None)


def _operation_problem(message: Mapping[str, Any]) -> str | None:
    """What is wrong with a subscribe/start message's id and payload, if anything."""
    if not _is_str(message.get("id")) or not message["id"]:
        return "The message needs a string id"
    payload = message.get("payload")
    if not isinstance(payload, dict) or not _is_str(payload.get("query")):
        return "The message needs a payload with a string query"
    if not isinstance(payload.get("variables"), dict | None) or not isinstance(payload.get("extensions"), dict | None):
        return "variables and extensions must be objects"
    if not _is_str(payload.get("operationName"), optional=True):
        return "operationName must be a string"
    return None


def message_problem(message: object, operations: tuple[str, ...], with_id: tuple[str, ...]) -> str | None:
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "A message must be a JSON object with a string type"
    if message["type"] in operations:
        return _operation_problem(message)
    if message["type"] in with_id and not _is_str(message.get("id")):
        return "The message needs a string id"
    return None


class _TokenBound:
    """The parts both protocols share: the ack only after the view's ``on_ws_connect`` accepted the
    token; then a larger message bound, and a close when the token expires; and every message sent
    through ``send_message``, where a shared subscription result goes out as the frame encoded once
    for all its subscribers (``api.subscription_results.frame``)."""

    websocket: BoundedWebSocketAdapter
    view: Any
    context: Any
    # The expiry is a timer, not a sleeping task: an idle socket costs a TimerHandle, not a Task.
    _expiry: asyncio.TimerHandle | None = None
    _closing: asyncio.Task | None = None

    def _accepted(self) -> None:
        self.websocket.max_message_bytes = self.view.settings.max_request_bytes
        expires_at = self.context.credentials.expires_at
        delay = max(0.0, expires_at + EXPIRY_GRACE_SECONDS - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._closing = asyncio.create_task(self.websocket.close(UNAUTHORIZED, "Unauthorized: the token has expired"))

    async def _stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._closing is not None:
            self._closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._closing

    async def send_message(self, message: Any) -> None:
        text = frame(message)
        if text is None:
            await self.websocket.send_json(message)
        else:
            await self.websocket.send_text(text)


class TransportWSHandler(_TokenBound, BaseGraphQLTransportWSHandler):
    async def run_operation(self, operation: Any) -> None:
        """Strawberry's, with the operation's direct push (``api/subscription_push.py``) started in
        its task first."""
        start_push(operation.id, "next", self.websocket.send_text)
        await super().run_operation(operation)

    async def handle_message(self, message: Any) -> None:
        problem = message_problem(message, ("subscribe",), ("complete",))
        if problem:
            await self.handle_invalid_message(problem)
            return
        await super().handle_message(message)

    async def handle_connection_init(self, message: Any) -> None:
        """Strawberry's, except that a refused token closes with 4401 (it closes with 4403)."""
        if self.connection_timed_out:
            return
        if self.connection_init_timeout_task:
            self.connection_init_timeout_task.cancel()
        payload = message.get("payload", {})
        if not isinstance(payload, dict):
            await self.websocket.close(code=INVALID_MESSAGE, reason="Invalid connection init payload")
            return
        if self.connection_init_received:
            await self.websocket.close(code=4429, reason="Too many initialisation requests")
            return
        self.connection_init_received = True
        self.context.connection_params = payload
        try:
            ack_payload = await self.view.on_ws_connect(self.context)
        except ConnectionRejectionError as e:
            await self.websocket.close(code=UNAUTHORIZED, reason=f"Unauthorized: {e.payload.get('message', '')}")
            return
        self._accepted()
        if isinstance(ack_payload, UnsetType):
            await self.send_message({"type": "connection_ack"})
        else:
            await self.send_message({"type": "connection_ack", "payload": ack_payload})
        self.connection_acknowledged = True

    async def shutdown(self) -> None:
        await self._stop_expiry()
        await super().shutdown()


class LegacyWSHandler(_TokenBound, BaseGraphQLWSHandler):
    async def handle(self) -> None:
        """Strawberry's legacy handler waits for ``connection_init`` forever; this one closes a
        socket that has not been acknowledged within ``CONNECTION_INIT_SECONDS`` (4408)."""
        deadline = asyncio.create_task(self._close_unless_acknowledged())
        try:
            await super().handle()
        finally:
            deadline.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deadline

    async def handle_async_results(
        self, operation_id: str, query: str, operation_name: str | None, variables: dict[str, object] | None
    ) -> None:
        """Strawberry's, with the operation's direct push (``api/subscription_push.py``) started in
        its task first."""
        start_push(operation_id, "data", self.websocket.send_text)
        await super().handle_async_results(operation_id, query, operation_name, variables)

    async def _close_unless_acknowledged(self) -> None:
        await asyncio.sleep(CONNECTION_INIT_SECONDS)
        if not self.connection_acknowledged:
            await self.websocket.close(4408, "Connection initialisation timeout")

    async def handle_message(self, message: Any) -> None:
        problem = message_problem(message, ("start",), ("stop",))
        if problem:
            await self.websocket.close(code=INVALID_MESSAGE, reason=problem)
            return
        await super().handle_message(message)

    async def handle_connection_init(self, message: Any) -> None:
        """Strawberry's, except that a refused token sends ``connection_error`` with the coded error
        and closes with 4401 (it closes with 1011, "internal error")."""
        payload = message.get("payload")
        if payload is not None and not isinstance(payload, dict):
            await self.send_message({"type": "connection_error"})
            await self.websocket.close(code=INVALID_MESSAGE, reason="Invalid connection init payload")
            return
        if self.connection_acknowledged:
            await self.websocket.close(code=4429, reason="Too many initialisation requests")
            return
        self.context.connection_params = payload
        try:
            ack_payload = await self.view.on_ws_connect(self.context)
        except ConnectionRejectionError as e:
            await self.send_message({"type": "connection_error", "payload": e.payload})
            await self.websocket.close(code=UNAUTHORIZED, reason=f"Unauthorized: {e.payload.get('message', '')}")
            return
        self._accepted()
        if isinstance(ack_payload, UnsetType) or ack_payload is None:
            await self.send_message({"type": "connection_ack"})
        else:
            await self.send_message({"type": "connection_ack", "payload": ack_payload})
        self.connection_acknowledged = True
        if self.keep_alive:
            self.keep_alive_task = asyncio.create_task(self.handle_keep_alive())

    async def cleanup(self) -> None:
        await self._stop_expiry()
        await super().cleanup()
