"""The outbox: a Redis stream where the api and the workers append records as events happen.

Appending is one XADD (or, for task changes, part of the Lua script that makes the change,
``tasks/scripts.lua``), so recording costs a request one Redis command and never waits for the
store. The drain (``drain.py``) moves the records into the store. The stream is never trimmed by
length: a record leaves it only after the store has it.

One outbox per queue (``{queue_name}:audit``): the workers of a queue drain the records of the api
that feeds them, and several deployments can share one Redis.

The actor's address and user agent come from the request being served: an ASGI middleware
(``RequestActor``) keeps them in a context variable for the whole request or WebSocket, so the task
functions, which see only an ``Identity`` (a ``Caller`` here), can name the whole actor.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from audit.records import FILE_DOWNLOADED, SYSTEM, Actor, Pending, pending

_CLIENT: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "dataport_audit_client", default=(None, None)
)


class _Owner(Protocol):
    @property
    def id(self) -> str: ...


class Caller(Protocol):
    """Who acts, as much of them as a record names: their user id and roles. ``tasks.access.Identity``
    is one; audit/ sits below tasks/ (whose transitions append records), so it names the shape."""

    @property
    def owner(self) -> _Owner: ...

    @property
    def roles(self) -> frozenset[str]: ...


def outbox_key(queue_name: str) -> str:
    return f"{queue_name}:audit"


class RequestActor:
    """ASGI middleware: the client's address (as uvicorn reports it, ``X-Forwarded-For`` from
    trusted proxies included) and user agent, for every record made while serving the request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        agent = None
        for name, value in scope.get("headers") or ():
            if name == b"user-agent":
                agent = value.decode("latin-1")[:512]
                break
        token = _CLIENT.set((client[0] if client else None, agent))
        try:
            await self.app(scope, receive, send)
        finally:
            _CLIENT.reset(token)


def client() -> tuple[str | None, str | None]:
    """The address and user agent of the request being served (None, None outside one)."""
    return _CLIENT.get()


def actor_of(identity: Caller | None) -> Actor:
    """The whole actor: the identity's user and roles, the request's address and user agent."""
    address, agent = _CLIENT.get()
    if identity is None:
        return Actor(None, (), address, agent)
    return Actor(identity.owner.id, tuple(sorted(identity.roles)), address, agent)


log = logging.getLogger("dataport.audit")


class Outbox:
    """Appends records to the queue's outbox; does nothing when the audit log is off."""

    def __init__(self, redis: Redis, key: str, enabled: bool = True):
        self.redis = redis
        self.key = key
        self.enabled = enabled
        # Links issued and not yet written (signature -> actor JSON, seconds to keep), and the task
        # writing them: see ``issued``.
        self._issued: dict[str, tuple[str, int]] = {}
        self._writing: asyncio.Task[None] | None = None

    async def append(self, record: Pending) -> None:
        if self.enabled:
            await self.redis.xadd(self.key, record.outbox_fields())  # type: ignore[arg-type]

    async def record(
        self,
        action: str,
        identity: Caller | None = None,
        *,
        task_id: str | None = None,
        dataset: str | None = None,
        actor: Actor | None = None,
        **detail: Any,
    ) -> None:
        """Append one record of ``action`` happening now, by ``identity`` (or ``actor``)."""
        if self.enabled:
            who = actor or (actor_of(identity) if identity is not None or client() != (None, None) else SYSTEM)
            await self.append(pending(action, who, task_id=task_id, dataset=dataset, **detail))

    # Signed download links carry no token: who a link was issued to is kept beside the outbox
    # for as long as the link is valid, under its signature, and named by its download record.
    def _link_key(self, signature: str) -> str:
        return f"{self.key}:link:{signature[:128]}"

    async def issued(self, url: str | None, identity: Caller, ttl_seconds: int) -> None:
        """Remember who ``url`` (a signed ``/files`` link) was given to."""
        if not self.enabled or not url:
            return
        signature = parse_qs(urlsplit(url).query).get("signature")
        if not signature:
            return
        # Written in the background, every link issued meanwhile in one pipeline: a round trip per
        # read made exportTask (which issues a fresh link each time) ~15 % slower with the log on.
        self._issued[signature[0]] = (actor_of(identity).to_json(), max(1, ttl_seconds))
        if self._writing is None:
            self._writing = asyncio.get_running_loop().create_task(self._write_issued())

    async def _write_issued(self) -> None:
        batch: dict[str, tuple[str, int]] = {}
        try:
            await asyncio.sleep(0)  # the other requests of this turn of the loop add theirs
            while self._issued:
                batch, self._issued = self._issued, {}
                pipe = self.redis.pipeline(transaction=False)
                for signature, (actor, ttl) in batch.items():
                    pipe.set(self._link_key(signature), actor, ex=ttl)
                await pipe.execute()
        except RedisError as e:  # the download is still recorded, under no user
            log.warning("could not record who %d download links were issued to: %s", len(batch), e)
        finally:
            self._writing = None

    async def downloaded(self, task_id: str, dataset: str | None, signature: str, **detail: Any) -> None:
        """Record a download through a signed link: the user it was issued to, the address and
        user agent that used it."""
        if not self.enabled:
            return
        waiting = self._issued.get(signature)
        issued = waiting[0] if waiting else await self.redis.get(self._link_key(signature))
        to = Actor.of(orjson.loads(issued)) if issued else SYSTEM
        address, agent = client()
        actor = Actor(to.user, to.roles, address, agent)
        await self.append(pending(FILE_DOWNLOADED, actor, task_id=task_id, dataset=dataset, **detail))

    async def length(self) -> int:
        return int(await self.redis.xlen(self.key))

    async def entries(self, count: int) -> list[tuple[str, dict[str, str]]]:
        found: Iterable[tuple[str, dict[str, str]]] = await self.redis.xrange(self.key, "-", "+", count=count)
        return list(found)

    async def remove(self, entry_ids: list[str]) -> None:
        if entry_ids:
            await self.redis.xdel(self.key, *entry_ids)
