"""Helper processes never outlive the process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# A worker-like process: a spawned process pool whose helpers call exit_with, as the PostgreSQL
# source's flattening helpers do. It prints the helpers' pids, then waits to be killed.
_POOL_OWNER = textwrap.dedent("""
    import concurrent.futures, multiprocessing, os, sys, time
    from dataport.processes import exit_with

    if __name__ == "__main__":
        pool = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with, initargs=(os.getpid(),))
        futures = [pool.submit(os.getpid) for _ in range(8)]
        print(" ".join(str(p) for p in sorted({f.result() for f in futures})), flush=True)
        time.sleep(120)
""")


def test_pool_helpers_exit_when_their_owner_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(_POOL_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        helpers = [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]
        assert helpers and all(h.is_running() for h in helpers)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        gone, alive = psutil.wait_procs(helpers, timeout=10)
        assert alive == [], f"helpers outlived their owner: {[p.pid for p in alive]}"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
