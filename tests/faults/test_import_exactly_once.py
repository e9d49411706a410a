"""A worker killed right after its import's COMMIT: the rows are in, and the task must say so.

The re-run used to meet its own rows and fail with "a row with id=… already exists" (INSERT), and
the dataset was never marked written, so an older export of it was reused with stale rows. The
commit now carries a receipt (``sources/receipts.py``): the re-run finds it, writes nothing, and
ends SUCCEEDED with the committed count.

The window between COMMIT and SUCCEEDED is milliseconds wide. The test watches the database for
the receipt and freezes the worker (SIGSTOP) the moment it appears; if the task had already
succeeded by then, that round missed the window and another one is tried.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import psycopg
import pytest

from sources.receipts import TABLE
from tests.fixtures.stack import Stack, TestData
from tests.test_imports import Target, big_csv

ROWS = 20_000
ROUNDS = 12


def _has_receipt(test_data: TestData, source: str, task_id: str) -> bool:
    try:
        if source == "sqlite":
            with sqlite3.connect(test_data.imports_db, timeout=0.05) as conn:
                return conn.execute(f"SELECT 1 FROM {TABLE} WHERE task_id = ?", (task_id,)).fetchone() is not None
        with psycopg.connect(test_data.postgres_url, autocommit=True) as conn:
            return conn.execute(f"SELECT 1 FROM {TABLE} WHERE task_id = %s", (task_id,)).fetchone() is not None
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
        return False  # no receipt table yet, or the writer holds the lock


def _freeze_after_commit(stack: Stack, api, test_data: TestData, source: str, task_id: str, worker) -> bool:
    """SIGSTOP ``worker`` as soon as the import's receipt is committed; True if the task was then
    still PROCESSING (the worker frozen inside the window), else the worker is let go."""
    deadline = time.monotonic() + 60
    while not _has_receipt(test_data, source, task_id):
        assert time.monotonic() < deadline, api.import_task(task_id)
        assert worker.poll() is None
    os.kill(worker.pid, signal.SIGSTOP)
    if api.import_task(task_id)["status"] == "PROCESSING":
        return True
    os.kill(worker.pid, signal.SIGCONT)
    return False


@pytest.mark.parametrize("source", ["sqlite", "postgres"])
def test_a_worker_killed_right_after_its_commit_ends_succeeded_with_its_rows(idle_queue: Stack,
                                                                              test_data: TestData, source):
    api = idle_queue.api()
    dataset = f"imp_{source}"
    base = 80_000_000 if source == "sqlite" else 90_000_000
    request = dict(dataset=dataset, format="CSV", columns=["id"], limit=5,
                   filters=[{"field": "id", "op": "GTE", "value": base}])
    idle_queue.start_worker()
    before = api.wait(api.export(**request)["id"])
    assert before["rowCount"] == 0
    idle_queue.stop_workers()

    for round_ in range(ROUNDS):
        start = base + round_ * ROWS
        task = api.start_import(dataset, big_csv(start, ROWS))
        worker = idle_queue.start_worker()
        if _freeze_after_commit(idle_queue, api, test_data, source, task["id"], worker):
            idle_queue.kill(worker)
            break
        assert api.wait_import(task["id"], timeout=60)["status"] == "SUCCEEDED"
        idle_queue.stop_workers()
    else:
        pytest.fail(f"none of {ROUNDS} rounds froze the worker between its COMMIT and SUCCEEDED")

    idle_queue.start_worker()
    done = api.wait_import(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 2, done
    assert done["rowsImported"] == ROWS and done["rowsFailed"] == 0
    assert any("committed by an earlier attempt" in (e["message"] or "") for e in done["events"]), done["events"]
    target = Target(test_data, source)
    assert target.ids([start, start + ROWS - 1, start + ROWS]) == [start, start + ROWS - 1]

    # The dataset was marked written: the same export is run again, not the stale one reused.
    again = api.export(**request)
    assert again["id"] == before["id"] and again["run"] == before["run"] + 1, again
    assert api.wait(again["id"])["rowCount"] == 5
