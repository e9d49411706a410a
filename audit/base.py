"""The interface every audit store implements, and the choice between them.

A store keeps one hash chain (``chain.py``) in ``seq`` order. ``append`` is the only write: it
skips records whose id is already stored (a drain may deliver a record twice, ``drain.py``), links
the rest after the current head, and makes sure two writers can never both extend the chain from
the same head (a lock or a conditional write, per store). ``prune`` removes the oldest records and
moves the anchor along, so that ``verify`` still checks the oldest kept record's link.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from audit.records import AuditRecord, Pending
from dataport.settings import Settings


@dataclass(frozen=True)
class Filters:
    """What ``auditEvents`` and ``dataport audit export`` narrow by; None means any. ``since`` and
    ``until`` are record times (``records.time_text``), ``since`` inclusive, ``until`` exclusive."""

    task_id: str | None = None
    dataset: str | None = None
    actor: str | None = None
    action: str | None = None
    since: str | None = None
    until: str | None = None

    def matches(self, record: AuditRecord) -> bool:
        p = record.pending
        return (
            (self.task_id is None or p.task_id == self.task_id)
            and (self.dataset is None or p.dataset == self.dataset)
            and (self.actor is None or p.actor.user == self.actor)
            and (self.action is None or p.action == self.action)
            and (self.since is None or p.at >= self.since)
            and (self.until is None or p.at < self.until)
        )


@dataclass(frozen=True)
class Page:
    """Newest first; ``has_next`` when records older than the last one match too."""

    records: list[AuditRecord]
    has_next: bool


class AuditStore(Protocol):
    name: str

    async def append(self, records: Sequence[Pending]) -> int:
        """Link the records not stored yet into the chain, in the order given; how many were new."""
        ...

    def scan(self, filters: Filters | None = None) -> AsyncIterator[AuditRecord]:
        """Every record (or those matching), oldest first, in chain order."""
        ...

    async def page(self, filters: Filters, first: int, before_seq: int | None = None) -> Page:
        """Up to ``first`` matching records older than ``before_seq``, newest first."""
        ...

    async def anchor(self) -> str:
        """The hash the oldest kept record must point to: ``GENESIS``, or the last pruned one's."""
        ...

    async def prune(self, before: str) -> int:
        """Remove the records older than ``before`` (a record time), oldest first; how many."""
        ...

    async def close(self) -> None: ...


def store_from_settings(settings: Settings) -> AuditStore:
    """The store ``DATAPORT_AUDIT_STORE`` names (``none`` has no store: ask ``audit_enabled``)."""
    kind = settings.audit_store
    if kind == "sqlite":
        from audit.sqlite import SqliteAuditStore

        path = settings.audit_url or str(settings.data_dir / "audit.sqlite3")
        return SqliteAuditStore(path)
    if kind == "postgres":
        from audit.postgres import PostgresAuditStore

        if not settings.audit_url:
            raise RuntimeError(
                "DATAPORT_AUDIT_URL must name the PostgreSQL database with DATAPORT_AUDIT_STORE=postgres"
            )
        return PostgresAuditStore(settings.audit_url, settings.audit_table)
    if kind == "dynamodb":
        from audit.dynamodb import DynamoAuditStore

        return DynamoAuditStore(
            settings.audit_table,
            endpoint_url=settings.audit_url or None,
            region=settings.audit_region,
            create=settings.audit_create_table,
        )
    raise RuntimeError("the audit log is off (DATAPORT_AUDIT_STORE=none)")
