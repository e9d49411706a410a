"""The schema's executor: graphql-core's, without the reference cycles every execution made.

graphql-core 3.3's ``Executor`` hands resolvers ``async_helpers``, two bound methods of the executor
itself, and keeps them on the executor: executor → helpers → bound method → executor, a cycle. So
nothing an execution touched was freed when the request ended (the executor holds the context, the
request, the field plans and the result): ~140 objects per ``exportTask`` were left to the cyclic
collector, which then freed ~20,000 of them at once every 150 requests, a 10-20 ms pause that every
request in flight waited out (bench/results/2026-12-06-api_load.md, Session 2). Here the helpers
reach the executor through a weak reference, so reference counting frees an execution as soon as
its request is done, and a young collection has next to nothing to walk.

The helpers behave as graphql-core's while the executor lives, which is as long as its execution
(or a subscription's stream) runs: resolvers only get them through ``info`` during execution. Work
handed to ``track`` after the executor is gone is still settled in the background, untracked.

A field's error is a second cycle: the executor keeps the errors it collected, and each error's
traceback holds the frames that raised it, whose ``self`` is the executor. Once the response is
built it holds the errors, so the executor lets go of them (``build_response``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Sequence
from typing import Any

from graphql import ExecutionResult, GraphQLResolveInfoHelpers
from graphql.execution.executor import CollectedErrors
from graphql.pyutils import gather_with_cancel

from api.subscription_results import SharedEventExecutor


def _gather(values: Sequence[Awaitable[Any]]) -> Awaitable[list[Any]]:
    return gather_with_cancel(*values)  # what Executor.gather_async_work does; it needs no executor


class Executor(SharedEventExecutor):
    """The schema's ``execution_context_class`` (schema/__init__.py): subscription events shared
    (``SharedEventExecutor``), and no cycle through ``async_helpers``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        executor = weakref.ref(self)

        def track(values: Sequence[Any]) -> None:
            live = executor()
            if live is not None:
                live.track_async_work(values)
                return
            awaitables = [value for value in values if asyncio.isfuture(value) or asyncio.iscoroutine(value)]
            if awaitables:  # pragma: no cover - a resolver outliving its execution
                asyncio.ensure_future(asyncio.gather(*awaitables, return_exceptions=True))

        self.async_helpers = GraphQLResolveInfoHelpers(gather=_gather, track=track)

    def build_response(self, data: dict[str, Any] | None) -> Any:
        result = super().build_response(data)
        if isinstance(result, ExecutionResult):  # complete: an incremental one still needs them
            self.collected_errors = CollectedErrors()  # the result holds them now
        return result
