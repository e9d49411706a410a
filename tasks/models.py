"""The task model: one export or import, as kept in its Redis hash.

Every field is stored as a string in ``dataport:task:{id}``; ``Task.from_hash`` reads it back into
types. Snapshots published on the task's channel are the same hash, so a subscriber and a query
see exactly the same thing.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

import orjson


class TaskStatus(enum.StrEnum):
    WAITING_FOR_UPLOAD = "WAITING_FOR_UPLOAD"
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED})
ACTIVE_STATUSES = frozenset({TaskStatus.WAITING_FOR_UPLOAD, TaskStatus.PENDING, TaskStatus.PROCESSING})

# Which status may follow which. The Lua transition script enforces this table atomically.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.WAITING_FOR_UPLOAD: frozenset({TaskStatus.PENDING, TaskStatus.CANCELLED, TaskStatus.EXPIRED}),
    TaskStatus.PENDING: frozenset({TaskStatus.PROCESSING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    # PROCESSING -> PENDING is a retry after a transient error, or a dead worker's job claimed again.
    TaskStatus.PROCESSING: frozenset(
        {TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    # A finished task may run again (retryExport, or an export older than the reuse window).
    TaskStatus.SUCCEEDED: frozenset({TaskStatus.PENDING, TaskStatus.EXPIRED}),
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING, TaskStatus.EXPIRED}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.PENDING, TaskStatus.EXPIRED}),
    TaskStatus.EXPIRED: frozenset(),
}


class TaskKind(enum.StrEnum):
    EXPORT = "export"
    IMPORT = "import"


@dataclass(frozen=True)
class Progress:
    processed_rows: int = 0
    total_rows: int | None = None
    bytes: int = 0
    rows_per_second: float | None = None
    eta_seconds: float | None = None
    # Imports cannot count rows before reading them: their progress is bytes read of the file.
    total_bytes: int | None = None

    @property
    def percent(self) -> float | None:
        if self.total_bytes is not None:
            if self.total_bytes == 0:
                return 100.0
            return round(min(100.0, 100.0 * self.bytes / self.total_bytes), 2)
        if not self.total_rows:
            return 100.0 if self.total_rows == 0 else None
        return round(min(100.0, 100.0 * self.processed_rows / self.total_rows), 2)


@dataclass(frozen=True)
class Task:
    id: str
    kind: TaskKind
    owner: str
    dataset: str
    format: str
    status: TaskStatus
    request: dict[str, Any]
    run: int
    attempts: int
    progress: Progress
    created_at: dt.datetime
    version: int = 0
    email: str | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    row_count: int | None = None
    file_size: int | None = None
    checksum_sha256: str | None = None
    object_key: str | None = None
    job_id: str | None = None
    polls: int = 0
    # This read counted the poll already (tasks/reads.py): pollAfterSeconds must not count it again.
    poll_counted: bool = False
    # This read found the task's place in the queue too (tasks/reads.py): None when not waiting.
    position_read: bool = False
    queue_position: int | None = None
    notify: bool = False  # the request asked for an email when the task ends
    # Imports only.
    rows_imported: int = 0
    rows_failed: int = 0
    report_key: str | None = None
    # ``results: true``: the results file (one line per input row); a dry run's preview, as JSON.
    results_key: str | None = None
    preview: str | None = None
    upload_expires_at: dt.datetime | None = None
    # "{run}@{time}": when this run's first transient failure happened (workers/attempts.py).
    retrying_since: str | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str], **read: Any) -> Task:
        """The task a hash holds; ``read``: what the read learnt beside it (``poll_counted``,
        ``position_read``, ``queue_position``: tasks/reads.py)."""
        return cls(
            id=h["id"],
            kind=TaskKind(h["kind"]),
            owner=h["owner"],
            dataset=h["dataset"],
            format=h["format"],
            status=TaskStatus(h["status"]),
            request=orjson.loads(h.get("request") or "{}"),
            run=int(h.get("run") or 1),
            attempts=int(h.get("attempts") or 0),
            version=int(h.get("version") or 0),
            progress=Progress(
                processed_rows=int(h.get("processed_rows") or 0),
                total_rows=_int(h.get("total_rows")),
                bytes=int(h.get("bytes") or 0),
                rows_per_second=_float(h.get("rows_per_second")),
                eta_seconds=_float(h.get("eta_seconds")),
                total_bytes=_int(h.get("total_bytes")),
            ),
            created_at=parse_stamp(h["created_at"]),
            email=h.get("email") or None,
            started_at=parse_time(h.get("started_at")),
            finished_at=parse_time(h.get("finished_at")),
            expires_at=parse_time(h.get("expires_at")),
            error_code=h.get("error_code") or None,
            error_message=h.get("error_message") or None,
            row_count=_int(h.get("row_count")),
            file_size=_int(h.get("file_size")),
            checksum_sha256=h.get("checksum_sha256") or None,
            object_key=h.get("object_key") or None,
            job_id=h.get("job_id") or None,
            polls=int(h.get("polls") or 0),
            notify=h.get("notify") == "1",
            rows_imported=int(h.get("rows_imported") or 0),
            rows_failed=int(h.get("rows_failed") or 0),
            report_key=h.get("report_key") or None,
            results_key=h.get("results_key") or None,
            preview=h.get("preview") or None,
            upload_expires_at=parse_time(h.get("upload_expires_at")),
            retrying_since=h.get("retrying_since") or None,
            **read,
        )


@dataclass(frozen=True)
class TaskEvent:
    at: dt.datetime
    status: TaskStatus
    message: str | None


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def stamp(moment: dt.datetime | None = None) -> str:
    """The one way times are written into Redis: epoch seconds with milliseconds."""
    return f"{(moment or now()).timestamp():.3f}"


def parse_stamp(value: str) -> dt.datetime:
    """A time that is always written (created_at, an event's at): what stamp() wrote."""
    return dt.datetime.fromtimestamp(float(value), dt.UTC)


def parse_time(value: str | None) -> dt.datetime | None:
    """A time that may be unset: None for a missing or empty field."""
    return parse_stamp(value) if value else None


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
