"""A PostgreSQL connection dropped under a running export: the attempt is retried, not failed.

psycopg reports some lost connections without an SQL state (``InternalError: received 2 results``
when a FETCH's answer is cut off); those were classed as permanent and failed the export for good.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from sources.base import Dataset, TransientSourceError
from sources.postgres import _translate

BIG_ROWS = 40_000  # tests/fixtures/stack.py


def test_a_lost_connection_without_an_sql_state_is_transient():
    dataset = Dataset("d", "postgres", "postgresql://x@127.0.0.1/db", "t", ())
    error = _translate(psycopg.InternalError("received 2 results from the server, expected 1"), dataset)
    assert isinstance(error, TransientSourceError), error


def _terminate_a_read(url: str, api, task_id: str) -> int:
    """Terminates every backend that is in the middle of the export's read (a cursor declared or
    fetched from, a COPY running) as soon as one is seen; the number terminated (0 when the export
    ended first). PostgreSQL is polled without pause; the task only every 0.2 s. A cursor's read of
    a few hundred milliseconds is always caught; a COPY of the same rows may take a few
    milliseconds, so the COPY test holds it with a lock instead."""
    deadline = time.monotonic() + 60
    asked = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND ((state = 'active' AND query LIKE 'COPY%') "
                # a cursor is open between its FETCHes; a COPY that is no longer active has ended
                "OR (state IN ('active', 'idle in transaction') "
                "AND (query LIKE 'FETCH%' OR query LIKE 'DECLARE%')))"
            ).fetchall()
            if killed:
                return len(killed)
            if time.monotonic() - asked > 0.2:
                asked = time.monotonic()
                if api.task(task_id)["status"] in ("SUCCEEDED", "FAILED"):
                    return 0
    return 0


@pytest.mark.parametrize("file_format", ["JSON", "NDJSON"])
def test_pg_terminate_backend_mid_read_ends_succeeded_with_every_row(local_stack, postgres_db, file_format):
    api = local_stack.api()
    task = api.export(dataset="big_pg", format=file_format, columns=["id", "x", "label"])
    terminated = _terminate_a_read(postgres_db, api, task["id"])
    assert terminated, "the export ended before its read could be cut off"

    done = api.wait(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED", done
    assert done["rowCount"] == BIG_ROWS and done["attempts"] >= 2, done
    assert any("failed" in (e["message"] or "") for e in done["events"]), done["events"]
    content = api.download(done["downloadUrl"]).content
    if file_format == "JSON":
        assert [r["id"] for r in json.loads(content)] == list(range(1, BIG_ROWS + 1))
    else:
        assert [json.loads(line)["id"] for line in content.splitlines()] == list(range(1, BIG_ROWS + 1))


def test_pg_terminate_backend_as_a_csv_read_starts_ends_succeeded_with_every_row(idle_queue, postgres_db, test_data):
    """The CSV path reads with one COPY, over in milliseconds, too short to catch from outside: the
    test holds the read with a lock on the table, taken before a worker starts, and terminates the
    backend while the read's first statement waits. (A COPY cut off mid-stream is tested at the
    source: tests/test_postgres.py, a split read's connection terminated between its chunks.)"""
    api = idle_queue.api()
    task = api.export(dataset="big_pg", format="CSV", columns=["id", "x", "label"])  # counted before the lock
    with (
        psycopg.connect(postgres_db, autocommit=True) as lock,
        psycopg.connect(postgres_db, autocommit=True) as watch,
    ):  # outside the lock's transaction,
        lock.execute("BEGIN")  # whose view of the activity is frozen
        lock.execute(f"LOCK TABLE {test_data.big_table} IN ACCESS EXCLUSIVE MODE")
        idle_queue.start_worker()
        deadline = time.monotonic() + 60
        while not watch.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        ).fetchall():
            assert time.monotonic() < deadline, "the worker's read never started"
            time.sleep(0.01)
        lock.execute("ROLLBACK")

    done = api.wait(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED" and done["rowCount"] == BIG_ROWS and done["attempts"] >= 2, (
        done["error"],
        done["events"],
    )
    assert any("failed" in (e["message"] or "") for e in done["events"]), done["events"]
    rows = api.download(done["downloadUrl"]).content.split(b"\r\n")
    assert rows[0] == b"id,x,label" and [int(r.split(b",")[0]) for r in rows[1:-1]] == list(range(1, BIG_ROWS + 1))
