"""GraphQL object types of the contract. Each wraps a domain object; fields that need I/O (events,
download URL, queue position) resolve only when a client asks for them."""

from __future__ import annotations

import datetime as dt
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
from tasks.models import Progress as DomainProgress
from tasks.models import Task


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


@strawberry.type
class TaskFields:
    """The fields exports and imports share; each GraphQL type below adds its own. Not part of the
    schema itself: no field returns it."""

    task: strawberry.Private[Task]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.task.id)

    @strawberry.field
    def status(self) -> TaskStatus:
        return self.task.status

    @strawberry.field
    def dataset(self) -> str:
        return self.task.dataset

    @strawberry.field(description="The user the task belongs to (admins see other users' tasks).")
    def owner(self) -> str:
        return self.task.owner

    @strawberry.field
    def format(self) -> FileFormat:
        return FileFormat(self.task.format)

    @strawberry.field
    def progress(self) -> Progress:
        return Progress.of(self.task.progress)

    @strawberry.field
    def attempts(self) -> int:
        return self.task.attempts

    @strawberry.field
    def error(self) -> TaskError | None:
        if not self.task.error_message:
            return None
        return TaskError(code=self.task.error_code or "ERROR", message=self.task.error_message)

    @strawberry.field
    async def events(self, info: Info) -> list[TaskEvent]:
        events = await info.context.services.store.events(self.task.id)
        return [TaskEvent(at=e.at, status=e.status, message=e.message) for e in events]

    @strawberry.field
    def created_at(self) -> dt.datetime:
        return self.task.created_at

    @strawberry.field
    def started_at(self) -> dt.datetime | None:
        return self.task.started_at

    @strawberry.field
    def finished_at(self) -> dt.datetime | None:
        return self.task.finished_at

    @strawberry.field(description="Polling clients: wait this long before asking again. Grows with each poll.")
    async def poll_after_seconds(self, info: Info) -> float | None:
        if info.operation.operation is OperationType.SUBSCRIPTION:
            return None  # subscribers are pushed every change; they do not poll
        return await exports.poll_after_seconds(info.context.services, self.task)


@strawberry.type
class ExportTask(TaskFields):
    @strawberry.field
    async def queue_position(self, info: Info) -> int | None:
        return await exports.queue_position(info.context.services, self.task)

    @strawberry.field
    def run(self) -> int:
        return self.task.run

    @strawberry.field
    def expires_at(self) -> dt.datetime | None:
        return self.task.expires_at

    @strawberry.field
    def row_count(self) -> int | None:
        return self.task.row_count

    @strawberry.field
    def file_size(self) -> int | None:
        return self.task.file_size

    @strawberry.field
    def checksum_sha256(self) -> str | None:
        return self.task.checksum_sha256

    @strawberry.field(description="A fresh signed URL on every read; it lives 15 minutes.")
    async def download_url(self, info: Info) -> str | None:
        return await exports.download_url(info.context.services, info.context.identity, self.task)

    @strawberry.field(description="The request's label, as given (without surrounding spaces).")
    def label(self) -> str | None:
        return self.task.request.get("label")

    @strawberry.field(description="{dataset}-{yyyymmddThhmmssZ}[-{label}].{ext}[.gz|.zst]: the download's name.")
    def file_name(self) -> str | None:
        return file_names.file_name(self.task)

    @strawberry.field
    def compression(self) -> Compression:
        return Compression(self.task.request.get("compression") or "NONE")

    @strawberry.field(description="The request's filters (field, op, value or values), to tell exports apart.")
    def filters(self) -> JSON:
        return self.task.request.get("filters") or []

    @strawberry.field(description="The request's anyOf groups ({filters}); null when it had none.")
    def any_of(self) -> JSON | None:
        return self.task.request.get("anyOf")

    @strawberry.field(description="The request's row limit; null when it had none.")
    def limit(self) -> int | None:
        return self.task.request.get("limit")


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
