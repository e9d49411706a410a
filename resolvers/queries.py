"""Query resolvers: thin calls into the task service."""

from __future__ import annotations

import strawberry

from api.context import Info
from schema.enums import TaskStatus
from schema.types import Dataset, Edge, ExportTask, ExportTaskConnection, ImportTask, ImportTaskConnection, PageInfo
from tasks import exports, imports
from tasks.store import encode_cursor


def datasets(info: Info) -> list[Dataset]:
    return [Dataset.of(d) for d in info.context.services.registry]


async def export_task(info: Info, id: strawberry.ID) -> ExportTask | None:
    task = await exports.get_export(info.context.services, info.context.owner, id)
    return ExportTask(task=task) if task else None


async def export_tasks(
    info: Info, first: int = 20, after: str | None = None, status: TaskStatus | None = None
) -> ExportTaskConnection:
    page = await exports.list_exports(info.context.services, info.context.owner, first, after, status)
    return ExportTaskConnection(
        edges=[Edge(cursor=encode_cursor(t.id), node=ExportTask(task=t)) for t in page.tasks],
        page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        total_count=page.total,
    )


async def import_task(info: Info, id: strawberry.ID) -> ImportTask | None:
    task = await imports.get_import(info.context.services, info.context.owner, id)
    return ImportTask(task=task) if task else None


async def import_tasks(
    info: Info, first: int = 20, after: str | None = None, status: TaskStatus | None = None
) -> ImportTaskConnection:
    page = await imports.list_imports(info.context.services, info.context.owner, first, after, status)
    return ImportTaskConnection(
        edges=[Edge(cursor=encode_cursor(t.id), node=ImportTask(task=t)) for t in page.tasks],
        page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        total_count=page.total,
    )
