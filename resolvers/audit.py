"""``auditEvents``: the audit log, newest first, for admins only (docs/audit.md).

A non-admin gets a top-level ``FORBIDDEN`` (as ``exportTasks(owner:)`` does), and the refusal is
itself recorded. The cursor is the record's place in the chain, so records drained meanwhile never
shift a page.
"""

from __future__ import annotations

import base64
import datetime as dt

import strawberry
from graphql import GraphQLError

from api.context import Info
from audit.base import Filters
from audit.records import ACCESS_DENIED, AuditRecord, parse_time_text, time_text
from schema.types import AuditEvent, AuditEventConnection, Edge, PageInfo

MAX_FIRST = 500


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"audit:{seq}".encode()).decode()


def _seq(cursor: str) -> int:
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind == "audit":
            return int(seq)
    except ValueError:
        pass
    raise GraphQLError("after is not a cursor of auditEvents.", extensions={"code": "BAD_USER_INPUT"})


def _time(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return time_text(moment.timestamp())


def _event(record: AuditRecord) -> AuditEvent:
    p = record.pending
    return AuditEvent(
        id=strawberry.ID(p.id),
        at=parse_time_text(p.at),
        action=p.action,
        actor=p.actor.user,
        roles=list(p.actor.roles),
        address=p.actor.address,
        user_agent=p.actor.user_agent,
        task_id=strawberry.ID(p.task_id) if p.task_id else None,
        dataset=p.dataset,
        detail=dict(p.detail),
        prev_hash=record.prev_hash,
        hash=record.hash,
    )


async def audit_events(
    info: Info,
    task_id: strawberry.ID | None = None,
    dataset: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    first: int = 50,
    after: str | None = None,
) -> AuditEventConnection:
    identity = info.context.identity
    services = info.context.services
    if not identity.admin:
        await services.audit.record(ACCESS_DENIED, identity, reason="FORBIDDEN", field="auditEvents")
        raise GraphQLError("Only an admin can read the audit log.", extensions={"code": "FORBIDDEN"})
    if services.settings.audit_store == "none":
        return AuditEventConnection(edges=[], page_info=PageInfo(has_next_page=False, end_cursor=None))
    filters = Filters(
        task_id=task_id, dataset=dataset, actor=actor, action=action, since=_time(since), until=_time(until)
    )
    first = max(0, min(first, MAX_FIRST))
    page = await services.audit_store().page(filters, first, _seq(after) if after else None)
    edges = [Edge(cursor=_cursor(r.seq), node=_event(r)) for r in page.records]
    return AuditEventConnection(
        edges=edges, page_info=PageInfo(has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None)
    )
