"""Child processes that never outlive their parent, a polite way to stop them, and the event loop
that our own processes run on."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

# Resolved here, not in the forked child: a dlopen after fork can deadlock in a threaded parent.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (with uvicorn[standard]; the api runs on it too),
    else asyncio's. A read from PostgreSQL waits on its socket once per 8 KB packet, and asyncio's
    loop costs more CPU per wait: on the 1,000,000-row bench, three alternating invocations of two
    rounds gave a median job of 3.88 s against 4.14 s, a median ratio to psql of 1.34x against 1.47x."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: ask for SIGTERM when the parent goes away."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def exit_with(owner_pid: int) -> None:
    """Called inside a helper process (a pool's initializer): end it as soon as ``owner_pid`` ends,
    even when that is not its parent (helpers forked by a fork server), so that a killed worker
    leaves no helper behind. A thread waits on a pidfd of the owner (Linux 5.3+), or, where there
    is none (an older kernel, a seccomp profile without pidfd_open), looks once a second."""
    try:
        owner: int | None = os.pidfd_open(owner_pid)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):
        owner = None

    def wait() -> None:
        if owner is not None:
            select.select([owner], [], [])  # readable once the owner has ended
        else:
            while _alive(owner_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=wait, name="exit-with-owner", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for Popen: the kernel sends the child SIGTERM when the starting thread dies,
    so not even a SIGKILL of the parent leaves it behind (Linux; elsewhere a no-op)."""
    return functools.partial(_die_with_parent, os.getpid())


def stop(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
