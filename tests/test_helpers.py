"""The helper processes' pool (``sources/helpers.py``), on its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import operator

from sources.helpers import HelperPool, _context


def _noop() -> None:
    pass


async def test_work_handed_over_in_the_turn_the_processes_start_is_not_lost():
    """The processes start in a thread; their pool arrives as the result of a future. Work handed
    out while they start waits for that future in a task of its own. When the future completes in
    the same turn of the event loop as that task's first step, the task runs before the future's
    done-callbacks: it must take the pool from the future, not from what a callback would set."""
    pool = HelperPool(_noop, (), processes=1)
    loop = asyncio.get_running_loop()
    pool._starting = loop.create_future()  # what begin() makes, completed by hand below
    pool._starting.add_done_callback(pool._started)
    pool.submit(1, operator.add, 2, 3)  # still starting: the work waits in a task, queued now
    executor = concurrent.futures.ProcessPoolExecutor(1, mp_context=_context)
    try:
        pool._starting.set_result(executor)  # its callbacks are queued behind that task
        assert [item async for item in pool.results(every=True)] == [(5, 1)]
    finally:
        pool.stop()
        executor.shutdown(wait=True)
