"""SIGTERM during an export, as a rolling deploy sends it: no work thrown away, no try lost.

A stopping worker takes no new job and lets its running jobs finish within the grace period; a
job still running when the grace period ends is handed back to the queue at once, and the try it
began does not count, so any number of deploys cannot fail a good export.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.fixtures.stack import DEMO_ROWS, Stack

WIDE = dict(dataset="samples", format="CSV")  # every column of the 100,000 demo rows: a few seconds


def start_worker(stack: Stack, grace: float, **env: str) -> subprocess.Popen:
    """A worker of ``stack`` with ``grace`` seconds to finish on SIGTERM, and settings ``env``."""
    log = (stack.data_dir / f"worker-grace-{len(stack.workers)}.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "dataport.cli", "worker"],
        env={**stack.env, "DATAPORT_WORKER_SHUTDOWN_GRACE_SECONDS": str(grace), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.workers.append(worker)
    stack.processes.append(worker)
    return worker


def starts(task: dict) -> int:
    return sum(1 for e in task["events"] if e["status"] == "PROCESSING")


def wait_reading(api, task_id: str, after_starts: int = 0, timeout: float = 60) -> dict:
    """The task once a new run of it (its ``after_starts + 1``-th start) has read some rows."""
    deadline = time.monotonic() + timeout
    while True:
        task = api.task(task_id)
        if starts(task) > after_starts and task["progress"]["processedRows"] > 0:
            return task
        assert task["status"] in ("PENDING", "PROCESSING") and time.monotonic() < deadline, task
        time.sleep(0.01)


def test_sigterm_lets_the_running_export_finish_and_takes_no_new_job(idle_queue):
    api = idle_queue.api()
    task = api.export(**WIDE)
    worker = start_worker(idle_queue, grace=60)
    wait_reading(api, task["id"])

    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal is handled before the next job is queued
    later = api.export(dataset="special", format="JSON", columns=["id"])

    assert worker.wait(timeout=90) == 0
    done = api.task(task["id"])
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 1 and done["rowCount"] == DEMO_ROWS, done
    assert api.task(later["id"])["status"] == "PENDING", "a stopping worker took a new job"


def test_three_sigterms_past_the_grace_period_do_not_fail_the_export(idle_queue):
    api = idle_queue.api()
    task = api.export(**WIDE)
    for deploy in range(3):
        worker = start_worker(idle_queue, grace=0.2)
        wait_reading(api, task["id"], after_starts=deploy)
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - stopped_at < 10
        assert api.task(task["id"])["status"] in ("PENDING", "PROCESSING")  # handed back, not failed

    start_worker(idle_queue, grace=60)
    done = api.wait(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED" and done["rowCount"] == DEMO_ROWS, done
    assert done["attempts"] == 1, "a run cut off by a shutdown counted as a try"
