"""A worker killed right after its import's COMMIT: the rows are in, and the task must say so.

The re-run used to meet its own rows and fail with "a row with id=… already exists" (INSERT), and
the dataset was never marked written, so an older export of it was reused with stale rows. The
commit now carries a receipt (``sources/receipts.py``): the re-run finds it, writes nothing, and
ends SUCCEEDED with the committed count.

The window between COMMIT and SUCCEEDED is milliseconds wide, so the test holds the worker in it
with real locks rather than racing it: a lock on the receipts table stops the worker inside its
transaction, just before COMMIT (every Redis write of the run before the commit is done by then);
Redis then pauses writes (``CLIENT PAUSE … WRITE``) and the lock is released, so the worker commits
and stops at its first Redis write after the commit. The receipt is visible, the task still
PROCESSING: the worker is SIGKILLed there.
"""

from __future__ import annotations

import time

import psycopg
import redis

from sources.receipts import COLUMNS, TABLE
from tests.fixtures.stack import Stack, TestData
from tests.test_imports import Target, big_csv

ROWS = 20_000
BASE = 90_000_000


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_worker_killed_right_after_its_commit_ends_succeeded_with_its_rows(idle_queue: Stack, test_data: TestData):
    api = idle_queue.api()
    dataset = "imp_postgres"
    request = dict(
        dataset=dataset, format="CSV", columns=["id"], limit=5, filters=[{"field": "id", "op": "GTE", "value": BASE}]
    )
    idle_queue.start_worker()
    before = api.wait(api.export(**request)["id"])
    assert before["rowCount"] == 0
    idle_queue.stop_workers()

    pg = psycopg.connect(test_data.postgres_url, autocommit=True)
    queue_redis = redis.Redis.from_url(idle_queue.env["DATAPORT_REDIS_URL"])
    try:
        pg.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} {COLUMNS}")
        pg.execute("BEGIN")
        pg.execute(f"LOCK TABLE {TABLE} IN EXCLUSIVE MODE")  # the worker's receipt waits on it

        task = api.start_import(dataset, big_csv(BASE, ROWS))
        worker = idle_queue.start_worker()

        def waiting_on_the_receipt() -> bool:
            with psycopg.connect(test_data.postgres_url, autocommit=True) as probe:
                return (
                    probe.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                        (f"%{TABLE}%",),
                    ).fetchone()
                    is not None
                )

        _wait_for(waiting_on_the_receipt, "the worker never reached its receipt")
        queue_redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            pg.execute("ROLLBACK")  # the lock goes: the worker inserts its receipt and commits

            def committed() -> bool:
                with psycopg.connect(test_data.postgres_url, autocommit=True) as probe:
                    return (
                        probe.execute(f"SELECT 1 FROM {TABLE} WHERE task_id = %s", (task["id"],)).fetchone() is not None
                    )

            _wait_for(committed, "the import never committed")
            idle_queue.kill(worker)  # between its COMMIT and its first Redis write after it
        finally:
            queue_redis.execute_command("CLIENT", "UNPAUSE")
    finally:
        pg.close()
        queue_redis.close()

    target = Target(test_data, "postgres")
    assert target.ids([BASE, BASE + ROWS - 1]) == [BASE, BASE + ROWS - 1]  # the rows are in
    assert api.import_task(task["id"])["status"] == "PROCESSING"  # and the task does not know it yet

    idle_queue.start_worker()
    done = api.wait_import(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 2, done
    assert done["rowsImported"] == ROWS and done["rowsFailed"] == 0
    assert any("committed by an earlier attempt" in (e["message"] or "") for e in done["events"]), done["events"]
    assert target.ids([BASE, BASE + ROWS - 1, BASE + ROWS]) == [BASE, BASE + ROWS - 1]  # written once

    # The dataset was marked written: the same export is run again, not the stale one reused.
    again = api.export(**request)
    assert again["id"] == before["id"] and again["run"] == before["run"] + 1, again
    assert api.wait(again["id"])["rowCount"] == 5
