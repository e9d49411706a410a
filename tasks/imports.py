"""Imports as the API sees them: request an upload slot, start, cancel, read.

An import lives in three steps: ``requestImport`` creates the task in ``WAITING_FOR_UPLOAD`` with
an upload target (a presigned S3 POST/PUT, or a signed ``PUT /uploads/{id}`` on the local
backend); the client uploads straight to storage; then ``startImport`` (or an S3 bucket
notification on ``POST /storage-events``) checks the object and queues the worker. Starting is a
status transition in the task store's script, so two triggers can never queue it twice.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import unicodedata
from typing import Any

import orjson

from audit.outbox import actor_of
from audit.records import IMPORT_REQUESTED, TASK_CANCELLED
from dataport import errors
from dataport.errors import UserErrors
from formats import WRITERS
from storage.base import UploadTarget
from storage.local import PARTIAL
from tasks import queue, sealing
from tasks.access import (
    NO_ROWS,
    Identity,
    may_import,
    may_read_rows_of,
    readable,
    scope_for_request,
    scope_value,
)
from tasks.exports import (
    cancelled_by,
    dataset_not_found,
    denied_dataset,
    denied_task,
    issue_url,
    request_task,
    seen_task,
)
from tasks.ids import random_task_id
from tasks.models import Task, TaskKind, TaskStatus, now, stamp
from tasks.services import Services
from tasks.store import Page

IMPORT_JOB = "run_import"
IMPORT_FORMATS = ("CSV", "JSON", "NDJSON", "XLSX")
# In UTF-8 bytes: a file system takes at most 255 for one name, and the local backend adds a
# ".partial-" suffix of 25 while the file arrives (200 characters of CJK text were 600 bytes).
MAX_FILE_NAME = 200
# A waiting import whose upload window has closed is kept this much longer before it is expired,
# so that an upload finished at the last second can still be started.
START_GRACE_SECONDS = 600
_TASK_ID = re.compile(r"^[a-z2-7]{24}$")


def object_key(owner: str, task_id: str, file_name: str) -> str:
    return f"imports/{owner}/{task_id}/{file_name}"


def report_key(task: Task) -> str:
    """The error report, beside the upload (DESIGN.md: ``imports/{owner}/{task_id}/…``)."""
    stem = (task.request.get("fileName") or "import").rsplit(".", 1)[0]
    return f"imports/{task.owner}/{task.id}/report/{stem}-errors.csv"


def results_key(task: Task) -> str:
    """The results file (``results: true``: one line per input row), beside the error report."""
    stem = (task.request.get("fileName") or "import").rsplit(".", 1)[0]
    return f"imports/{task.owner}/{task.id}/report/{stem}-results.csv"


# The download route's name for a task's results file (``GET /files/{task_id}.results``): signed
# as it is, so a link to the error report cannot be turned into one to the results.
RESULTS_SUFFIX = ".results"
# At most this many entries in a columnMap (a file has at most this many columns worth mapping).
MAX_COLUMN_MAP = 1_000


def clean_file_name(name: str) -> str:
    """The last path segment of what the browser reported, without control characters. Raises
    ``UserErrors`` for a name that is empty, too long, or only dots."""
    base = re.split(r"[\\/]", name.strip())[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if not base or set(base) == {"."}:
        raise UserErrors.one(
            "The file name is empty; send the name of the file being uploaded.",
            errors.INVALID_FILE_NAME,
            "input",
            "fileName",
        )
    if len(base.encode()) > MAX_FILE_NAME:
        raise UserErrors.one(
            f"The file name is longer than {MAX_FILE_NAME} bytes (UTF-8).",
            errors.INVALID_FILE_NAME,
            "input",
            "fileName",
        )
    if PARTIAL in base:  # the local backend's name for a file still arriving
        raise UserErrors.one(
            f"The file name may not contain '{PARTIAL}'.", errors.INVALID_FILE_NAME, "input", "fileName"
        )
    return base


async def request_import(services: Services, identity: Identity, data: dict[str, Any]) -> Task:
    """Validate the request and create the task, waiting for its upload. Raises ``UserErrors``."""
    settings = services.settings
    owner = identity.owner
    dataset = readable(services.registry.get(data["dataset"]), identity)
    if dataset is None:
        await denied_dataset(services, identity, data["dataset"], "import")
        raise dataset_not_found(data["dataset"])
    if not dataset.importable:
        raise UserErrors.one(
            f"Dataset '{dataset.name}' does not accept imports.", errors.NOT_IMPORTABLE, "input", "dataset"
        )
    if not may_import(identity, dataset):
        await denied_dataset(services, identity, dataset.name, "import")
        raise UserErrors.one(
            f"You may read dataset '{dataset.name}' but not import into it.", errors.FORBIDDEN, "input", "dataset"
        )
    scope = scope_value(identity, dataset)
    if scope is NO_ROWS:
        assert dataset.scope is not None
        await denied_dataset(services, identity, dataset.name, "import without the scope claim")
        raise UserErrors.one(
            f"Dataset '{dataset.name}' keeps each tenant's rows apart by the '{dataset.scope.claim}' claim, "
            "which your token does not carry; ask your administrator.",
            errors.FORBIDDEN,
            "input",
            "dataset",
        )
    if data["format"] not in IMPORT_FORMATS:
        raise UserErrors.one(
            f"Format {data['format']} cannot be imported.", errors.UNSUPPORTED_FORMAT, "input", "format"
        )
    if data["mode"] in ("UPSERT", "UPDATE") and not dataset.key:
        raise UserErrors.one(
            f"Dataset '{dataset.name}' has no key, so it can only be imported in INSERT mode.",
            errors.NO_KEY,
            "input",
            "mode",
        )
    file_name = clean_file_name(data["fileName"])
    problems = []
    size = data.get("fileSize")
    if size is not None and (size < 0 or size > settings.max_upload_bytes):
        problems.append(
            errors.UserError(
                f"The file is {size:,} bytes; at most {settings.max_upload_bytes:,} bytes can be imported."
                if size >= 0
                else "fileSize cannot be negative.",
                errors.FILE_TOO_LARGE,
                ("input", "fileSize"),
            )
        )
    max_errors = data.get("maxErrors")
    if max_errors is not None and max_errors < 1:
        problems.append(
            errors.UserError(
                "maxErrors must be at least 1 (the import stops when it is reached).",
                errors.INVALID_MAX_ERRORS,
                ("input", "maxErrors"),
            )
        )
    elif max_errors is not None and max_errors > settings.import_max_errors_limit:
        # The error report holds a line per failed row: its size is bounded through this.
        problems.append(
            errors.UserError(
                f"maxErrors can be at most {settings.import_max_errors_limit:,} "
                "(the error report lists every failed row).",
                errors.INVALID_MAX_ERRORS,
                ("input", "maxErrors"),
            )
        )
    column_map = data.get("columnMap")
    if column_map is not None:
        problems += column_map_problems(column_map, [c.name for c in dataset.columns])
    if problems:
        raise UserErrors(problems)

    identifier = random_task_id()
    upload_expires_at = now() + dt.timedelta(seconds=settings.upload_url_ttl_seconds)
    request = {
        "mode": data["mode"],
        "dryRun": bool(data.get("dryRun")),
        "maxErrors": max_errors,
        "fileName": file_name,
        "fileSize": size,
    }
    if column_map:
        request["columnMap"] = {k.strip(): v for k, v in column_map.items()}
    if data.get("results"):
        request["results"] = True
    if dataset.scope is not None:  # the worker writes only this tenant's rows
        request["scope"] = scope_for_request(scope)
    # Active from now, while it waits for its file too: starting it later needs no second check.
    outcome = await request_task(
        services,
        identifier,
        {
            "id": identifier,
            "kind": TaskKind.IMPORT.value,
            "owner": owner.id,
            "email": owner.email,
            "dataset": dataset.name,
            "format": data["format"],
            "request": orjson.dumps(request).decode(),
            "notify": bool(data.get("notify")),
            "status": TaskStatus.WAITING_FOR_UPLOAD.value,
            "created_at": stamp(),
            "upload_expires_at": stamp(upload_expires_at),
            "object_key": object_key(owner.id, identifier, file_name),
            "attempts": 0,
            "processed_rows": 0,
            "bytes": 0,
        },
        -1,
        ("input",),
        identity,
        IMPORT_REQUESTED,
    )
    # Nobody uploaded: the cron job expires the task (and any partial upload) after the window.
    await services.store.schedule_expiry(identifier, upload_expires_at.timestamp() + START_GRACE_SECONDS)
    return outcome.task


async def upload_target(services: Services, identity: Identity, task: Task) -> UploadTarget | None:
    """Where to upload, issued afresh on every read while the task waits for its file; only to its
    owner (an admin looking on cannot put a file into someone else's import)."""
    if task.owner != identity.owner.id:
        return None
    if task.status is not TaskStatus.WAITING_FOR_UPLOAD or not task.object_key or task.upload_expires_at is None:
        return None
    return await services.storage.upload_target(
        task.object_key,
        task_id=task.id,
        content_type=content_type(task.format),
        max_bytes=services.settings.max_upload_bytes,
        expires_at=task.upload_expires_at,
    )


def content_type(file_format: str) -> str:
    return WRITERS[file_format].content_type


async def start_import(services: Services, identity: Identity, identifier: str) -> Task:
    return await start(services, await _owned(services, identity, identifier))


async def start(services: Services, task: Task) -> Task:
    """Queue the import once its file is in storage. Idempotent: a task already started is
    returned as it is, and a second trigger never queues a second run."""
    if task.status is TaskStatus.PENDING:
        # Started before; queueing again is a no-op while the job exists (same arq job id), and
        # recovers the case where the process that moved it to PENDING died before enqueueing.
        await queue.enqueue(services.arq, services.settings.queue_name, IMPORT_JOB, task)
        return task
    if task.status is not TaskStatus.WAITING_FOR_UPLOAD:
        if task.status in (TaskStatus.PROCESSING, TaskStatus.SUCCEEDED):
            return task
        raise UserErrors.one(f"The import is {task.status.value} and cannot be started.", errors.INVALID_STATUS, "id")
    # The worker reads a sealed copy (tasks/sealing.py): an upload landing later cannot change it.
    sealed = await sealing.seal(services.storage, task)
    if sealed is None:
        current = await services.store.get(task.id)
        if current is not None and current.status is not TaskStatus.WAITING_FOR_UPLOAD:
            return await start(services, current)  # started meanwhile, which removed the upload
        if task.upload_expires_at and task.upload_expires_at < now():
            raise UserErrors.one(
                "The upload window has closed and no file arrived; request a new import.", errors.UPLOAD_EXPIRED, "id"
            )
        raise UserErrors.one(
            "No file has been uploaded for this import yet; upload it, then start it.", errors.UPLOAD_MISSING, "id"
        )
    sealed_key, size = sealed
    assert task.object_key is not None  # seal() found no upload without one
    problem = sealing.size_problem(size, services.settings.max_upload_bytes, task.request.get("fileSize"))
    if problem is not None:
        await sealing.discard(services.storage, sealed_key)
        raise problem
    moved = await services.store.transition(
        task.id,
        TaskStatus.PENDING,
        f"file received: {size:,} bytes",
        allowed_from=[TaskStatus.WAITING_FOR_UPLOAD],
        fields={"total_bytes": size, "file_size": size, "object_key": sealed_key},
    )
    current = await services.store.get(task.id)
    assert current is not None
    await sealing.discard(services.storage, task.object_key if moved.ok else sealed_key)
    if moved.ok:
        await services.store.unschedule_expiry(task.id)
        await queue.enqueue(services.arq, services.settings.queue_name, IMPORT_JOB, current)
        return current
    return await start(services, current)  # someone else started it in between


async def start_from_storage_event(services: Services, key: str) -> Task | None:
    """The import whose upload is ``key``, started; None when the key is not an import's upload."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "imports":
        return None
    for candidate in parts[2:-1]:
        if not _TASK_ID.match(candidate):
            continue
        task = await services.store.get(candidate)
        if task is not None and task.kind is TaskKind.IMPORT and task.object_key == key:
            try:
                return await start(services, task)
            except UserErrors:
                return None  # cancelled or expired meanwhile: nothing to start
    return None


async def cancel_import(services: Services, identity: Identity, identifier: str) -> Task:
    """The owner, or an admin, stops an import that has not finished."""
    task = await _visible(services, identity, identifier)
    result = await services.store.transition(
        task.id,
        TaskStatus.CANCELLED,
        cancelled_by(identity, task),
        allowed_from=[TaskStatus.WAITING_FOR_UPLOAD, TaskStatus.PENDING, TaskStatus.PROCESSING],
        fields={"finished_at": stamp()},
        action=TASK_CANCELLED,
        actor=actor_of(identity),
    )
    if not result.ok:
        raise UserErrors.one(
            f"The import is {result.status.value if result.status else 'gone'} and can no longer be cancelled.",
            errors.INVALID_STATUS,
            "id",
        )
    await queue.abort(services.arq, services.settings.queue_name, queue.job_id_for(task))
    return await _visible(services, identity, identifier)


async def get_import(services: Services, identity: Identity, identifier: str) -> Task | None:
    """The caller's import (any user's, for an admin); None for a missing one and another's alike."""
    return await seen_task(services, identity, await services.store.get(identifier), TaskKind.IMPORT)


async def list_imports(
    services: Services, owner: str, first: int, after: str | None, status: TaskStatus | None
) -> Page:
    """``owner``'s imports: the resolver passes the caller, or for an admin whoever they name."""
    return await services.store.page(owner, TaskKind.IMPORT, max(0, min(first, 100)), after, status)


async def error_report_url(services: Services, identity: Identity, task: Task) -> str | None:
    """The report quotes the file's rows: only for a caller who may read them now."""
    if not task.report_key or not task.status.is_final or task.status is TaskStatus.EXPIRED:
        return None
    if not may_read_rows_of(identity, services.registry.get(task.dataset), task.request):
        return None
    return await signed_report_url(services, task, identity)


async def signed_report_url(services: Services, task: Task, issued_to: Identity) -> str | None:
    """The report's signed URL without the caller check (see ``exports.signed_download_url``)."""
    if not task.report_key or not task.status.is_final or task.status is TaskStatus.EXPIRED:
        return None
    return await issue_url(services, task.report_key, task.id, task.report_key.rsplit("/", 1)[-1], issued_to)


async def results_url(services: Services, identity: Identity, task: Task) -> str | None:
    """The results file's link: like the error report's, only for a caller who may read the rows."""
    if not task.results_key or not task.status.is_final or task.status is TaskStatus.EXPIRED:
        return None
    if not may_read_rows_of(identity, services.registry.get(task.dataset), task.request):
        return None
    return await issue_url(
        services, task.results_key, task.id + RESULTS_SUFFIX, task.results_key.rsplit("/", 1)[-1], identity
    )


def preview_of(services: Services, identity: Identity, task: Task) -> dict[str, Any] | None:
    """The counts and samples an import kept (``workers.import_outcomes.Preview``; a dry run's is
    its preview, a run's gives the page its first failed rows): they quote stored rows and the
    file's, so only for a caller who may read the rows."""
    if not task.preview or not may_read_rows_of(identity, services.registry.get(task.dataset), task.request):
        return None
    found: dict[str, Any] = orjson.loads(task.preview)
    return found


def outcome(task: Task) -> str | None:
    """COMPLETE (every row written, or would be in a dry run), PARTIAL (some written, some
    refused) or NOTHING_WRITTEN (every row refused) for an import that succeeded; None before, and
    for one that failed or was cancelled (nothing written, where the store has transactions)."""
    if task.status is not TaskStatus.SUCCEEDED:
        return None
    if not task.rows_failed:
        return "COMPLETE"
    return "PARTIAL" if task.rows_imported else "NOTHING_WRITTEN"


def column_map_problems(column_map: Any, columns: list[str]) -> list[errors.UserError]:
    """What is wrong with a request's ``columnMap`` (file header → column): not an object of
    texts, a column the dataset does not have (with the closest name), a header given twice
    (ignoring case and surrounding spaces), a column two headers map to."""
    field = ("input", "columnMap")
    code = errors.INVALID_COLUMN_MAP
    if not isinstance(column_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()
    ):
        return [errors.UserError("columnMap must map file headers (text) to column names (text).", code, field)]
    if len(column_map) > MAX_COLUMN_MAP:
        return [errors.UserError(f"columnMap may map at most {MAX_COLUMN_MAP:,} headers.", code, field)]
    problems = []
    known = set(columns)
    for header, column in column_map.items():
        if column not in known:
            close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(
                errors.UserError(
                    f"columnMap maps '{header}' to '{column}', which is not a column of the dataset{hint}.",
                    code,
                    (*field, header),
                )
            )
    folded: dict[str, list[str]] = {}
    for header in column_map:
        folded.setdefault(header.strip().casefold(), []).append(header)
    for given in folded.values():
        if len(given) > 1:
            shown = ", ".join(f"'{h}'" for h in given)
            problems.append(errors.UserError(f"columnMap names the header {shown} more than once.", code, field))
    targets: dict[str, list[str]] = {}
    for header, column in column_map.items():
        targets.setdefault(column, []).append(header)
    for column, headers in targets.items():
        if len(headers) > 1:
            shown = ", ".join(f"'{h}'" for h in headers)
            problems.append(errors.UserError(f"columnMap maps {shown} to the same column '{column}'.", code, field))
    return problems[:50]


async def _visible(services: Services, identity: Identity, identifier: str) -> Task:
    task = await get_import(services, identity, identifier)
    if task is None:  # another owner's task is reported exactly as a missing one
        raise UserErrors.one(f"There is no import '{identifier}'.", errors.NOT_FOUND, "id")
    return task


async def _owned(services: Services, identity: Identity, identifier: str) -> Task:
    """The caller's own import: starting it is the owner's alone, even for an admin."""
    task = await _visible(services, identity, identifier)
    if task.owner != identity.owner.id:
        await denied_task(services, identity, task, "only the owner may start an import")
        raise UserErrors.one("Only the import's owner can do this.", errors.FORBIDDEN, "id")
    return task
