"""One execution per snapshot, shared by every subscriber that asked the same thing.

A subscription runs its selection set once per event it yields (graphql-core's
MapSourceToResponseEvent). With a thousand tabs following one export, that was a thousand executions
of the same selection on the same snapshot, each result then JSON-encoded on its own: about 0.4 ms
of api CPU per push per subscriber (bench/results/2026-12-06-subscribers.md). Here an api process
executes each distinct (document, operation, variables, task snapshot) once, keeps the result for
``TTL_SECONDS`` (long enough for every subscriber of that snapshot to take it; the fan-out sends a
task's snapshots at most four times a second) and hands the same result to the others; the
WebSocket handlers (``api/websockets.py``) then encode its ``data`` once too (``frame``).

A snapshot is identified by its task's id, ``version`` (bumped by every write, ``tasks/scripts.lua``),
run and creation time (a task deleted and requested again starts its versions anew), and the
GraphQL type it is presented as (``taskUpdates`` yields either).

**Callers.** Most fields are the snapshot's and the same for everyone allowed to subscribe (access
is checked once, when the subscription starts). A field whose resolver reads the caller
(``downloadUrl``: only for a caller who may read the rows; ``upload``; ``errorReportUrl``) must never
reach another caller: a selection containing one is shared only between subscriptions of the same
caller (owner, roles, admin flag and verified claims all equal), which is what one user's many tabs
are. Which fields those are is decided from the schema, default-deny: every resolver that takes
``info`` reads the caller unless it is named in ``SHARED_FIELDS``, so a field added later is kept per
caller until someone decides otherwise.

The seam is graphql-core's per-event executor (``Executor.build_per_event_executor``), set through
Strawberry's ``execution_context_class``: the subscription's source stream, its access checks, its
quota and its errors are untouched; only the execution of the selection for each yielded snapshot
is looked up first. Queries and mutations never build per-event executors and are not affected.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import orjson
from graphql import (
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    SelectionSetNode,
)
from graphql.execution import Executor
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from tasks.models import Task

TTL_SECONDS = 5.0
MAX_ENTRIES = 10_000
MAX_SHAPES = 1_024

# Fields whose resolvers take ``info`` but read only the task and the shared services, never the
# caller: the task's events, its place in the queue, and pollAfterSeconds (null for subscribers).
SHARED_FIELDS = frozenset({"events", "queuePosition", "pollAfterSeconds"})

Key = tuple[object, ...]


class _Entry:
    """One executed (or executing) selection for one snapshot, and its ``data`` encoded once."""

    __slots__ = ("result", "pending", "born", "payload")

    def __init__(self, born: float) -> None:
        self.result: ExecutionResult | None = None
        self.pending: asyncio.Future[ExecutionResult] | None = None
        self.born = born
        self.payload: str | None = None  # '{"data":…}', made by the first send


def caller_fields(schema: GraphQLSchema) -> frozenset[str]:
    """Names of the fields whose resolvers may depend on the caller (module docstring): those that
    take ``info``, except ``SHARED_FIELDS``; root operation types are left out (a subscription's root
    field resolves to the event itself)."""
    roots = {schema.query_type, schema.mutation_type, schema.subscription_type}
    names: set[str] = set()
    for named in schema.type_map.values():
        if named in roots or named.name.startswith("__"):
            continue
        if not isinstance(named, GraphQLObjectType | GraphQLInterfaceType):
            continue
        for name, field in named.fields.items():
            definition = (field.extensions or {}).get("strawberry-definition")
            resolver = getattr(definition, "base_resolver", None)
            if resolver is not None and resolver.info_parameter is not None and name not in SHARED_FIELDS:
                names.add(name)
    return frozenset(names)


def selects_any(
    selection_set: SelectionSetNode | None, fragments: Mapping[str, FragmentDefinitionNode], names: frozenset[str]
) -> bool:
    """Whether the selection, fragments included, selects a field named in ``names`` anywhere."""
    stack = [selection_set]
    seen: set[str] = set()
    while stack:
        current = stack.pop()
        if current is None:
            continue
        for selection in current.selections:
            if isinstance(selection, FieldNode):
                if selection.name.value in names:
                    return True
                stack.append(selection.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                stack.append(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                seen.add(selection.name.value)
                fragment = fragments.get(selection.name.value)
                stack.append(fragment.selection_set if fragment is not None else None)
    return False


def caller_key(context: object) -> tuple[object, ...] | None:
    """Everything about the caller a field may depend on, or None when it cannot be told (then
    nothing is shared)."""
    try:
        identity = context.identity  # type: ignore[attr-defined]
        claims = orjson.dumps(identity.claims, option=orjson.OPT_SORT_KEYS)
        return (identity.owner, identity.roles, identity.admin, claims)
    except Exception:
        return None


class SharedResults:
    """The process's executed selections by snapshot, for ``TTL_SECONDS``; bounded to
    ``MAX_ENTRIES`` (oldest out)."""

    def __init__(self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._by_data: dict[int, _Entry] = {}  # id(result.data) -> its entry, for ``frame``
        self._shapes: dict[tuple[str, int], tuple[str | None, bool]] = {}
        self._caller_fields: tuple[GraphQLSchema, frozenset[str]] | None = None
        self.executions = 0  # selections executed (``/metrics``: ``_Metrics``)
        self.shared = 0  # results handed out without executing
        self.pushed = 0  # of all handed out, those written past the generator chain (subscription_push)

    # -- keys -------------------------------------------------------------------------------------

    @staticmethod
    def key(prefix: Key, payload: object) -> Key | None:
        """The snapshot key of ``payload`` under a subscription whose keys start with ``prefix``, or
        None: not a task snapshot."""
        task = getattr(payload, "task", None)
        if not isinstance(task, Task):
            return None
        return (prefix, type(payload).__name__, task.id, task.version, task.run, task.created_at)

    def prefix(self, executor: Executor) -> Key | None:
        """What a subscription's snapshot keys share: its document, operation, variables and, for a
        selection with a caller's field, the caller; the same for every event, so worked out once per
        subscription (``SharedEventExecutor.shared_prefix``). None: a document whose text is unknown
        (parsed without locations), variables that are not JSON, or a caller that cannot be told."""
        location = executor.operation.loc
        if location is None:
            return None
        text = location.source.body
        shape = self._shapes.get((text, location.start))
        if shape is None:
            shape = self._shape(executor)
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            self._shapes[(text, location.start)] = shape
        try:
            variables = orjson.dumps(executor.variable_values.coerced, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            return None
        caller: object = None
        if shape[1]:
            caller = caller_key(executor.context_value)
            if caller is None:
                return None
        return (text, location.start, variables, caller)

    def _shape(self, executor: Executor) -> tuple[str | None, bool]:
        """The operation's name and whether it selects a caller's field."""
        schema = executor.schema
        if self._caller_fields is None or self._caller_fields[0] is not schema:
            self._caller_fields = (schema, caller_fields(schema))
        operation = executor.operation
        name = operation.name.value if operation.name else None
        return name, selects_any(operation.selection_set, executor.fragment_definitions, self._caller_fields[1])

    # -- results ----------------------------------------------------------------------------------

    def result(
        self, key: Key, execute: Callable[[], ExecutionResult | Awaitable[ExecutionResult]]
    ) -> ExecutionResult | Awaitable[ExecutionResult]:
        """The result kept under ``key``, or ``execute()``'s, kept for the next subscriber. An
        execution still running is awaited, not repeated; it runs as a task of its own, so a
        subscriber that goes away meanwhile does not cancel it for the others."""
        now = time.monotonic()  # not the loop's clock: get_running_loop() is a getpid() syscall in 3.11
        entry = self._entries.get(key)
        if entry is not None and now - entry.born < self.ttl:
            self.shared += 1
            if entry.result is not None:
                return entry.result
            assert entry.pending is not None
            return asyncio.shield(entry.pending)
        if entry is not None:  # too old to hand out (a signed link, a queue position): executed anew
            self._forget(key, entry)
        self._prune(now)
        entry = self._entries[key] = _Entry(now)
        self.executions += 1
        try:
            outcome = execute()
        except BaseException:
            del self._entries[key]
            raise
        if isinstance(outcome, ExecutionResult):
            self._done(key, entry, outcome)
            return outcome
        entry.pending = asyncio.ensure_future(outcome)
        entry.pending.add_done_callback(lambda future: self._settled(key, entry, future))
        return asyncio.shield(entry.pending)

    def _settled(self, key: Key, entry: _Entry, future: asyncio.Future[ExecutionResult]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._forget(key, entry)  # the next subscriber tries again
            return
        self._done(key, entry, future.result())

    def _done(self, key: Key, entry: _Entry, result: ExecutionResult) -> None:
        entry.result, entry.pending = result, None
        if isinstance(result.data, dict) and self._entries.get(key) is entry:  # not pruned meanwhile
            self._by_data[id(result.data)] = entry

    def _forget(self, key: Key, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
        if entry.result is not None and self._by_data.get(id(entry.result.data)) is entry:
            del self._by_data[id(entry.result.data)]

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, oldest = next(iter(entries.items()))
            if now - oldest.born < self.ttl and len(entries) < self.max_entries:
                break
            self._forget(key, oldest)

    # -- encoding ---------------------------------------------------------------------------------

    def payload(self, payload: Mapping[str, object]) -> str | None:
        """``payload`` (a ``next``/``data`` message's) as JSON, encoded once per shared result; None
        when it is not a shared result's plain data (errors and extensions are encoded per message:
        error masking makes new error objects for each subscriber)."""
        if len(payload) != 1:
            return None
        return self.encoded(payload.get("data"))

    def encoded(self, data: object) -> str | None:
        """``{"data": data}`` as JSON, encoded once per shared result; None when ``data`` is not a
        shared result's."""
        entry = self._by_data.get(id(data))
        if entry is None or entry.result is None or entry.result.data is not data:
            return None
        if entry.payload is None:
            entry.payload = orjson.dumps({"data": data}).decode()
        return entry.payload

    def __len__(self) -> int:
        return len(self._entries)


# One per api process.
SHARED = SharedResults()


class _Metrics(Collector):
    """``SHARED``'s counts at ``/metrics``, read at scrape time (nothing to update per push)."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "dataport_subscription_executions",
            "Selections executed for task snapshots pushed to subscriptions: one per distinct snapshot "
            "and query (and caller, for fields that depend on the caller), not one per subscriber",
            value=SHARED.executions,
        )
        yield CounterMetricFamily(
            "dataport_subscription_results",
            "Task snapshot results handed to subscriptions, executed or shared",
            value=SHARED.executions + SHARED.shared,
        )
        yield CounterMetricFamily(
            "dataport_subscription_direct_pushes",
            "Progress snapshots written straight to a subscriber's WebSocket, past the subscription's "
            "generator chain (api/subscription_push.py)",
            value=SHARED.pushed,
        )


REGISTRY.register(_Metrics())


def message_head(operation_id: object, message_type: str) -> str:
    """A ``next``/``data`` message up to its payload, which follows with a closing brace."""
    return '{"id":' + orjson.dumps(operation_id).decode() + ',"type":"' + message_type + '","payload":'


def frame(message: Mapping[str, Any]) -> str | None:
    """A ``next`` (graphql-transport-ws) or ``data`` (graphql-ws) message carrying a shared result,
    as its text frame: the result's encoded payload spliced in; None for any other message."""
    kind = message.get("type")
    if kind != "next" and kind != "data":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict):
        return None
    encoded = SHARED.payload(payload)
    if encoded is None:
        return None
    return message_head(message.get("id"), kind) + encoded + "}"


class _SharedEvent:
    """Stands in for a per-event executor: ``execute_operation`` looks the snapshot up first."""

    __slots__ = ("executor", "payload", "key")

    def __init__(self, executor: SharedEventExecutor, payload: object, key: Key) -> None:
        self.executor = executor
        self.payload = payload
        self.key = key

    def execute_operation(self, serially: bool | None = None) -> Any:
        def execute() -> Any:
            per_event = StrawberryGraphQLCoreExecutionContext.build_per_event_executor(self.executor, self.payload)
            return per_event.execute_operation(serially)

        return SHARED.result(self.key, execute)


# Set in a WebSocket operation's task (``api/subscription_push.py``) and told the subscription's
# executor at each event it executes, for the snapshots pushed past the generator chain afterwards.
EXECUTOR_LISTENER: ContextVar[Callable[[SharedEventExecutor], None] | None] = ContextVar(
    "dataport_executor_listener", default=None
)


class SharedEventExecutor(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's executor, with subscription events of task snapshots executed once per process
    (``SharedResults``); the schema's ``execution_context_class``."""

    @functools.cached_property
    def shared_prefix(self) -> Key | None:
        return SHARED.prefix(self)

    def build_per_event_executor(self, payload: Any) -> Any:
        told = EXECUTOR_LISTENER.get()
        if told is not None:
            told(self)
        prefix = self.shared_prefix
        key = None if prefix is None else SHARED.key(prefix, payload)
        if key is None:
            return super().build_per_event_executor(payload)
        return _SharedEvent(self, payload, key)

    def shared_result(self, payload: object) -> ExecutionResult | Awaitable[ExecutionResult] | None:
        """``payload``'s result from the process's shared results (executed now if nobody has asked
        for it yet), or None when this subscription's results are not shared."""
        prefix = self.shared_prefix
        key = None if prefix is None else SHARED.key(prefix, payload)
        if key is None:
            return None
        return _SharedEvent(self, payload, key).execute_operation(False)
