"""A worker that has grown past its memory bound starts afresh, in the same process.

The import parsers are bounded (formats/limits.py), but a process that once held a lot keeps it:
CPython and glibc give little freed memory back, and after a ``MemoryError`` a worker stayed at
~4 GB and failed every later job (issue 15). So after each import the worker gives back what it
can (``malloc_trim``) and looks at its RSS; above ``worker_restart_rss_bytes`` (or after a
``MemoryError``) it stops taking jobs, lets the jobs it runs finish, shuts down as on a signal,
and ``exec``s itself with the same command line.

Why exec and not exit: ``dataport dev`` stops everything when a child exits, and Compose would
restart the container only after a delay; an exec keeps the process id (so supervisors, the
parent-death signal and tests see the same worker), the environment and the log files, and
starts with a fresh heap. No job is cut off: the ones running finish first.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from typing import Any

import psutil

log = logging.getLogger("dataport.worker")

WORKER_KEY = "arq_worker"  # the arq Worker, in the jobs' ctx
RESTART_KEY = "restart_reason"  # set once a restart is asked for


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def give_back() -> None:
    """Return the free parts of the C heap to the system (glibc only; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def over(limit: int) -> int | None:
    """The RSS if above ``limit`` once freed memory is given back, else None."""
    give_back()
    rss = rss_bytes()
    return rss if rss > limit else None


def request_restart(ctx: dict[str, Any], reason: str) -> None:
    """Stop taking jobs, and once those running have finished, restart (see ``run``)."""
    worker = ctx.get(WORKER_KEY)
    if worker is None or worker.ctx.get(RESTART_KEY):
        return
    worker.ctx[RESTART_KEY] = reason  # (a job's ctx is a copy of the worker's)
    log.warning("worker restart requested: %s; taking no more jobs", reason)
    worker.allow_pick_jobs = False
    worker.ctx["restart_task"] = asyncio.get_running_loop().create_task(_stop_when_idle(worker))


async def _stop_when_idle(worker: Any) -> None:
    # A poll under way when picking stopped may still start a job: wait until none runs at all.
    while running := [task for task in worker.tasks.values() if not task.done()]:
        await asyncio.wait(running)
    worker.handle_sig(signal.SIGUSR1)  # as on a signal: the main loop stops, run() shuts down


def run(worker: Any) -> None:
    """Run the arq ``worker``; exec the same command afresh if a restart was asked for."""
    worker.ctx[WORKER_KEY] = worker
    worker.run()
    reason = worker.ctx.get(RESTART_KEY)
    if reason is None:
        return
    log.warning("worker restarting in the same process (exec): %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
