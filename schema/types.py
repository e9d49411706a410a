"""GraphQL object types of the contract. Each wraps a domain object; fields that need I/O (events,
download URL, queue position) resolve only when a client asks for them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from typing import Annotated, Generic, TypeVar

import strawberry
from graphql import OperationType
from strawberry.scalars import JSON

from api.context import Info
from dataport.errors import UserError as DomainUserError
from schema.enums import Compression, FileFormat, ImportMode, ImportOutcome, TaskStatus
from sources.base import Dataset as DomainDataset
from storage.base import UploadTarget as DomainUploadTarget
from tasks import exports, file_names, imports
from tasks.models import FINAL_STATUSES, Task
from tasks.models import Progress as DomainProgress
from tasks.models import TaskStatus as DomainTaskStatus


@strawberry.type
class Progress:
    processed_rows: int
    total_rows: int | None
    percent: float | None
    bytes: int
    rows_per_second: float | None
    eta_seconds: float | None

    @classmethod
    def of(cls, p: DomainProgress) -> Progress:
        return cls(
            processed_rows=p.processed_rows,
            total_rows=p.total_rows,
            percent=p.percent,
            bytes=p.bytes,
            rows_per_second=p.rows_per_second,
            eta_seconds=p.eta_seconds,
        )


@strawberry.type
class TaskError:
    code: str
    message: str


@strawberry.type
class TaskEvent:
    at: dt.datetime
    status: TaskStatus
    message: str | None


@strawberry.type
class UserError:
    field: list[str] | None
    message: str
    code: str

    @classmethod
    def of(cls, e: DomainUserError) -> UserError:
        return cls(field=list(e.field) if e.field else None, message=e.message, code=e.code)


@strawberry.type
class UploadTarget:
    url: str
    method: str
    headers: JSON
    fields: JSON | None
    expires_at: dt.datetime

    @classmethod
    def of(cls, t: DomainUploadTarget) -> UploadTarget:
        return cls(url=t.url, method=t.method, headers=t.headers, fields=t.fields, expires_at=t.expires_at)


# A task's plain fields are attributes set once from the task (``TaskFields.__post_init__``), not a
# resolver each: Strawberry wraps every resolver in its own machinery (arguments, an Info object, the
# field's extensions), ~10 µs a field, and a polled exportTask selects a dozen of them; graphql-core
# reads an attribute directly. Fields that do I/O, read the caller or may fail keep a resolver;
# those between plain ones are declared in place (``= strawberry.field(resolver=…)``), so the
# schema's field order, and schema.graphql, stay as they were.
_SET_FROM_TASK = None  # the default of a plain field; __post_init__ sets each one


async def _events(root: TaskFields, info: Info) -> list[TaskEvent]:
    events = await info.context.services.store.events(root.task.id)
    return [TaskEvent(at=e.at, status=e.status, message=e.message) for e in events]


# The next three answer at once when the task as read already holds the answer (a polled read
# counted the poll and found the queue position in its round trip: tasks/reads.py), and return an
# awaitable only when they must ask Redis: an async resolver is a task of its own for graphql-core,
# scheduled and gathered with its siblings, ~5 % of a polled read's CPU for nothing.
def _poll_after_seconds(root: TaskFields, info: Info) -> float | None | Awaitable[float | None]:
    task = root.task
    if info.operation.operation is OperationType.SUBSCRIPTION or task.status in FINAL_STATUSES:
        return None  # subscribers are pushed every change; they do not poll
    if task.poll_counted:
        return exports.poll_hint(info.context.services, task.polls)
    return exports.poll_after_seconds(info.context.services, task)


@strawberry.type
class TaskFields:
    """The fields exports and imports share; each GraphQL type below adds its own. Not part of the
    schema itself: no field returns it."""

    task: strawberry.Private[Task]
    id: strawberry.ID = _SET_FROM_TASK
    status: TaskStatus = _SET_FROM_TASK
    dataset: str = _SET_FROM_TASK
    owner: str = strawberry.field(
        default=_SET_FROM_TASK, description="The user the task belongs to (admins see other users' tasks)."
    )
    format: FileFormat = _SET_FROM_TASK
    progress: Progress = _SET_FROM_TASK
    attempts: int = _SET_FROM_TASK
    error: TaskError | None = _SET_FROM_TASK
    events: list[TaskEvent] = strawberry.field(resolver=_events)
    created_at: dt.datetime = _SET_FROM_TASK
    started_at: dt.datetime | None = _SET_FROM_TASK
    finished_at: dt.datetime | None = _SET_FROM_TASK
    poll_after_seconds: float | None = strawberry.field(
        resolver=_poll_after_seconds,
        graphql_type=float | None,
        description="Polling clients: wait this long before asking again. Grows with each poll.",
    )

    def __post_init__(self) -> None:
        task = self.task
        self.id = strawberry.ID(task.id)
        self.status = task.status
        self.dataset = task.dataset
        self.owner = task.owner
        self.format = FileFormat(task.format)
        self.progress = Progress.of(task.progress)
        self.attempts = task.attempts
        self.error = (
            TaskError(code=task.error_code or "ERROR", message=task.error_message) if task.error_message else None
        )
        self.created_at = task.created_at
        self.started_at = task.started_at
        self.finished_at = task.finished_at


def _queue_position(root: ExportTask, info: Info) -> int | None | Awaitable[int | None]:
    task = root.task
    if task.status is not DomainTaskStatus.PENDING:
        return None
    if task.position_read:
        return task.queue_position
    return exports.queue_position(info.context.services, task)


def _download_url(root: ExportTask, info: Info) -> str | None | Awaitable[str | None]:
    if not exports.has_file(root.task):
        return None
    return exports.download_url(info.context.services, info.context.identity, root.task)


def _file_name(root: ExportTask) -> str | None:
    return file_names.file_name(root.task)


def _compression(root: ExportTask) -> Compression:
    return Compression(root.task.request.get("compression") or "NONE")


@strawberry.type
class ExportTask(TaskFields):
    queue_position: int | None = strawberry.field(resolver=_queue_position, graphql_type=int | None)
    run: int = _SET_FROM_TASK
    expires_at: dt.datetime | None = _SET_FROM_TASK
    row_count: int | None = _SET_FROM_TASK
    file_size: int | None = _SET_FROM_TASK
    checksum_sha256: str | None = _SET_FROM_TASK
    download_url: str | None = strawberry.field(
        resolver=_download_url,
        graphql_type=str | None,
        description="A fresh signed URL on every read; it lives 15 minutes.",
    )
    label: str | None = strawberry.field(
        default=_SET_FROM_TASK, description="The request's label, as given (without surrounding spaces)."
    )
    file_name: str | None = strawberry.field(
        resolver=_file_name,
        description="{dataset}-{yyyymmddThhmmssZ}[-{label}].{ext}[.gz|.zst]: the download's name.",
    )
    compression: Compression = strawberry.field(resolver=_compression)
    filters: JSON = strawberry.field(
        default=_SET_FROM_TASK,
        description="The request's filters (field, op, value or values), to tell exports apart.",
    )
    any_of: JSON | None = strawberry.field(
        default=_SET_FROM_TASK, description="The request's anyOf groups ({filters}); null when it had none."
    )
    limit: int | None = strawberry.field(
        default=_SET_FROM_TASK, description="The request's row limit; null when it had none."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        task = self.task
        request = task.request
        self.run = task.run
        self.expires_at = task.expires_at
        self.row_count = task.row_count
        self.file_size = task.file_size
        self.checksum_sha256 = task.checksum_sha256
        self.label = request.get("label")
        self.filters = request.get("filters") or []
        self.any_of = request.get("anyOf")
        self.limit = request.get("limit")


@strawberry.type
class ImportTask(TaskFields):
    @strawberry.field
    def mode(self) -> ImportMode:
        return ImportMode(self.task.request.get("mode", "INSERT"))

    @strawberry.field
    def dry_run(self) -> bool:
        return bool(self.task.request.get("dryRun"))

    @strawberry.field(description="Where to upload the file while it is awaited; issued afresh on every read.")
    async def upload(self, info: Info) -> UploadTarget | None:
        target = await imports.upload_target(info.context.services, info.context.identity, self.task)
        return UploadTarget.of(target) if target else None

    @strawberry.field(description="Rows written; for a dry run, the rows that would be written.")
    def rows_imported(self) -> int:
        return self.task.rows_imported

    @strawberry.field
    def rows_failed(self) -> int:
        return self.task.rows_failed

    @strawberry.field(description="The failed rows as CSV (row, column, reason, original); a fresh signed URL.")
    async def error_report_url(self, info: Info) -> str | None:
        return await imports.error_report_url(info.context.services, info.context.identity, self.task)

    @strawberry.field(
        description="Every input row's outcome as CSV (row, outcome, key, message), when the import asked for "
        "results; a fresh signed URL."
    )
    async def results_url(self, info: Info) -> str | None:
        return await imports.results_url(info.context.services, info.context.identity, self.task)

    @strawberry.field(description="A dry run's counts and first rows of each kind.")
    def preview(self, info: Info) -> ImportPreview | None:
        found = imports.preview_of(info.context.services, info.context.identity, self.task)
        if found is None or not self.task.request.get("dryRun"):
            return None
        return ImportPreview(
            new_rows=found["newRows"],
            updated_rows=found["updatedRows"],
            unchanged_rows=found["unchangedRows"],
            failed_rows=found["failedRows"],
            samples=found["samples"],
        )

    @strawberry.field(
        description="The first failed rows of a finished import (dry run or not): [{row, errors: [{column, "
        "reason}]}], at most 5; the error report lists them all."
    )
    def failed_samples(self, info: Info) -> JSON | None:
        found = imports.preview_of(info.context.services, info.context.identity, self.task)
        return found["samples"]["failed"] if found is not None else None

    @strawberry.field(
        description="Once it succeeded: COMPLETE, PARTIAL (some rows refused: see rowsFailed and the error "
        "report) or NOTHING_WRITTEN. Null before, and for a failed or cancelled import."
    )
    def outcome(self) -> ImportOutcome | None:
        found = imports.outcome(self.task)
        return ImportOutcome(found) if found else None


@strawberry.type(description="What a dry run found, before anything is written.")
class ImportPreview:
    new_rows: int
    updated_rows: int
    unchanged_rows: int
    failed_rows: int
    samples: JSON = strawberry.field(
        description="The first rows of each kind: {new, updated, unchanged, failed}; each with its row number "
        "and key; new rows their values, updated rows their changed cells {old, new}, failed rows their errors."
    )


# Every change of the caller's tasks, whichever kind (the ``taskUpdates`` subscription).
TaskUpdate = Annotated[ExportTask | ImportTask, strawberry.union("TaskUpdate")]


@strawberry.type
class Column:
    name: str
    type: str
    filterable: bool
    sortable: bool


@strawberry.type
class Dataset:
    name: str
    title: str | None
    source: str
    columns: list[Column]
    importable: bool
    max_export_rows: int
    stream_max_rows: int

    @classmethod
    def of(cls, d: DomainDataset, importable: bool) -> Dataset:
        """``importable``: whether this caller may import into it (the dataset takes imports and
        they are among its importers)."""
        return cls(
            name=d.name,
            title=d.title,
            source=d.source,
            importable=importable,
            max_export_rows=d.max_export_rows,
            stream_max_rows=d.stream_max_rows,
            columns=[Column(name=c.name, type=c.type, filterable=c.filterable, sortable=c.sortable) for c in d.columns],
        )


@strawberry.type
class ExportPayload:
    task: ExportTask | None
    user_errors: list[UserError]


NodeType = TypeVar("NodeType")


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class Edge(Generic[NodeType]):
    cursor: str
    node: NodeType


@strawberry.type
class ExportTaskConnection:
    edges: list[Edge[ExportTask]]
    page_info: PageInfo
    total_count: int


@strawberry.type
class ImportPayload:
    task: ImportTask | None
    user_errors: list[UserError]


@strawberry.type
class ImportTaskConnection:
    edges: list[Edge[ImportTask]]
    page_info: PageInfo
    total_count: int


@strawberry.type
class AuditEvent:
    """One record of the audit log (docs/audit.md); admins only."""

    id: strawberry.ID
    at: dt.datetime
    action: str
    actor: str | None  # the user id
    roles: list[str]
    address: str | None
    user_agent: str | None
    task_id: strawberry.ID | None
    dataset: str | None
    detail: JSON | None
    prev_hash: str
    hash: str


@strawberry.type
class AuditEventConnection:
    edges: list[Edge[AuditEvent]]
    page_info: PageInfo
