"""Exports as the API sees them: request, read, cancel, retry, delete.

The GraphQL resolvers call these functions and nothing else; every check that can fail with a
``userErrors`` entry happens here, before anything is queued. A new task or a new run counts
against its owner's active tasks (``QUOTA_EXCEEDED``), checked in the same atomic step that creates
it (``TaskStore.request``); asking again for a task already active returns it and is never refused.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import orjson

from audit.outbox import actor_of
from audit.records import ACCESS_DENIED, EXPORT_REQUESTED, TASK_CANCELLED, TASK_RETRIED
from dataport import errors
from dataport.errors import UserErrors
from formats import WRITERS
from sources.base import Dataset, SourceError
from sources.query import Query, QueryTooComplex, ScopeMissing, build_query
from tasks import queue
from tasks.access import (
    Identity,
    Owner,
    may_read_rows_of,
    readable,
    scope_for_request,
    scope_from_request,
    scope_value,
    sees_task,
)
from tasks.file_names import checked_label, file_name
from tasks.ids import task_id
from tasks.models import FINAL_STATUSES, Task, TaskKind, TaskStatus, now, stamp
from tasks.reads import read_task
from tasks.services import Services
from tasks.store import Page, QuotaExceeded, RequestOutcome

EXPORT_JOB = "run_export"


def quota_exceeded(limit: int, field: tuple[str, ...]) -> UserErrors:
    return UserErrors.one(
        f"You have {limit} active exports and imports, the most allowed at once; wait for one to finish "
        "or cancel one, then ask again.",
        errors.QUOTA_EXCEEDED,
        *field,
    )


async def check_quota(services: Services, owner: Owner, field: tuple[str, ...]) -> None:
    """Refuse early, before any costly check, when the owner is at the quota already. Only a
    shortcut: the authoritative check is atomic with the task's creation."""
    limit = services.settings.max_active_tasks_per_user
    if await services.store.active_count(owner.id) >= limit:
        raise quota_exceeded(limit, field)


async def request_task(
    services: Services,
    identifier: str,
    fields: dict[str, Any],
    reuse_seconds: float,
    field: tuple[str, ...],
    identity: Identity | None = None,
    action: str = "",
) -> RequestOutcome:
    """``TaskStore.request`` under the owner's quota of active tasks; ``UserErrors`` past it. The
    audit record (``action`` by ``identity``) carries the canonical request."""
    limit = services.settings.max_active_tasks_per_user
    try:
        return await services.store.request(
            identifier,
            fields,
            reuse_seconds=reuse_seconds,
            max_active=limit,
            action=action,
            actor=actor_of(identity),
            detail={"request": orjson.loads(fields["request"]), "format": fields["format"]},
        )
    except QuotaExceeded:
        raise quota_exceeded(limit, field) from None


def _canonical_filters(filters: Any) -> list[dict[str, Any]]:
    return [
        {k: f.get(k) for k in ("field", "op", "value", "values") if f.get(k) is not None}
        for f in filters or []
        if isinstance(f, dict)
    ]


def canonical_request(data: dict[str, Any]) -> dict[str, Any]:
    """The parts of an export request that decide its result (and so its id).

    ``anyOf``, ``compression`` and ``label`` are there only when given (groups, not NONE, a
    label): a request without them keeps the id it had before they existed. The label is part of
    the id on purpose: it names the file (``fileName``, the download's name) and the history's
    entry, so two requests that differ only in their label are two exports the user wants to tell
    apart, each with its own name; asking twice with the same label still finds the one task.
    """
    request: dict[str, Any] = {
        "columns": data.get("columns"),
        "filters": _canonical_filters(data.get("filters")),
        "sort": [{"field": s["field"], "direction": str(s.get("direction") or "ASC")} for s in data.get("sort") or []],
        "limit": data.get("limit"),
        "format": data["format"],
    }
    groups = data.get("anyOf")
    if groups:
        request["anyOf"] = [
            {"filters": _canonical_filters(g.get("filters"))} if isinstance(g, dict) else g for g in groups
        ]
    if (data.get("compression") or "NONE") != "NONE":
        request["compression"] = data["compression"]
    if data.get("label"):
        request["label"] = data["label"]
    return request


async def denied_dataset(services: Services, identity: Identity, name: str, what: str) -> None:
    """Record a refused dataset: one that exists but the caller may not use (a missing one is a
    typo, not a refusal). The caller answers both alike."""
    if services.registry.get(name) is not None:
        await services.audit.record(ACCESS_DENIED, identity, dataset=name, reason=f"{what}: dataset not permitted")


async def denied_task(services: Services, identity: Identity, task: Task, reason: str) -> None:
    await services.audit.record(ACCESS_DENIED, identity, task_id=task.id, dataset=task.dataset, reason=reason)


def dataset_not_found(name: str) -> UserErrors:
    """The answer for a dataset that is missing and for one the caller may not read alike."""
    return UserErrors.one(f"There is no dataset '{name}'.", errors.DATASET_NOT_FOUND, "input", "dataset")


def task_query(dataset: Dataset, request: dict[str, Any]) -> Query:
    """The query a task's request stands for, under the scope it was asked with."""
    r = request
    scope = scope_from_request(r)
    try:
        return build_query(
            dataset,
            r.get("columns"),
            r.get("filters"),
            r.get("sort"),
            r.get("limit"),
            scope=scope,
            any_of=r.get("anyOf"),
        )
    except ScopeMissing:  # asked for before the dataset was scoped: it was asked for every tenant
        raise UserErrors.one(
            f"Dataset '{dataset.name}' now keeps each tenant's rows apart; ask for this export again.",
            errors.FORBIDDEN,
            "id",
        ) from None


async def request_export(services: Services, identity: Identity, data: dict[str, Any]) -> Task:
    """Validate, count, then create (or find) the task and queue it. Raises ``UserErrors``."""
    owner = identity.owner
    dataset = readable(services.registry.get(data["dataset"]), identity)
    if dataset is None:
        await denied_dataset(services, identity, data["dataset"], "export")
        raise dataset_not_found(data["dataset"])
    if data["format"] not in WRITERS:
        raise UserErrors.one(f"Format {data['format']} is not supported.", errors.UNSUPPORTED_FORMAT, "input", "format")
    data = {**data, "label": checked_label(data.get("label"))}
    request = canonical_request(data)
    if dataset.scope is not None:  # part of the id too: another scope never reuses this export
        request["scope"] = scope_for_request(scope_value(identity, dataset))
    query = task_query(dataset, request)
    identifier = task_id(owner.id, TaskKind.EXPORT.value, dataset.name, request)

    existing = await services.store.get(identifier)
    matching: int | None = None
    if existing is None or existing.status not in (TaskStatus.PENDING, TaskStatus.PROCESSING):
        if existing is None or existing.status is not TaskStatus.SUCCEEDED:  # a success may be reused
            await check_quota(services, owner, ("input",))
        matching = await _count_within_limit(services, dataset, query)

    outcome = await request_task(
        services,
        identifier,
        {
            "id": identifier,
            "kind": TaskKind.EXPORT.value,
            "owner": owner.id,
            "email": owner.email,
            "dataset": dataset.name,
            "format": data["format"],
            "request": _json(request),
            "notify": bool(data.get("notify")),
            "status": TaskStatus.PENDING.value,
            "created_at": stamp(),
            "attempts": 0,
            "processed_rows": 0,
            "total_rows": matching,  # the worker need not count again
            "bytes": 0,
        },
        services.settings.export_reuse_seconds,
        ("input",),
        identity,
        EXPORT_REQUESTED,
    )
    if outcome.needs_job:
        await queue.enqueue(services.arq, services.settings.queue_name, EXPORT_JOB, outcome.task)
    return outcome.task


async def _count_within_limit(
    services: Services,
    dataset: Dataset,
    query: Query,
    fields: tuple[tuple[str, ...], tuple[str, ...]] = (("input", "dataset"), ("input", "filters")),
) -> int:
    """The rows ``query`` gives, counted no further than the dataset's ``max_export_rows``. More
    than that is a user error, and so is a source that cannot be read; ``fields`` name the field
    of each (a retry has only its ``id``)."""
    source = services.registry.open(dataset)
    try:
        matching = await source.count(query, cap=dataset.max_export_rows + 1)
    except QueryTooComplex as e:  # the request's fault: simplify it, waiting will not help
        raise UserErrors.one(
            f"The filters are too complex for this dataset: {e}", errors.TOO_MANY_VALUES, *fields[1]
        ) from None
    except SourceError as e:
        raise UserErrors.one(
            f"The dataset cannot be read right now: {e}", errors.SOURCE_UNAVAILABLE, *fields[0]
        ) from None
    finally:
        await source.close()
    if matching > dataset.max_export_rows:
        raise UserErrors.one(
            f"More than {dataset.max_export_rows:,} rows match; narrow the filters or set a limit.",
            errors.TOO_MANY_ROWS,
            *fields[1],
        )
    return matching


async def get_export(
    services: Services,
    identity: Identity,
    identifier: str,
    count_poll: bool = False,
    with_position: bool = False,
) -> Task | None:
    """The caller's export (any user's, for an admin); None for a missing one and another's alike.
    ``count_poll``: the client asks for ``pollAfterSeconds``, so count its poll in the same round
    trip; ``with_position``: it asks for ``queuePosition``, so read that in it too (tasks/reads.py)."""
    if count_poll or with_position:
        owner = None if identity.admin else identity.owner.id
        queue_name = services.settings.queue_name if with_position else None
        task = await read_task(
            services.redis, identifier, TaskKind.EXPORT, owner, count_poll=count_poll, queue_name=queue_name
        )
    else:
        task = await services.store.get(identifier)
    return await seen_task(services, identity, task, TaskKind.EXPORT)


async def seen_task(services: Services, identity: Identity, task: Task | None, kind: TaskKind) -> Task | None:
    """``task`` if it is a ``kind`` task the caller may see; None for a missing one, one of the other
    kind and another owner's alike (the last recorded in the audit log as denied)."""
    if task is None or task.kind is not kind:
        return None
    if not sees_task(identity, task.owner):
        await denied_task(services, identity, task, f"another owner's {kind.value}")
        return None
    return task


async def list_exports(
    services: Services, owner: str, first: int, after: str | None, status: TaskStatus | None
) -> Page:
    """``owner``'s exports: the resolver passes the caller, or for an admin whoever they name."""
    first = max(0, min(first, 100))
    return await services.store.page(owner, TaskKind.EXPORT, first, after, status)


def cancelled_by(identity: Identity, task: Task) -> str:
    return "cancelled by the owner" if task.owner == identity.owner.id else f"cancelled by admin {identity.owner.id}"


async def cancel_export(services: Services, identity: Identity, identifier: str) -> Task:
    """The owner, or an admin, stops an export that has not finished."""
    task = await _visible(services, identity, identifier)
    result = await services.store.transition(
        task.id,
        TaskStatus.CANCELLED,
        cancelled_by(identity, task),
        allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
        fields={"finished_at": stamp()},
        action=TASK_CANCELLED,
        actor=actor_of(identity),
    )
    if not result.ok:
        raise UserErrors.one(
            f"The export is {result.status.value if result.status else 'gone'} and can no longer be cancelled.",
            errors.INVALID_STATUS,
            "id",
        )
    await queue.abort(services.arq, services.settings.queue_name, queue.job_id_for(task))
    return await _visible(services, identity, identifier)


async def retry_export(services: Services, identity: Identity, identifier: str) -> Task:
    """The owner runs a failed or cancelled export again, while they may still read its rows."""
    owner = identity.owner
    task = await _owned(services, identity, identifier)
    if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        raise UserErrors.one(
            f"Only failed or cancelled exports can be retried; this one is {task.status.value}.",
            errors.INVALID_STATUS,
            "id",
        )
    await check_quota(services, owner, ("id",))
    # Counted again, as a new request is: the rows may have grown past the maximum since, and the
    # worker takes this count. A dataset that is gone or changed is left to the worker to report.
    dataset = services.registry.get(task.dataset)
    if dataset is not None and not may_read_rows_of(identity, dataset, task.request):
        # Access was taken away (or the caller's scope changed) since the export was asked for.
        await denied_task(services, identity, task, "retry: dataset no longer permitted")
        raise dataset_not_found(task.dataset)
    query = None
    if dataset is not None:
        try:
            query = task_query(dataset, task.request)
        except UserErrors:  # the dataset changed since the request
            pass
    matching = (
        None
        if dataset is None or query is None
        else await _count_within_limit(services, dataset, query, (("id",), ("id",)))
    )
    outcome = await request_task(
        services,
        task.id,
        {
            "id": task.id,
            "kind": task.kind.value,
            "owner": task.owner,
            "email": task.email,
            "dataset": task.dataset,
            "format": task.format,
            "request": _json(task.request),
            "notify": task.notify,
            "status": TaskStatus.PENDING.value,
            "created_at": stamp(),
            "attempts": 0,
            "processed_rows": 0,
            "total_rows": matching,
            "bytes": 0,
        },
        -1,
        ("id",),
        identity,
        TASK_RETRIED,
    )
    if outcome.needs_job:
        await queue.enqueue(services.arq, services.settings.queue_name, EXPORT_JOB, outcome.task)
    return outcome.task


async def delete_export(services: Services, identity: Identity, identifier: str) -> Task:
    """Remove the task and its file. A running export is cancelled first. Only its owner may."""
    task = await _owned(services, identity, identifier)
    if task.status not in FINAL_STATUSES:
        await services.store.transition(
            task.id,
            TaskStatus.CANCELLED,
            "deleted by the owner",
            fields={"finished_at": stamp()},
            action=TASK_CANCELLED,
            actor=actor_of(identity),
        )
        await queue.abort(services.arq, services.settings.queue_name, queue.job_id_for(task))
    if task.object_key:
        await services.storage.delete(task.object_key)
    await services.store.delete(task, actor_of(identity))
    return task


def has_file(task: Task) -> bool:
    """Whether the task has a file to download (``download_url`` is None at once otherwise)."""
    return task.status is TaskStatus.SUCCEEDED and bool(task.object_key)


async def download_url(services: Services, identity: Identity, task: Task) -> str | None:
    """A fresh signed URL on every read, valid for the configured 15 minutes; only for a caller who
    may read the file's rows now (``may_read_rows_of``)."""
    if not has_file(task):
        return None
    if not may_read_rows_of(identity, services.registry.get(task.dataset), task.request):
        return None
    return await signed_download_url(services, task, identity)


async def signed_download_url(services: Services, task: Task, issued_to: Identity) -> str | None:
    """The signed URL itself, without the caller check of ``download_url``: for a caller already
    checked, and for the owner's own email and webhook when the task finishes (they asked for it,
    under the scope it ran with, moments before; the worker has no token to check)."""
    if task.status is not TaskStatus.SUCCEEDED or not task.object_key:
        return None
    return await issue_url(services, task.object_key, task.id, file_name(task), issued_to)


async def issue_url(services: Services, key: str, task_id: str, filename: str, issued_to: Identity) -> str:
    """A signed URL of the stored file ``key``, valid for DATAPORT_DOWNLOAD_URL_TTL_SECONDS, its
    issue recorded in the audit log under ``issued_to`` (which names the downloader)."""
    ttl = services.settings.download_url_ttl_seconds
    expires_at = now() + dt.timedelta(seconds=ttl)
    url = await services.storage.download_url(key, task_id=task_id, filename=filename, expires_at=expires_at)
    await services.audit.issued(url, issued_to, ttl)
    return url


async def poll_after_seconds(services: Services, task: Task) -> float | None:
    """x + n·ln 2 seconds, n = polls so far: polling clients back off as a task runs long."""
    if task.status in FINAL_STATUSES:
        return None
    polls = task.polls if task.poll_counted else await services.store.count_poll(task.id)
    return poll_hint(services, polls)


def poll_hint(services: Services, polls: int) -> float:
    """``poll_after_seconds`` after ``polls`` polls."""
    return round(services.settings.poll_base_seconds + polls * math.log(2), 3)


async def queue_position(services: Services, task: Task) -> int | None:
    if task.status is not TaskStatus.PENDING:
        return None
    if task.position_read:  # read with the task, in its round trip (tasks/reads.py)
        return task.queue_position
    return await queue.position(services.arq, services.settings.queue_name, queue.job_id_for(task))


async def _visible(services: Services, identity: Identity, identifier: str) -> Task:
    task = await get_export(services, identity, identifier)
    if task is None:  # another owner's task is reported exactly as a missing one
        raise UserErrors.one(f"There is no export '{identifier}'.", errors.NOT_FOUND, "id")
    return task


async def _owned(services: Services, identity: Identity, identifier: str) -> Task:
    """The caller's own export: retrying and deleting are the owner's alone, even for an admin."""
    task = await _visible(services, identity, identifier)
    if task.owner != identity.owner.id:
        await denied_task(services, identity, task, "only the owner may retry or delete an export")
        raise UserErrors.one("Only the export's owner can do this.", errors.FORBIDDEN, "id")
    return task


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
