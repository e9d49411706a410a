"""Many graphql-transport-ws subscribers on one asyncio loop, for ``bench/subscribers.py``.

Why not the ``websockets`` library (``tests/fanout_client.py``): on a 2-core machine the load
generator competes with the api it measures for the same cores. With one reader task per socket,
the library's frame machinery and a ``json.loads`` per message, it spent 40-60 µs of CPU on each
message it read, about what the api spent producing it; at 5,000 subscribers x 4 pushes a second
that is about a core, and its own backlog showed up as delay it blamed on the api. Like wrk or
k6, a load generator has to cost as little as possible, so each subscriber here is a bare
``asyncio.Protocol`` on uvloop that does the HTTP/1.1 upgrade itself, masks its few frames (RFC
6455: clients must) and, for each text frame the server sends, keeps only ``(arrival time, payload
bytes)``: JSON is parsed after the run (``Subscriber.results``), except for the handful of control
messages (ack, complete, error, ping), told from a ``next`` by a bounded ``bytes.find``.

    fleet = Fleet(count)
    await fleet.connect("http://127.0.0.1:8000", token, query, {"id": task_id})
    await asyncio.wait_for(fleet.all_first, 120)   # every subscriber has a message
    await asyncio.wait_for(fleet.all_ended, 600)   # every subscription ended (complete, error, closed)
    await fleet.close()
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from typing import Any, cast
from urllib.parse import urlparse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
FIN_TEXT = 0x80 | TEXT  # the first byte of an unfragmented text frame: nearly every frame read
NEXT = b'"next"'
CLOSE_SECONDS = 10  # for the server's close frame and end of the connection, then the socket is dropped


class Fleet:
    """The subscribers of one run and two futures: every one has a first message, every one ended."""

    def __init__(self, count: int) -> None:
        self.subscribers: list[Subscriber] = []
        self.count = count
        self.first = 0
        self.ended = 0
        loop = asyncio.get_running_loop()
        self.all_first: asyncio.Future[None] = loop.create_future()
        self.all_ended: asyncio.Future[None] = loop.create_future()

    async def connect(
        self, base_url: str, token: str, query: str, variables: dict[str, Any], concurrency: int = 100
    ) -> None:
        """Open ``count`` sockets (``concurrency`` upgrades at a time), each acknowledged and subscribed."""
        url = urlparse(base_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        init = json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}).encode()
        subscribe = json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}})
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            async with gate:
                sub = Subscriber(self, f"{host}:{port}", init, subscribe.encode())
                self.subscribers.append(sub)
                await loop.create_connection(lambda: sub, host, port)
                await asyncio.wait_for(asyncio.shield(sub.subscribed), 60)

        await asyncio.gather(*(one() for _ in range(self.count)))

    def _first(self) -> None:
        self.first += 1
        if self.first == self.count and not self.all_first.done():
            self.all_first.set_result(None)

    def _ended(self) -> None:
        self.ended += 1
        if self.ended == self.count and not self.all_ended.done():
            self.all_ended.set_result(None)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.subscribers), return_exceptions=True)


class Subscriber(asyncio.Protocol):
    """One WebSocket with one subscription (id "1"). During the run: ``messages``, every text frame
    after the ack as ``(time.monotonic() when its bytes arrived, payload)``; ``ended``: "complete",
    "error" or "closed" (the socket closed first); ``close_code``: the server's, if it sent one."""

    def __init__(self, fleet: Fleet, host: str, init: bytes, subscribe: bytes) -> None:
        self.fleet = fleet
        self.messages: list[tuple[float, bytes]] = []
        self.ended: str | None = None
        self.close_code: int | None = None
        self.problem: str | None = None  # a broken handshake or protocol
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._host, self._init, self._subscribe = host, init, subscribe
        self._key = base64.b64encode(os.urandom(16))
        self._upgraded = False
        self._close_sent = False
        self._buffer = b""  # the bytes of an incomplete frame (or response head)
        self._fragments: list[bytes] | None = None
        self._parsed: list[tuple[float, dict[str, Any]]] | None = None

    # --- the connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(
            b"GET /graphql HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n" % (self._host.encode(), self._key)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("closed")
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(self.problem or f"closed before the ack: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def close(self) -> None:
        """Send a close (1000), wait for the server's and for it to end the TCP connection."""
        if self.transport is None or self.lost.done():
            return
        self._close(b"\x03\xe8")
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_SECONDS)
        except TimeoutError:
            self.transport.abort()

    # --- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()  # one clock reading for every frame of this chunk: they arrived together
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if not self._upgraded:
            head, sep, data = data.partition(b"\r\n\r\n")
            if not sep:
                self._buffer = head
                return
            self._upgrade(head)
            if not self._upgraded:
                return
        pos, end = 0, len(data)
        messages = self.messages
        while end - pos >= 2:
            first, length = data[pos], data[pos + 1]
            start = pos + 2
            if length >= 126:
                if length & 0x80:
                    return self._fail("a masked frame from the server")
                size = 2 if length == 126 else 8
                if end - start < size:
                    break
                length = int.from_bytes(data[start : start + size], "big")
                start += size
            stop = start + length
            if stop > end:
                break
            pos = stop
            if first == FIN_TEXT and self._fragments is None:
                payload = data[start:stop]
                if payload.find(NEXT, 0, 40) < 0:  # not a "next": ack, complete, error or ping
                    self._control(now, payload)
                else:
                    if not messages:
                        self.fleet._first()
                    messages.append((now, payload))  # all a "next" costs during the run
            else:
                self._frame(now, first, data[start:stop])
                if self.problem:
                    return
        if pos < end:
            self._buffer = data[pos:]

    def _upgrade(self, head: bytes) -> None:
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        accept = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
        if status.split(" ", 2)[1:2] != ["101"]:
            return self._fail(f"the upgrade was refused: {status}")
        if headers.get("sec-websocket-accept") != accept:
            return self._fail("a wrong Sec-WebSocket-Accept")
        if headers.get("sec-websocket-protocol") != "graphql-transport-ws":
            return self._fail(f"subprotocol {headers.get('sec-websocket-protocol')!r}")
        self._upgraded = True
        self._send(TEXT, self._init)

    def _frame(self, now: float, first: int, payload: bytes) -> None:
        """Any frame but an unfragmented text frame: fragments, close, ping, pong."""
        opcode, fin = first & 0x0F, first & 0x80
        if first & 0x70:
            return self._fail("reserved bits set (no extension was negotiated)")
        if opcode == CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._close(payload[:2])  # answer with the same code; the server ends the TCP connection
            self._end("closed")
        elif opcode == PING:
            self._send(PONG, payload)
        elif opcode == PONG:
            pass
        elif opcode == TEXT and self._fragments is None:
            self._fragments = [payload]
        elif opcode == 0 and self._fragments is not None:
            self._fragments.append(payload)
        else:
            return self._fail(f"an unexpected frame, opcode {opcode}")
        if fin and opcode in (TEXT, 0) and self._fragments is not None:
            whole, self._fragments = b"".join(self._fragments), None
            self._control(now, whole)  # a rare path: parse the message, whatever it is

    def _control(self, now: float, payload: bytes) -> None:
        """A message that is not a ``next`` (or a fragmented one): one JSON parse, a few per socket."""
        kind = json.loads(payload).get("type")
        if kind == "connection_ack":
            self._send(TEXT, self._subscribe)
            if not self.subscribed.done():
                self.subscribed.set_result(None)
            return
        if kind == "ping":
            self._send(TEXT, b'{"type":"pong"}')
            return
        if kind == "pong":
            return
        if not self.messages:
            self.fleet._first()
        self.messages.append((now, payload))  # a next, an error or anything unexpected, for the results
        if kind in ("complete", "error"):
            self._end(kind)

    def _end(self, how: str) -> None:
        if self.ended is None:
            self.ended = how
            self.fleet._ended()

    def _fail(self, problem: str) -> None:
        self.problem = self.problem or problem
        self._end("closed")
        if self.transport is not None:
            self.transport.abort()

    # --- writing ----------------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        """One masked frame (the few a client sends: init, subscribe, pong, close)."""
        assert self.transport is not None
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.transport.write(head + mask + masked)

    def _close(self, code: bytes) -> None:
        if not self._close_sent and self.transport is not None and not self.transport.is_closing():
            self._close_sent = True
            self._send(CLOSE, code)

    # --- after the run ----------------------------------------------------------------------

    def results(self) -> list[tuple[float, dict[str, Any]]]:
        """Every message kept, parsed (once, after the run): ``(arrival time, message)``."""
        if self._parsed is None:
            self._parsed = [(at, json.loads(raw)) for at, raw in self.messages]
        return self._parsed

    def snapshots(self, field_name: str = "exportProgress") -> list[tuple[float, dict[str, Any]]]:
        return [
            (at, m["payload"]["data"][field_name])
            for at, m in self.results()
            if m.get("type") == "next" and m.get("id") == "1" and (m.get("payload") or {}).get("data")
        ]

    def errors(self) -> list[Any]:
        """Error messages, and ``next`` payloads that carry errors."""
        found = []
        for _, m in self.results():
            if m.get("type") == "error":
                found.append(m.get("payload"))
            elif m.get("type") == "next" and (m.get("payload") or {}).get("errors"):
                found.append(m["payload"]["errors"])
            elif m.get("type") not in ("next", "complete"):
                found.append(m)
        return found
