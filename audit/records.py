"""One audit record: who did what to which task, when; in the outbox and in a store.

A record starts as a ``Pending`` (what the api or a worker appends to the Redis outbox: no place in
the chain yet) and becomes an ``AuditRecord`` when the drain links it into a store's chain
(``chain.seal``). The record's ``id`` is made when the event happens, never by the drain: it is
what the stores de-duplicate on when a drain delivers a record a second time.

Times are text, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, fixed width): they sort as they compare, read
the same from every store and hash the same everywhere.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

# The actions Dataport records (docs/audit.md lists when each is written).
EXPORT_REQUESTED = "export.requested"
IMPORT_REQUESTED = "import.requested"
EXPORT_STREAMED = "export.streamed"
TASK_STATUS = "task.status"
TASK_CANCELLED = "task.cancelled"
TASK_RETRIED = "task.retried"
TASK_DELETED = "task.deleted"
TASK_EXPIRED = "task.expired"
FILE_DOWNLOADED = "file.downloaded"
FILE_UPLOADED = "file.uploaded"
ACCESS_DENIED = "access.denied"
RATE_LIMITED = "request.rate_limited"
AUDIT_PRUNED = "audit.pruned"
ACTIONS = (
    EXPORT_REQUESTED,
    IMPORT_REQUESTED,
    EXPORT_STREAMED,
    TASK_STATUS,
    TASK_CANCELLED,
    TASK_RETRIED,
    TASK_DELETED,
    TASK_EXPIRED,
    FILE_DOWNLOADED,
    FILE_UPLOADED,
    ACCESS_DENIED,
    RATE_LIMITED,
    AUDIT_PRUNED,
)

# Outbox fields whose name starts with this are merged into ``detail`` by the drain: the Lua
# scripts add what only they know (the status a task moved from) without parsing JSON.
DETAIL_PREFIX = "x:"


def time_text(moment: float | None = None) -> str:
    """Epoch seconds (now by default) as the fixed-width UTC text records carry."""
    at = dt.datetime.fromtimestamp(time.time() if moment is None else moment, dt.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time_text(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def new_id() -> str:
    """Time-ordered and unique without coordination: 13 hex digits of microseconds, 12 random."""
    return f"{time.time_ns() // 1000:013x}{os.urandom(6).hex()}"


@dataclass(frozen=True)
class Actor:
    """Who caused an event: the token's user and roles, the client's address and user agent. A
    worker's or the scheduler's own events have no user."""

    user: str | None = None
    roles: tuple[str, ...] = ()
    address: str | None = None
    user_agent: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", tuple(sorted(self.roles)))  # one order, whoever made it

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "roles": sorted(self.roles), "address": self.address, "user_agent": self.user_agent}

    def to_json(self) -> str:
        return orjson.dumps(self.as_dict(), option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> Actor:
        value = value or {}
        return cls(
            value.get("user"),
            tuple(sorted(value.get("roles") or ())),
            value.get("address"),
            value.get("user_agent"),
        )


SYSTEM = Actor()


@dataclass(frozen=True)
class Pending:
    """A record as it waits in the outbox."""

    id: str
    at: str
    action: str
    actor: Actor = SYSTEM
    task_id: str | None = None
    dataset: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """Everything the hash covers besides the previous hash."""
        return {
            "id": self.id,
            "at": self.at,
            "action": self.action,
            "actor": self.actor.as_dict(),
            "task_id": self.task_id,
            "dataset": self.dataset,
            "detail": dict(self.detail),
        }

    def outbox_fields(self) -> dict[str, str]:
        """The stream entry's fields (empty values are left out)."""
        fields = {
            "id": self.id,
            "at": self.at,
            "action": self.action,
            "actor": self.actor.to_json(),
            "detail": dumps(self.detail),
        }
        if self.task_id:
            fields["task_id"] = self.task_id
        if self.dataset:
            fields["dataset"] = self.dataset
        return fields


def pending(
    action: str,
    actor: Actor = SYSTEM,
    *,
    task_id: str | None = None,
    dataset: str | None = None,
    **detail: Any,
) -> Pending:
    """A new record of an event happening now."""
    return Pending(new_id(), time_text(), action, actor, task_id, dataset, detail)


def from_outbox(fields: Mapping[str, str]) -> Pending:
    """A stream entry back to a record. Raises ``ValueError`` for an entry that is not one."""
    try:
        detail = orjson.loads(fields.get("detail") or "{}")
        actor = orjson.loads(fields.get("actor") or "{}")
        record_id, at, action = fields["id"], fields["at"], fields["action"]
    except (KeyError, orjson.JSONDecodeError) as e:
        raise ValueError(f"not an audit record: {e}") from None
    if not isinstance(detail, dict) or not isinstance(actor, dict):
        raise ValueError("not an audit record: detail and actor must be objects")
    for name, value in fields.items():
        if name.startswith(DETAIL_PREFIX) and value != "":
            detail[name[len(DETAIL_PREFIX) :]] = value
    if not at.endswith("Z"):  # epoch seconds, as the Lua scripts write them
        at = time_text(float(at))
    return Pending(record_id, at, action, Actor.of(actor), fields.get("task_id"), fields.get("dataset"), detail)


@dataclass(frozen=True)
class AuditRecord:
    """A record in a store: its place in the chain (``seq``) and the hashes that link it there."""

    seq: int
    pending: Pending
    prev_hash: str
    hash: str

    @property
    def id(self) -> str:
        return self.pending.id

    @property
    def at(self) -> str:
        return self.pending.at

    @property
    def action(self) -> str:
        return self.pending.action

    def as_dict(self) -> dict[str, Any]:
        """The exported form (``dataport audit export``)."""
        return {"seq": self.seq, **self.pending.body(), "prev_hash": self.prev_hash, "hash": self.hash}

    def moved(self, seq: int) -> AuditRecord:
        return replace(self, seq=seq)


def dumps(value: Any) -> str:
    """Canonical JSON text: sorted keys, no spaces; what the stores keep for ``detail``."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None
