"""Progress snapshots written straight to a subscriber's WebSocket, past the subscription's
generator chain.

A subscription's event travels a long way: the resolver's generator, the quota guard
(``api/subscription_guard.py``), graphql-core's event mapping, Strawberry's result stream and its
extensions' hooks, the protocol handler's message, then Starlette and uvicorn. Once the result is
shared (``api/subscription_results.py``) that walk is most of what is left per push per subscriber:
about half of the api's ~60 µs, the socket write a third (py-spy on ``bench/subscribers.py``). With
5,000 tabs on one export at 4 pushes a second that is more than the api's core.

So every snapshot after the first is written by the watcher itself (``tasks/watch.py`` offers it
to the push before yielding it): the shared result of this subscription's selection (executed once
per process), spliced with the operation's id into the protocol's ``next`` (legacy: ``data``)
message and sent on the socket. What the push declines still goes through Strawberry: the first
snapshot (which is also how the push learns the subscription's executor), results with errors
(masked per subscriber) and subscriptions whose results are not shared. Nothing of Strawberry's is
skipped that a snapshot needs: its extensions work per operation (limits, cached documents) or on
errors (masking), and after the final snapshot the watcher ends as before, so ``complete`` follows
the last ``next``. The push runs in the operation's own task, like the send it replaces: a stalled
socket holds up only its own subscription, a client's ``complete`` or the token's expiry cancels it
where it waits, and the quota guard's slot is held throughout.

The handlers (``api/websockets.py``) start a ``DirectPush`` for each operation at the start of its
task (``start_push``); the executor tells it which executor the subscription has at its first event
(``EXECUTOR_LISTENER``); the resolver hands it to its watcher (``direct_push``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from graphql import ExecutionResult

from api.subscription_results import EXECUTOR_LISTENER, SHARED, SharedEventExecutor, message_head
from tasks.models import Task

SendText = Callable[[str], Awaitable[None]]


class DirectPush:
    """One operation's way past the chain: its message's head, its socket's send, and the executor
    and presentation its snapshots need."""

    __slots__ = ("head", "send_text", "executor", "present", "alive")

    def __init__(self, operation_id: str, message_type: str, send_text: SendText) -> None:
        self.head = message_head(operation_id, message_type)
        self.send_text = send_text
        self.executor: SharedEventExecutor | None = None
        self.present: Callable[[Task], object] | None = None  # what the resolver yields for a task
        self.alive = True

    def listen(self, executor: SharedEventExecutor) -> None:
        if self.executor is None:
            self.executor = executor

    async def __call__(self, task: Task) -> bool:
        """Write ``task``'s snapshot to the socket; False, having written nothing, when it must go
        through Strawberry instead (module docstring)."""
        executor, present = self.executor, self.present
        if executor is None or present is None or not self.alive:
            return False
        outcome = executor.shared_result(present(task))
        if outcome is None:
            return False
        if not isinstance(outcome, ExecutionResult):
            outcome = await outcome
        if outcome.errors or outcome.extensions:
            return False
        encoded = SHARED.encoded(outcome.data)
        if encoded is None:
            return False
        try:
            await self.send_text(self.head + encoded + "}")
        except Exception:  # the socket is gone: Strawberry's own send finds that out and ends the operation
            self.alive = False
            return False
        SHARED.pushed += 1
        return True


_CURRENT: ContextVar[DirectPush | None] = ContextVar("dataport_direct_push", default=None)


def start_push(operation_id: str, message_type: str, send_text: SendText) -> DirectPush:
    """The push of the operation whose task this is (called first thing in that task)."""
    push = DirectPush(operation_id, message_type, send_text)
    _CURRENT.set(push)
    EXECUTOR_LISTENER.set(push.listen)
    return push


def direct_push(present: Callable[[Task], object]) -> DirectPush | None:
    """The running operation's push, presenting snapshots as ``present`` does (the object the
    resolver yields for a task); None outside a WebSocket operation (nothing is pushed directly)."""
    push = _CURRENT.get()
    if push is not None:
        push.present = present
    return push
