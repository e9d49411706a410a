"""Helper processes never outlive the process that started them, even when it is SIGKILLed; work
handed to them while they start waits for them; a pool stopped while starting leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

# A worker-like process: helper processes started as the sources start them (forked from a fork
# server, sources/helpers.py). It prints the helpers' pids and the fork server's, then waits to be killed.
_POOL_OWNER = textwrap.dedent("""
    import asyncio, os, time
    import psutil
    from sources.helpers import HelperPool

    async def main():
        pool = HelperPool(os.getpid, ())
        await pool.start()
        for _ in range(8):
            pool.submit(1, os.getpid)
        served = {(await pool.next())[0] for _ in range(8)}
        servers = [c.pid for c in psutil.Process().children() if c.children()]
        pids = {h.pid for s in servers for h in psutil.Process(s).children()}
        assert served <= pids
        print(" ".join(str(p) for p in sorted(pids)), flush=True)
        print(" ".join(str(p) for p in servers), flush=True)
        time.sleep(120)

    if __name__ == "__main__":
        asyncio.run(main())
""")


def test_pool_helpers_exit_when_their_owner_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(_POOL_OWNER)
    owner = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        helpers = [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]
        servers = [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]
        assert len(helpers) == 2 and all(h.is_running() for h in helpers)
        assert len(servers) == 1 and {h.ppid() for h in helpers} == {servers[0].pid}
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        gone, alive = psutil.wait_procs([*helpers, *servers], timeout=10)
        assert alive == [], f"helpers outlived their owner: {[p.pid for p in alive]}"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_a_helper_ends_with_its_owner_even_when_that_is_not_its_parent(pidfd):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    no_pidfd = "" if pidfd else "del os.pidfd_open; "  # as on a kernel or seccomp profile without it
    helper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; {no_pidfd}from dataport.processes import exit_with; "
            f"exit_with({owner.pid}); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert helper.stdout.readline() == "ready\n"
        assert helper.poll() is None
        owner.kill()
        owner.wait()
        assert helper.wait(5) == 1
    finally:
        for p in (owner, helper):
            p.kill()
            p.wait()
        helper.stdout.close()


def _helpers_now() -> set[int]:
    """The pids of this process's helpers (the children of its fork server)."""
    return {p.pid for c in psutil.Process().children() for p in c.children()}


async def test_work_handed_over_while_the_helpers_start_is_done_in_order():
    from sources.helpers import HelperPool

    pool = HelperPool(os.getpid, ())
    pool.begin()
    try:
        assert pool.started and pool.pool is None  # starting in the background
        for n in range(6):
            pool.submit(n, pow, 2, n)
        assert [await pool.next() for _ in range(6)] == [(2**n, n) for n in range(6)]
        assert pool.pool is not None
    finally:
        pool.stop()


def _processes(pids: set[int]) -> list[psutil.Process]:
    """The processes still there of ``pids``: one that exited since it was listed is what the
    caller waits for anyway (psutil.Process of a pid gone raises)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


async def test_a_pool_stopped_while_its_helpers_start_shuts_them_down_once_started():
    from sources.helpers import HelperPool

    before = _helpers_now()
    pool = HelperPool(os.getpid, ())
    pool.begin()
    starting = pool._starting
    pool.submit(1, pow, 2, 1)
    pool.stop()
    assert not pool.started and not pool.pending
    executor = await starting  # the processes do start: then they are shut down
    assert executor._shutdown_thread
    started = _helpers_now() - before
    gone, alive = psutil.wait_procs(_processes(started), timeout=10)
    assert not alive
