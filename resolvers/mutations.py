"""Mutation resolvers: expected failures become ``userErrors``, everything else stays inside."""

from __future__ import annotations

from collections.abc import Awaitable

import strawberry

from api.context import Info
from dataport.errors import UserErrors
from schema.inputs import ExportInput
from schema.types import ExportPayload, ExportTask, UserError
from tasks import exports
from tasks.models import Task


async def _payload(call: Awaitable[Task]) -> ExportPayload:
    try:
        task = await call
    except UserErrors as e:
        return ExportPayload(task=None, user_errors=[UserError.of(x) for x in e.errors])
    return ExportPayload(task=ExportTask(task=task), user_errors=[])


async def request_export(info: Info, input: ExportInput) -> ExportPayload:
    ctx = info.context
    return await _payload(exports.request_export(ctx.services, ctx.owner, input.to_request()))


async def cancel_export(info: Info, id: strawberry.ID) -> ExportPayload:
    return await _payload(exports.cancel_export(info.context.services, info.context.owner, id))


async def retry_export(info: Info, id: strawberry.ID) -> ExportPayload:
    return await _payload(exports.retry_export(info.context.services, info.context.owner, id))


async def delete_export(info: Info, id: strawberry.ID) -> ExportPayload:
    return await _payload(exports.delete_export(info.context.services, info.context.owner, id))
