"""Subscription resolvers: the current snapshot first, then every change, then done; each inside
``api.subscription_guard`` (the user's subscription quota, and an end when the token expires).

All of them follow tasks through the process's one Redis subscription (``tasks/fanout.py``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry
from graphql import GraphQLError

from api.context import Info
from api.subscription_guard import guarded
from api.subscription_push import direct_push
from schema.types import ExportTask, ImportTask, TaskUpdate
from tasks import exports, imports
from tasks.fanout import TaskFanout
from tasks.models import Task, TaskKind
from tasks.watch import watch, watch_owner


def _fanout(info: Info) -> TaskFanout:
    fanout = info.context.services.fanout
    assert fanout is not None, "the api's lifespan starts the task fan-out"
    return fanout


# What each subscription yields for a task (and what its direct pushes present, api/subscription_push.py).
def _export(task: Task) -> ExportTask:
    return ExportTask(task=task)


def _import(task: Task) -> ImportTask:
    return ImportTask(task=task)


def _update(task: Task) -> TaskUpdate:
    return ExportTask(task=task) if task.kind is TaskKind.EXPORT else ImportTask(task=task)


async def export_progress(info: Info, id: strawberry.ID) -> AsyncGenerator[ExportTask, None]:
    services = info.context.services
    if await exports.get_export(services, info.context.identity, id) is None:
        # the same answer for a missing task and for someone else's
        raise GraphQLError(f"There is no export '{id}'.", extensions={"code": "NOT_FOUND"})
    async for task in guarded(info, watch(_fanout(info), id, direct_push(_export))):
        yield _export(task)


async def import_progress(info: Info, id: strawberry.ID) -> AsyncGenerator[ImportTask, None]:
    services = info.context.services
    if await imports.get_import(services, info.context.identity, id) is None:
        raise GraphQLError(f"There is no import '{id}'.", extensions={"code": "NOT_FOUND"})
    async for task in guarded(info, watch(_fanout(info), id, direct_push(_import))):
        yield _import(task)


async def task_updates(info: Info) -> AsyncGenerator[TaskUpdate, None]:
    """The caller's active tasks as they are now, then every change of any of the caller's tasks
    (exports and imports; an admin's own too: other users' tasks never arrive here). Endless: the
    client ends it, or the token's expiry does."""
    owner = info.context.identity.owner.id
    async for task in guarded(info, watch_owner(_fanout(info), owner, direct_push(_update))):
        yield _update(task)
