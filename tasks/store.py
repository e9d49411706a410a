"""The task store: tasks, their events, per-owner history and snapshots, all in Redis.

Keys (DESIGN.md, "Tasks"):
  dataport:task:{id}                   hash, the task
  dataport:events:{id}                 stream, every transition with time and reason
  dataport:history:{owner}:{kind}      sorted set of task ids by request time
  dataport:channel:{id}                pub/sub, the whole snapshot after every change
  dataport:dataset:{name}:written_at   when an import last wrote to the dataset (ends export reuse)
  dataport:expiry                      sorted set of finished task ids by the time they expire
  dataport:active:{owner}              set of the owner's active task ids (the per-user quota)
  dataport:stats:...                   counts, durations and totals for /metrics (``scripts.lua``)

Every write that changes a status goes through ``scripts.lua``, which checks the transition table
and writes, records and publishes atomically.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

from redis.asyncio import Redis

from audit.records import SYSTEM, TASK_DELETED, TASK_EXPIRED, TASK_STATUS, Actor, dumps, new_id
from tasks.models import TRANSITIONS, Task, TaskEvent, TaskKind, TaskStatus, parse_stamp

_SCRIPT = files("tasks").joinpath("scripts.lua").read_text()


def task_key(task_id: str) -> str:
    return f"dataport:task:{task_id}"


def events_key(task_id: str) -> str:
    return f"dataport:events:{task_id}"


def channel(task_id: str) -> str:
    return f"dataport:channel:{task_id}"


def history_key(owner: str, kind: TaskKind) -> str:
    return f"dataport:history:{owner}:{kind.value}"


EXPIRY_KEY = "dataport:expiry"

# Reaching one of these starts the retention clock: the file and task are kept, then expired.
_RETAINED = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


def active_key(owner: str) -> str:
    """The owner's WAITING_FOR_UPLOAD, PENDING and PROCESSING task ids (kept by ``scripts.lua``)."""
    return f"dataport:active:{owner}"


def dataset_written_key(dataset: str) -> str:
    return f"dataport:dataset:{dataset}:written_at"


# Statistics for /metrics, written by the Lua script in the same atomic step as each status change
# (its header describes them); read by ``read_stats``.
STATS_PREFIX = "dataport:stats:"
# Upper bounds (seconds) of the task duration histogram: a second to the six-hour job timeout.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
DURATION_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED)
_BUCKETS_ARG = " ".join([*(f"{b:g}" for b in DURATION_BUCKETS), "+Inf"])
# Set once every task written before the statistics existed has been indexed (``index_stats``).
STATS_INDEXED_KEY = STATS_PREFIX + "indexed:v1"


def stats_tasks_key(kind: TaskKind, status: TaskStatus) -> str:
    return f"{STATS_PREFIX}tasks:{kind.value}:{status.value}"


def stats_duration_key(kind: TaskKind, status: TaskStatus) -> str:
    return f"{STATS_PREFIX}duration:{kind.value}:{status.value}"


def stats_totals_key(kind: TaskKind) -> str:
    return f"{STATS_PREFIX}totals:{kind.value}"


@dataclass(frozen=True)
class Histogram:
    buckets: list[tuple[str, int]]  # (upper bound, cumulative count), the last one "+Inf"
    sum: float
    count: int


@dataclass(frozen=True)
class Stats:
    tasks: dict[tuple[TaskKind, TaskStatus], int]
    durations: dict[tuple[TaskKind, TaskStatus], Histogram]
    rows: dict[TaskKind, int]
    bytes: dict[TaskKind, int]


@dataclass(frozen=True)
class RequestOutcome:
    task: Task
    outcome: str  # created | existing | rerun

    @property
    def needs_job(self) -> bool:
        return self.outcome != "existing"


class QuotaExceeded(Exception):
    """Creating (or running again) the task would give its owner more active tasks than allowed;
    nothing was written."""

    def __init__(self, active: int, limit: int):
        super().__init__(f"{active} active tasks; at most {limit}")
        self.active = active
        self.limit = limit


@dataclass(frozen=True)
class TransitionResult:
    ok: bool
    status: TaskStatus | None  # the status now (None: the task is gone)


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    total: int
    has_next: bool
    end_cursor: str | None


class TaskStore:
    """``audit_outbox``: the audit outbox every write appends its record to, in the same script
    (docs/audit.md); None when the audit log is off."""

    def __init__(self, redis: Redis, retention_seconds: float = 7 * 24 * 3600, audit_outbox: str | None = None):
        self.redis = redis
        self.retention_seconds = retention_seconds
        self.audit_outbox = audit_outbox
        self._script = redis.register_script(_SCRIPT)

    def _audit(self, action: str, actor: Actor, detail: Mapping[str, Any] | None = None) -> list[str]:
        """The five script arguments of one audit record (an empty id when the log is off)."""
        if self.audit_outbox is None:
            return ["", "", "", "", ""]
        return [new_id(), action, actor.to_json(), dumps(dict(detail or {})), self.audit_outbox]

    # -- reads --------------------------------------------------------------------------------

    async def get(self, task_id: str, owner: str | None = None) -> Task | None:
        """The task, or None when it does not exist or belongs to someone else."""
        # redis-py types the commands shared by its sync and asyncio clients as "Awaitable[T] | T";
        # on redis.asyncio.Redis they always return the awaitable, and the client decodes
        # responses (tasks.services), so a hash is str to str.
        h = await cast("Awaitable[dict[str, str]]", self.redis.hgetall(task_key(task_id)))
        if not h or (owner is not None and h.get("owner") != owner):
            return None
        return Task.from_hash(h)

    async def events(self, task_id: str) -> list[TaskEvent]:
        entries = await self.redis.xrange(events_key(task_id))
        return [
            TaskEvent(at=parse_stamp(e["at"]), status=TaskStatus(e["status"]), message=e.get("message") or None)
            for _, e in entries
        ]

    async def active_count(self, owner: str) -> int:
        """The owner's active tasks (WAITING_FOR_UPLOAD, PENDING, PROCESSING), as the quota counts them."""
        return int(await self._script(keys=[active_key(owner)], args=["active", owner]))

    async def count_poll(self, task_id: str) -> int:
        """Record one poll; returns how many polls came before it."""
        # Awaitable on the asyncio client: see get().
        return int(await cast("Awaitable[int]", self.redis.hincrby(task_key(task_id), "polls", 1))) - 1

    async def page(
        self,
        owner: str,
        kind: TaskKind,
        first: int,
        after: str | None = None,
        status: TaskStatus | None = None,
    ) -> Page:
        """Newest first. The cursor names the last task seen, so new tasks never shift a page."""
        key = history_key(owner, kind)
        total = await self.redis.zcard(key)
        start = 0
        if after:
            rank = await self.redis.zrevrank(key, decode_cursor(after))
            start = rank + 1 if rank is not None else total
        found: list[Task] = []
        has_next = False
        chunk = max(first * 2, 50)
        while start < total and not has_next:
            ids = await self.redis.zrevrange(key, start, start + chunk - 1)
            if not ids:
                break
            hashes = await self._hashes(ids)
            for h in hashes:
                start += 1
                if not h or (status is not None and h.get("status") != status.value):
                    continue
                if len(found) == first:
                    has_next = True
                    break
                found.append(Task.from_hash(h))
        if status is not None:
            total = await self._count_status(key, status)
        end = encode_cursor(found[-1].id) if found else None
        return Page(found, total, has_next, end)

    async def _hashes(self, ids: Iterable[str]) -> list[dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(task_key(task_id))
        hashes: list[dict[str, str]] = await pipe.execute()
        return hashes

    async def _count_status(self, key: str, status: TaskStatus) -> int:
        count = 0
        async for task_id, _ in self.redis.zscan_iter(key):
            # Awaitable on the asyncio client: see get().
            if await cast("Awaitable[str | None]", self.redis.hget(task_key(task_id), "status")) == status.value:
                count += 1
        return count

    # -- writes -------------------------------------------------------------------------------

    async def request(
        self,
        task_id: str,
        fields: Mapping[str, Any],
        reuse_seconds: float,
        max_active: int | None = None,
        *,
        action: str = "",
        actor: Actor = SYSTEM,
        detail: Mapping[str, Any] | None = None,
    ) -> RequestOutcome:
        """Create the task, return the one already there, or start a new run of a finished one.
        With ``max_active``, creating or running again is refused (``QuotaExceeded``) when the owner
        already has that many active tasks, counted and created in one atomic step; returning the
        task already there never is. The audit record (``action`` by ``actor``, default
        ``{kind}.requested``) is written in the same step, unless the quota refused."""
        now = time.time()
        flat = _flatten(fields)
        outcome, active = await self._script(
            keys=[
                task_key(task_id),
                events_key(task_id),
                history_key(fields["owner"], TaskKind(fields["kind"])),
                dataset_written_key(fields["dataset"]),
                EXPIRY_KEY,
                active_key(fields["owner"]),
            ],
            args=[
                "request",
                channel(task_id),
                f"{now:.3f}",
                reuse_seconds,
                int(now * 1000),
                "" if max_active is None else str(max_active),
                len(flat),
                *flat,
                *self._audit(action or f"{fields['kind']}.requested", actor, detail),
            ],
        )
        if outcome == "quota":
            raise QuotaExceeded(int(active), max_active or 0)  # the owner's active tasks
        task = await self.get(task_id)
        assert task is not None
        return RequestOutcome(task, outcome)

    async def transition(
        self,
        task_id: str,
        to: TaskStatus,
        message: str,
        *,
        allowed_from: Iterable[TaskStatus] | None = None,
        fence_attempt: int | None = None,
        fields: Mapping[str, Any] | None = None,
        action: str = TASK_STATUS,
        actor: Actor = SYSTEM,
    ) -> TransitionResult:
        """Move the task to ``to`` if its current status allows it (and, when fenced, only if
        ``attempts`` still equals ``fence_attempt``); record the event and the audit record
        (``action`` by ``actor``) and publish the snapshot, all in one step."""
        sources = allowed_from or [s for s, targets in TRANSITIONS.items() if to in targets]
        sources = [s for s in sources if to in TRANSITIONS[s]]
        flat = _flatten(fields or {})
        now = time.time()
        expire_at = f"{now + self.retention_seconds:.3f}" if to in _RETAINED else ""
        # An expired task stays readable as such for one more retention period, then lapses.
        lapse = str(max(1, int(self.retention_seconds))) if to is TaskStatus.EXPIRED else ""
        result, status = await self._script(
            keys=[task_key(task_id), events_key(task_id), EXPIRY_KEY],
            args=[
                "transition",
                channel(task_id),
                f"{now:.3f}",
                to.value,
                " ".join(s.value for s in sources),
                "" if fence_attempt is None else str(fence_attempt),
                message,
                expire_at,
                lapse,
                _BUCKETS_ARG,
                len(flat),
                *flat,
                *self._audit(action, actor),
            ],
        )
        return TransitionResult(result == "ok", TaskStatus(status) if status else None)

    async def due_for_expiry(self, limit: int = 500) -> list[str]:
        ids: list[str] = await self.redis.zrangebyscore(EXPIRY_KEY, "-inf", time.time(), start=0, num=limit)
        return ids

    async def expired(self, task: Task, message: str) -> TransitionResult:
        """Mark a finished task EXPIRED; it stays readable as such for one more retention period
        (the script sets that lifetime and takes it off the schedule in the same step)."""
        result = await self.transition(
            task.id, TaskStatus.EXPIRED, message, fields={"object_key": None, "report_key": None}, action=TASK_EXPIRED
        )
        if not result.ok:  # moved on meanwhile (run again, say): not due any more
            await self.redis.zrem(EXPIRY_KEY, task.id)
        return result

    async def progress(self, task_id: str, attempt: int, fields: Mapping[str, Any]) -> bool:
        """Write progress for a running attempt. False means the attempt should stop."""
        flat = _flatten(fields)
        written = await self._script(
            keys=[task_key(task_id)], args=["progress", channel(task_id), str(attempt), len(flat), *flat]
        )
        return bool(written)

    async def delete(self, task: Task, actor: Actor = SYSTEM) -> None:
        """Remove the task, with its audit record (``task.deleted`` by ``actor``)."""
        await self._script(
            keys=[task_key(task.id), events_key(task.id), history_key(task.owner, task.kind), EXPIRY_KEY],
            args=["delete", task.id, f"{time.time():.3f}", *self._audit(TASK_DELETED, actor)],
        )

    async def schedule_expiry(self, task_id: str, at: float) -> None:
        """Expire the task at ``at`` unless it moves on first (an import waiting for its upload)."""
        await self.redis.zadd(EXPIRY_KEY, {task_id: at})

    async def unschedule_expiry(self, task_id: str) -> None:
        await self.redis.zrem(EXPIRY_KEY, task_id)

    async def mark_dataset_written(self, dataset: str) -> None:
        await self.redis.set(dataset_written_key(dataset), f"{time.time():.3f}")

    # -- statistics (for /metrics) ------------------------------------------------------------

    async def read_stats(self) -> Stats:
        """Current counts per kind and status, duration histograms, rows and bytes: one round trip
        of O(log n) reads, whatever the number of tasks."""
        now = f"({time.time():.3f}"  # an EXPIRED id counts until its hash lapses
        kinds, statuses = list(TaskKind), list(TaskStatus)
        pipe = self.redis.pipeline(transaction=False)
        for kind in kinds:
            for status in statuses:
                pipe.zcount(stats_tasks_key(kind, status), now, "+inf")
        for kind in kinds:
            for status in DURATION_STATUSES:
                pipe.hgetall(stats_duration_key(kind, status))
        for kind in kinds:
            pipe.hgetall(stats_totals_key(kind))
        replies = iter(await pipe.execute())
        tasks = {(k, s): int(next(replies)) for k in kinds for s in statuses}
        durations = {(k, s): _histogram(next(replies)) for k in kinds for s in DURATION_STATUSES}
        totals = {k: next(replies) for k in kinds}
        return Stats(
            tasks,
            durations,
            {k: int(t.get("rows") or 0) for k, t in totals.items()},
            {k: int(t.get("bytes") or 0) for k, t in totals.items()},
        )

    async def index_stats(self, batch: int = 500) -> int:
        """Put every task in the statistics set of its status (the back-fill for tasks written
        before the statistics existed). Each task is indexed atomically and idempotently, so this
        may run while tasks keep moving, and on several api processes at once. Returns the
        number of tasks indexed."""
        kinds = " ".join(k.value for k in TaskKind)
        statuses = " ".join(s.value for s in TaskStatus)
        indexed = 0
        prefix = task_key("")
        async for key in self.redis.scan_iter(match=f"{prefix}*", count=batch):
            task_id = key[len(prefix) :]
            indexed += int(
                await self._script(keys=[key], args=["index", task_id, f"{time.time():.3f}", kinds, statuses])
            )
        await self.redis.set(STATS_INDEXED_KEY, f"{time.time():.3f}")
        return indexed


def _histogram(fields: Mapping[str, str]) -> Histogram:
    """The script's per-bucket counts as a cumulative histogram over ``DURATION_BUCKETS``."""
    counts = [(float(k[3:]), int(n)) for k, n in fields.items() if k.startswith("le:") and k != "le:+Inf"]
    buckets = [(f"{bound:g}", sum(n for at, n in counts if at <= bound)) for bound in DURATION_BUCKETS]
    count = int(fields.get("count") or 0)
    buckets.append(("+Inf", count))
    return Histogram(buckets, float(fields.get("sum") or 0.0), count)


def _flatten(fields: Mapping[str, Any]) -> list[str]:
    """Field/value pairs as strings; None becomes '' which the scripts read as 'delete'."""
    flat: list[str] = []
    for name, value in fields.items():
        flat.append(name)
        if value is None:
            flat.append("")
        elif isinstance(value, bool):
            flat.append("1" if value else "0")
        elif isinstance(value, float):
            flat.append(f"{value:.3f}")
        else:
            flat.append(str(value))
    return flat


def encode_cursor(task_id: str) -> str:
    return base64.urlsafe_b64encode(task_id.encode()).decode()


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except ValueError:
        return ""
