"""Helper processes that turn a read's batches into CSV while the reader fetches the next ones.

A source whose CSV costs more CPU than the store needs to hand the data over (flattened JSONB
documents, pages of OpenSearch hits) gives that work to ``HELPERS`` processes, so that both cores
render while the store prepares more. The results are taken in the order the work was handed out.

The processes are forked from one server process (multiprocessing's "forkserver"), started once
with the helpers' modules imported: a helper is ready in ~30 ms, where a freshly spawned
interpreter took ~0.8 s of CPU here to import them (twice per export). The worker starts that
server with itself (``prepare``); elsewhere it starts with the first helpers. Not forked from the
worker itself: that would share its sockets and copy its threads' locks.

Each helper runs ``initializer(*initargs)`` once (what the read needs: its columns, its plan),
ends with the worker (even a SIGKILLed one) and is stopped when the read ends, fails or is
abandoned. At most ``depth * processes`` batches are handed out at once, so memory stays flat.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dataport.processes import exit_with
from sources.base import TransientSourceError

HELPERS = 2 if (os.cpu_count() or 1) > 1 else 0
# Imported by the fork server, so that each helper has them from the start: the OpenSearch page
# converter, whose reads last seconds. The PostgreSQL source (~10 MiB more, idle, with psycopg) is
# imported by its own helpers, for reads of 5,000,000 cells or more: tens of seconds.
HELPER_MODULES = ("sources.opensearch.rendering",)

_context = multiprocessing.get_context("forkserver")


def prepare(main_modules: Sequence[str] = ()) -> None:
    """Start the fork server now, with ``main_modules`` and the helpers' modules imported.

    ``main_modules``: what the program's ``__main__`` imports (every new process runs ``__main__``
    again, which is cheap only when its imports are done already). Blocking (~0.5 s): call it in
    a thread at start-up. Without it, the server starts with the first helpers."""
    _context.set_forkserver_preload([*main_modules, *HELPER_MODULES])
    multiprocessing.forkserver.ensure_running()


def _start(owner: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    # A SIGKILLed worker must not leave its helpers running. (Their parent is the fork server,
    # which lives as long as any helper does.)
    exit_with(owner)
    initializer(*initargs)


def _ended() -> TransientSourceError:
    # Killed from outside (the OOM killer, an operator): the export is tried again.
    return TransientSourceError("A helper process of this read ended unexpectedly; the read has to start again.")


def _ready() -> None:
    """Nothing: handed to each process at start, so that all of them start at once."""


class HelperPool:
    """Work handed to helper processes, its results taken in order with the rows each holds."""

    def __init__(self, initializer: Callable[..., None], initargs: tuple[Any, ...], *, processes: int = HELPERS,
                 depth: int = 2):  # fmt: skip
        self.processes = processes
        self.depth = depth
        self.args = (os.getpid(), initializer, initargs)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._starting: asyncio.Future[concurrent.futures.ProcessPoolExecutor] | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any], int]] = collections.deque()

    @property
    def started(self) -> bool:
        return self._starting is not None

    def begin(self) -> None:
        """Start every process now, in the background (a pool would start them one task at a time),
        so that they start while the store prepares its first answer: 2 processes take ~0.12 s
        from a running fork server, and about half a second more if it is not running yet. Work
        submitted meanwhile is handed over once they have started."""
        if self._starting is not None:
            return

        def start() -> concurrent.futures.ProcessPoolExecutor:
            pool = concurrent.futures.ProcessPoolExecutor(self.processes, mp_context=_context, initializer=_start,
                                                          initargs=self.args)  # fmt: skip
            for _ in range(self.processes):
                pool.submit(_ready)
            return pool

        self._starting = asyncio.get_running_loop().run_in_executor(None, start)
        self._starting.add_done_callback(self._started)

    def _started(self, starting: asyncio.Future[concurrent.futures.ProcessPoolExecutor]) -> None:
        if starting.cancelled() or starting.exception() is not None:
            return
        if starting is self._starting:
            self.pool = starting.result()
        else:  # stopped while the processes started
            starting.result().shutdown(wait=False, cancel_futures=True)

    async def start(self) -> None:
        """``begin``, and wait until the processes have started."""
        self.begin()
        starting = self._starting
        assert starting is not None
        pool = await asyncio.shield(starting)
        # Taken from the result, not left to ``_started``: a future completed in this turn of the
        # loop has its callbacks queued behind the tasks already queued, so a task submitting work
        # could find the pool started and ``self.pool`` still None.
        if starting is self._starting:
            self.pool = pool

    def submit(self, rows: int, work: Callable[..., Any], *args: Any) -> None:
        """Hand ``work(*args)`` (a module-level function) to a process; its result holds ``rows``."""
        assert self._starting is not None
        if self.pool is None:  # still starting
            self.pending.append((asyncio.ensure_future(self._submit_once_started(work, args)), rows))
            return
        self.pending.append((self._submit(work, args), rows))

    def _submit(self, work: Callable[..., Any], args: tuple[Any, ...]) -> asyncio.Future[Any]:
        assert self.pool is not None
        try:
            return asyncio.wrap_future(self.pool.submit(work, *args))
        except BrokenProcessPool as e:
            raise _ended() from e

    async def _submit_once_started(self, work: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        await self.start()
        return await self._submit(work, args)

    def add(self, rows: int, result: Any) -> None:
        """A result made in this process, taken in its place among the others."""
        done = asyncio.get_running_loop().create_future()
        done.set_result(result)
        self.pending.append((done, rows))

    async def results(self, *, every: bool = False) -> AsyncGenerator[tuple[Any, int], None]:
        """The results to take now, in order: while too much work is out, or the oldest is done
        (with ``every``: all that is left, when no more work will come)."""
        while self.pending and (every or self.full or self.pending[0][0].done()):
            yield await self.next()

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.depth * self.processes

    async def next(self) -> tuple[Any, int]:
        """The oldest result (raising what its work raised) and its rows. A helper that ended
        before its work was done is a ``TransientSourceError``."""
        future, rows = self.pending.popleft()
        try:
            return await future, rows
        except BrokenProcessPool as e:
            raise _ended() from e

    def stop(self) -> None:
        for future, _ in self.pending:
            future.cancel()
        self.pending.clear()
        if self.pool is not None:  # the processes end once the work in hand is done
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._starting = None  # (a pool still starting is shut down once it has started)
