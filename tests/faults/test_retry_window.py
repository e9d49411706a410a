"""Transient failures are retried with growing pauses over a window, not three quick tries.

A store that stays unavailable for longer than three quick tries (0.5 s + 1 s in the test stacks)
failed the task for good, although it came back seconds later. With a retry window the run keeps
trying, with exponential, jittered pauses, until the window has passed; then it gives up with a
message that says what failed and for how long.
"""

from __future__ import annotations

import sqlite3
import time

from tests.faults.test_graceful_shutdown import start_worker


def test_a_store_locked_longer_than_three_tries_is_waited_out(idle_queue, test_data):
    api = idle_queue.api()
    task = api.export(dataset="lockable", format="CSV")
    lock = sqlite3.connect(test_data.lockable_db, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        start_worker(idle_queue, grace=1, DATAPORT_RETRY_WINDOW_SECONDS="30")
        deadline = time.monotonic() + 60
        while sum("failed" in (e["message"] or "") for e in api.task(task["id"])["events"]) < 3:
            assert time.monotonic() < deadline, api.task(task["id"])
            time.sleep(0.05)
        assert api.task(task["id"])["status"] in ("PENDING", "PROCESSING"), "gave up within the window"
    finally:
        lock.rollback()
        lock.close()
    done = api.wait(task["id"], timeout=60)
    assert done["status"] == "SUCCEEDED" and done["attempts"] >= 4 and done["rowCount"] == 2_000, done
    pauses = [e["message"] for e in done["events"] if "retrying in" in (e["message"] or "")]
    assert len(pauses) >= 3 and all("locked" in p for p in pauses), pauses


def test_after_the_window_it_gives_up_and_says_what_failed(idle_queue, test_data):
    api = idle_queue.api()
    task = api.export(dataset="lockable", format="JSON")
    lock = sqlite3.connect(test_data.lockable_db, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    began = time.monotonic()
    try:
        start_worker(idle_queue, grace=1, DATAPORT_RETRY_WINDOW_SECONDS="4")
        done = api.wait(task["id"], "FAILED", "SUCCEEDED", timeout=60)
    finally:
        lock.rollback()
        lock.close()
    assert done["status"] == "FAILED" and done["error"]["code"] == "TRANSIENT_ERROR", done
    assert done["attempts"] >= 3 and time.monotonic() - began >= 4
    message = done["error"]["message"]
    assert message.startswith(f"Gave up after {done['attempts']} attempts over ") and "locked" in message, message
