"""Mutation resolvers: expected failures become ``userErrors``, everything else stays inside.

Every mutation is counted against its user's and address's rate limits first
(``api/mutation_limits.py``); a refused one does nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable

import strawberry

from api.context import Info
from api.mutation_limits import check_mutation
from dataport.errors import UserErrors
from schema.inputs import ExportInput, ImportInput
from schema.types import ExportPayload, ExportTask, ImportPayload, ImportTask, UserError
from tasks import exports, imports
from tasks.models import Task


async def _payload(call: Awaitable[Task]) -> ExportPayload:
    try:
        task = await call
    except UserErrors as e:
        return ExportPayload(task=None, user_errors=[UserError.of(x) for x in e.errors])
    return ExportPayload(task=ExportTask(task=task), user_errors=[])


async def _import_payload(call: Awaitable[Task]) -> ImportPayload:
    try:
        task = await call
    except UserErrors as e:
        return ImportPayload(task=None, user_errors=[UserError.of(x) for x in e.errors])
    return ImportPayload(task=ImportTask(task=task), user_errors=[])


async def request_export(info: Info, input: ExportInput) -> ExportPayload:
    await check_mutation(info)
    ctx = info.context
    return await _payload(exports.request_export(ctx.services, ctx.identity, input.to_request()))


async def cancel_export(info: Info, id: strawberry.ID) -> ExportPayload:
    await check_mutation(info)
    return await _payload(exports.cancel_export(info.context.services, info.context.identity, id))


async def retry_export(info: Info, id: strawberry.ID) -> ExportPayload:
    await check_mutation(info)
    return await _payload(exports.retry_export(info.context.services, info.context.identity, id))


async def delete_export(info: Info, id: strawberry.ID) -> ExportPayload:
    await check_mutation(info)
    return await _payload(exports.delete_export(info.context.services, info.context.identity, id))


async def request_import(info: Info, input: ImportInput) -> ImportPayload:
    await check_mutation(info)
    ctx = info.context
    return await _import_payload(imports.request_import(ctx.services, ctx.identity, input.to_request()))


async def start_import(info: Info, id: strawberry.ID) -> ImportPayload:
    await check_mutation(info)
    return await _import_payload(imports.start_import(info.context.services, info.context.identity, id))


async def cancel_import(info: Info, id: strawberry.ID) -> ImportPayload:
    await check_mutation(info)
    return await _import_payload(imports.cancel_import(info.context.services, info.context.identity, id))
