"""Subscription resolvers: the current snapshot first, then every change, then done; each inside
``api.subscription_guard`` (the user's subscription quota, and an end when the token expires)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry
from graphql import GraphQLError

from api.context import Info
from api.subscription_guard import guarded
from schema.types import ExportTask, ImportTask
from tasks import exports, imports
from tasks.watch import watch


async def export_progress(info: Info, id: strawberry.ID) -> AsyncGenerator[ExportTask, None]:
    services = info.context.services
    if await exports.get_export(services, info.context.identity, id) is None:
        # the same answer for a missing task and for someone else's
        raise GraphQLError(f"There is no export '{id}'.", extensions={"code": "NOT_FOUND"})
    async for task in guarded(info, watch(services, id)):
        yield ExportTask(task=task)


async def import_progress(info: Info, id: strawberry.ID) -> AsyncGenerator[ImportTask, None]:
    services = info.context.services
    if await imports.get_import(services, info.context.identity, id) is None:
        raise GraphQLError(f"There is no import '{id}'.", extensions={"code": "NOT_FOUND"})
    async for task in guarded(info, watch(services, id)):
        yield ImportTask(task=task)
