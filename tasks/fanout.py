"""One Redis subscription per process for every task channel, fanned out to local subscribers.

Every api process runs one ``TaskFanout``: a single pub/sub connection ``PSUBSCRIBE``\\s the task
channel pattern (``dataport:channel:*``), so the Redis connections a process holds do not grow with
its subscribers. Each published snapshot is decoded once, then offered to the ``Inbox`` of every
local subscriber that wants it: the watchers of that task (``exportProgress``/``importProgress``,
``tasks/watch.py``) and the watchers of its owner (``taskUpdates``).

- **Slow clients.** An inbox holds the newest snapshot per task and nothing more: offering never
  blocks and never queues, so a client that stops reading cannot hold up the others or grow a
  backlog; when it reads again it gets the newest state.
- **Coalescing.** A task's progress goes out at most ``MAX_PUSHES_PER_SECOND`` times a second,
  whatever the number of subscribers: a token bucket per task, refilled at that rate and holding at
  most ``BURST`` pushes, so a snapshot that comes a little early (a worker's progress writes are a
  quarter of a second apart, give or take a batch and the loop's jitter) goes at once instead of
  waiting out a whole interval; one that finds the bucket empty waits, replaced by any newer one,
  until a push is due. Its first snapshot and every status change go at once (and spend a push).
  Snapshots not newer than the last one (by ``version``) are dropped.
- **Reconnects.** redis-py resubscribes after a reconnect; the hub sees the new ``psubscribe``
  confirmation (or its own new connection after a longer outage) and re-reads the snapshots of
  every task being watched, so a final status published while it was away is not lost.
- **Quiet tasks.** Deleting a task publishes nothing: every ``QUIET_SECONDS`` the hub re-reads the
  watched tasks it has heard nothing of, once per process, and tells their watchers when one is gone.

Lives in ``tasks/`` (not ``api/``): it knows Redis and the task model and nothing of GraphQL, its
first user is ``tasks/watch.py``, and mypy --strict checks it with the rest of the task layer; the
api only starts and stops it with its lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tasks.inbox import GONE, Inbox
from tasks.models import Task
from tasks.store import active_key, channel, task_key

log = logging.getLogger("dataport.fanout")

PATTERN = channel("*")
_PREFIX = channel("").encode()
MAX_PUSHES_PER_SECOND = 4.0
# Pushes a task may have in hand. With one, a snapshot arriving 240 ms after the last push waited
# another 10 ms, and one arriving 10 ms *before* a push due by the clock waited 240: strict spacing
# locked progress onto the hub's timer instead of the worker's writes, a quarter of a second of
# made-up delay (bench/results/2026-12-06-subscribers.md). Two still average out to the rate.
BURST = 2.0
QUIET_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 5
# Watchers wait through a Redis outage this long, then end with SERVICE_UNAVAILABLE.
GIVE_UP_SECONDS = 60.0


class _TaskState:
    """What the hub remembers of one task it dispatches: the newest version and status, its bucket
    of pushes (``tokens``, as of ``refilled_at``), and the newest snapshot held back for want of one."""

    __slots__ = ("version", "status", "tokens", "refilled_at", "heard_at", "pending", "timer")

    def __init__(self) -> None:
        self.version = -1
        self.status = ""
        self.tokens = BURST
        self.refilled_at = self.heard_at = time.monotonic()
        self.pending: Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    def refill(self, rate: float, now: float) -> None:
        self.tokens = min(BURST, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now


class TaskFanout:
    def __init__(self, redis: Redis, subscriber: Redis, max_pushes_per_second: float = MAX_PUSHES_PER_SECOND) -> None:
        """``redis``: the process's shared client (decoded strings), for the few re-reads;
        ``subscriber``: a client of the hub's own whose one connection carries the subscription."""
        self.redis = redis
        self.subscriber = subscriber
        self.rate = max_pushes_per_second
        self._by_task: dict[str, set[Inbox]] = {}
        self._by_owner: dict[str, set[Inbox]] = {}
        self._owner_tasks: dict[str, set[str]] = {}  # unfinished tasks heard of, per watched owner
        self._states: dict[str, _TaskState] = {}
        self._runner: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.down_since: float | None = None
        self.resubscribed = 0  # how many times the subscription came back (tests, logs)

    @classmethod
    def connect(
        cls,
        redis: Redis,
        url: str,
        name: str = "dataport-fanout",
        max_pushes_per_second: float = MAX_PUSHES_PER_SECOND,
    ) -> TaskFanout:
        """A hub reading through ``redis`` and subscribing on one new connection to ``url``, named
        ``name`` in CLIENT LIST. Short blips are retried by redis-py (which resubscribes); PINGs
        every few seconds notice a connection that died silently."""
        subscriber = Redis.from_url(
            url,
            client_name=name,
            health_check_interval=HEALTH_CHECK_SECONDS,
            socket_keepalive=True,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        return cls(redis, subscriber, max_pushes_per_second)

    # -- lifetime ---------------------------------------------------------------------------------

    async def start(self, wait: float = 5.0) -> None:
        """Subscribe (waiting up to ``wait`` seconds for the confirmation) and start dispatching."""
        self._runner = asyncio.create_task(self._run(), name="task-fanout")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="task-fanout-sweep")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), wait)

    async def stop(self) -> None:
        for job in (self._runner, self._sweeper):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        for state in self._states.values():
            if state.timer is not None:
                state.timer.cancel()
        for inbox in {i for group in (*self._by_task.values(), *self._by_owner.values()) for i in group}:
            inbox.fail(RedisConnectionError("the api is shutting down"))
        await self.subscriber.aclose()

    # -- subscribers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def task_inbox(self, task_id: str) -> Iterator[Inbox]:
        """An inbox for one task's snapshots while the block runs."""
        inbox = Inbox()
        self._by_task.setdefault(task_id, set()).add(inbox)
        self._states.setdefault(task_id, _TaskState())
        try:
            yield inbox
        finally:
            self._forget(self._by_task, task_id, inbox)
            self._drop_state(task_id)

    @contextlib.contextmanager
    def owner_inbox(self, owner: str) -> Iterator[Inbox]:
        """An inbox for the snapshots of every task of ``owner`` while the block runs."""
        inbox = Inbox()
        self._by_owner.setdefault(owner, set()).add(inbox)
        self._owner_tasks.setdefault(owner, set())
        try:
            yield inbox
        finally:
            if not self._forget(self._by_owner, owner, inbox):
                for task_id in self._owner_tasks.pop(owner, ()):
                    self._drop_state(task_id)

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._by_task.values()) + sum(len(s) for s in self._by_owner.values())

    def healthy_or_raise(self) -> None:
        """Raise once Redis has been away past ``GIVE_UP_SECONDS`` (watchers then end, coded)."""
        if self.down_since is not None and time.monotonic() - self.down_since > GIVE_UP_SECONDS:
            raise RedisConnectionError(f"Redis has been unreachable for over {GIVE_UP_SECONDS:.0f} s")

    async def read(self, task_ids: Iterable[str]) -> dict[str, Task | None]:
        """The tasks' current snapshots (None: gone), in one round trip."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(task_key(task_id))
        hashes: list[dict[str, str]] = await pipe.execute()
        return {i: Task.from_hash(h) if h else None for i, h in zip(ids, hashes, strict=True)}

    async def active(self, owner: str) -> list[Task]:
        """The owner's active tasks as they are now (the first thing ``taskUpdates`` sends)."""
        members: set[str] = await self.redis.smembers(active_key(owner))  # type: ignore[misc]
        found = await self.read(members)
        tasks = sorted((t for t in found.values() if t is not None), key=lambda t: t.created_at)
        self._owner_tasks.setdefault(owner, set()).update(t.id for t in tasks if not t.status.is_final)
        return tasks

    # -- the subscription -------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = 0.1
        while True:
            pubsub = self.subscriber.pubsub()
            try:
                await pubsub.psubscribe(PATTERN)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == b"pmessage" or kind == "pmessage":
                        self._on_message(message["channel"], message["data"])
                    elif kind in (b"psubscribe", "psubscribe"):
                        pause = 0.1
                        await self._on_subscribed()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("task fan-out: Redis subscription lost (%s); reconnecting", e)
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _on_subscribed(self) -> None:
        """Subscribed, for the first time or again: catch up on what was missed meanwhile."""
        first = not self._subscribed.is_set()
        self._subscribed.set()
        if self.down_since is not None:
            log.info("task fan-out: resubscribed after %.1f s", time.monotonic() - self.down_since)
        self.down_since = None
        if first:
            return
        self.resubscribed += 1
        try:
            await self._resync(list(self._by_task), list(self._by_owner))
        except (RedisError, OSError) as e:  # the next sweep tries again
            log.warning("task fan-out: re-reading watched tasks failed: %s", e)

    async def _resync(self, task_ids: list[str], owners: list[str]) -> None:
        ids = set(task_ids)
        for owner in owners:
            ids |= self._owner_tasks.get(owner, set())
            members: set[str] = await self.redis.smembers(active_key(owner))  # type: ignore[misc]
            ids |= members
        for task_id, task in (await self.read(ids)).items():
            if task is None:
                self._gone(task_id)
            else:
                self._offer(task)

    async def _sweep_forever(self) -> None:
        """Re-read watched tasks that have been quiet for ``QUIET_SECONDS``: a deletion publishes
        nothing, and a message may be lost with a connection."""
        while True:
            await asyncio.sleep(QUIET_SECONDS / 2)
            if self.down_since is not None:
                if time.monotonic() - self.down_since > GIVE_UP_SECONDS:
                    self._fail_all()
                continue
            now = time.monotonic()
            watched = set(self._by_task) | {t for o in self._by_owner for t in self._owner_tasks.get(o, ())}
            quiet = [t for t in watched if now - self._states.setdefault(t, _TaskState()).heard_at > QUIET_SECONDS]
            for task_id in quiet:
                self._states[task_id].heard_at = now
            try:
                found = await self.read(quiet)
            except (RedisError, OSError) as e:
                log.warning("task fan-out: re-reading quiet tasks failed: %s", e)
                continue
            for task_id, task in found.items():
                if task is None:
                    self._gone(task_id)
                else:
                    self._offer(task)

    # -- dispatch ---------------------------------------------------------------------------------

    def _on_message(self, name: bytes | str, data: bytes | str) -> None:
        raw = name if isinstance(name, bytes) else name.encode()
        task_id = raw[len(_PREFIX) :].decode()
        if task_id not in self._by_task and not self._by_owner:
            return  # nobody here follows it: not even decoded
        fields: dict[str, Any] = orjson.loads(data)
        if task_id not in self._by_task and fields.get("owner") not in self._by_owner:
            return
        self._offer(Task.from_hash({k: str(v) for k, v in fields.items()}))

    def _offer(self, task: Task) -> None:
        """A snapshot, from the channel or a re-read: out now, or held for the rate limit."""
        state = self._states.get(task.id)
        if state is None:
            state = self._states[task.id] = _TaskState()
        now = state.heard_at = time.monotonic()
        if task.version <= state.version:
            return
        first, changed = state.version < 0, task.status.value != state.status
        state.version, state.status = task.version, task.status.value
        state.refill(self.rate, now)
        if first or changed or state.tokens >= 1:
            self._send(task, state)
            return
        state.pending = task
        if state.timer is None:
            wait = (1 - state.tokens) / self.rate
            state.timer = asyncio.get_running_loop().call_later(wait, self._flush, task.id)

    def _flush(self, task_id: str) -> None:
        state = self._states.get(task_id)
        if state is not None and state.pending is not None:
            state.refill(self.rate, time.monotonic())
            self._send(state.pending, state)

    def _send(self, task: Task, state: _TaskState) -> None:
        state.pending = None
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        state.tokens = max(0.0, state.tokens - 1)
        for inbox in self._by_task.get(task.id, ()):
            inbox.offer(task)
        owners = self._by_owner.get(task.owner)
        if owners:
            known = self._owner_tasks.setdefault(task.owner, set())
            if task.status.is_final:
                known.discard(task.id)
            else:
                known.add(task.id)
            for inbox in owners:
                inbox.offer(task)
        if task.status.is_final:
            self._drop_state(task.id)

    def _gone(self, task_id: str) -> None:
        for inbox in self._by_task.get(task_id, ()):
            inbox.offer_gone(task_id)
        for known in self._owner_tasks.values():
            known.discard(task_id)
        self._drop_state(task_id)

    def _fail_all(self) -> None:
        error = RedisConnectionError(f"Redis has been unreachable for over {GIVE_UP_SECONDS:.0f} s")
        for group in (*self._by_task.values(), *self._by_owner.values()):
            for inbox in group:
                inbox.fail(error)

    # -- bookkeeping ------------------------------------------------------------------------------

    @staticmethod
    def _forget(index: dict[str, set[Inbox]], key: str, inbox: Inbox) -> bool:
        """Remove ``inbox`` under ``key``; whether any remain there."""
        group = index.get(key)
        if group is None:
            return False
        group.discard(inbox)
        if not group:
            del index[key]
            return False
        return True

    def _drop_state(self, task_id: str) -> None:
        """Forget a task nobody here follows any more (its newest pending progress included)."""
        state = self._states.get(task_id)
        if state is None or task_id in self._by_task:
            return
        if any(task_id in self._owner_tasks.get(o, ()) for o in self._by_owner):
            return
        if state.timer is not None:
            state.timer.cancel()
        del self._states[task_id]


__all__ = ["GONE", "Inbox", "TaskFanout"]
