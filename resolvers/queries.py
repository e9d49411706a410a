"""Query resolvers: thin calls into the task service."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError

from api.context import Info
from audit.records import ACCESS_DENIED
from resolvers.selection import selected
from schema.enums import TaskStatus
from schema.types import Dataset, Edge, ExportTask, ExportTaskConnection, ImportTask, ImportTaskConnection, PageInfo
from tasks import exports, imports
from tasks.access import may_import, may_read
from tasks.store import encode_cursor


def datasets(info: Info) -> list[Dataset]:
    """The datasets the caller may read; the others do not exist for them."""
    identity = info.context.identity
    registry = info.context.services.registry
    return [Dataset.of(d, importable=may_import(identity, d)) for d in registry if may_read(identity, d)]


async def listed_owner(info: Info, owner: str | None) -> str:
    """Whose tasks a list shows: the caller's, or for an admin whoever ``owner`` names."""
    identity = info.context.identity
    if owner is None or owner == identity.owner.id:
        return identity.owner.id
    if not identity.admin:
        await info.context.services.audit.record(ACCESS_DENIED, identity, reason="FORBIDDEN", owner=owner)
        raise GraphQLError("Only an admin can list another user's tasks.", extensions={"code": "FORBIDDEN"})
    return owner


async def export_task(info: Info, id: strawberry.ID) -> ExportTask | None:
    # One round trip for a polling client: the read counts the poll pollAfterSeconds would count and
    # finds the queue position queuePosition would (tasks/reads.py).
    counting, position = selected(info, "pollAfterSeconds", "queuePosition")
    task = await exports.get_export(
        info.context.services, info.context.identity, id, count_poll=counting, with_position=position
    )
    return ExportTask(task=task) if task else None


async def export_tasks(
    info: Info,
    first: int = 20,
    after: str | None = None,
    status: TaskStatus | None = None,
    owner: str | None = None,
) -> ExportTaskConnection:
    who = await listed_owner(info, owner)
    page = await exports.list_exports(info.context.services, who, first, after, status)
    return ExportTaskConnection(
        edges=[Edge(cursor=encode_cursor(t.id), node=ExportTask(task=t)) for t in page.tasks],
        page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        total_count=page.total,
    )


async def import_task(info: Info, id: strawberry.ID) -> ImportTask | None:
    task = await imports.get_import(info.context.services, info.context.identity, id)
    return ImportTask(task=task) if task else None


async def import_tasks(
    info: Info,
    first: int = 20,
    after: str | None = None,
    status: TaskStatus | None = None,
    owner: str | None = None,
) -> ImportTaskConnection:
    who = await listed_owner(info, owner)
    page = await imports.list_imports(info.context.services, who, first, after, status)
    return ImportTaskConnection(
        edges=[Edge(cursor=encode_cursor(t.id), node=ImportTask(task=t)) for t in page.tasks],
        page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        total_count=page.total,
    )
