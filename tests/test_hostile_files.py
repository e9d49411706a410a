"""Hostile import files (issue 15): every one ends in a coded error, within a memory bound, and
never takes the worker down.

Parser level: each case of tests/hostile_corpus.py is read as the worker reads it, in a process of
its own under an address-space limit (RLIMIT_AS, 1 GiB): an unbounded parser must never run in the
test process. The exact outcome code, the reason, and the peak RSS are checked.

End to end (``local_stack``: ``dataport api`` and a real worker): a representative subset is
imported for real: the exact code, the dataset's table unchanged, the worker alive with the same
pid and able to run the next import, and no traceback in its log. A worker asked to restart on its
memory does so in place and goes on working.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from dataport.settings import Settings
from formats.limits import MAX_MESSAGE_CHARS
from formats.readers import reader_for
from storage.local import LocalStorage
from tests.fixtures.stack import Stack, TestData
from tests.hostile_corpus import ROW_ERRORS, cases
from workers.imports import ErrorReport

pytestmark = pytest.mark.timeout(900)

CASES = cases()
E2E = [case for case in CASES if case.e2e]
ADDRESS_SPACE_MIB = 1024
PEAK_RSS_MIB = 256  # the parser's process, with the file itself in memory (the worker's target: 400)


def test_the_corpus_is_large_and_covers_every_format():
    assert len(CASES) >= 30
    assert {case.format for case in CASES} == {"CSV", "JSON", "NDJSON", "XLSX"}
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_hostile_file_is_refused_with_its_code_within_bounds(case):
    done = subprocess.run(
        [sys.executable, "-m", "tests.hostile_corpus", case.name, "--limit-mib", str(ADDRESS_SPACE_MIB)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"the parser's process died ({done.returncode}): {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["kind"] == case.outcome, outcome
    said = outcome["message"] if case.outcome != ROW_ERRORS else " | ".join(outcome["reasons"])
    assert case.says in said, outcome
    assert outcome["peak_rss_mib"] < PEAK_RSS_MIB, outcome
    assert len(outcome["message"]) <= MAX_MESSAGE_CHARS + 100
    assert outcome["report_bytes"] <= Settings().import_max_report_bytes


# --- in process: only inputs that are small and safe -----------------------------------------------


def _reasons(fmt: str, data: bytes) -> list[str | None]:
    return [r.problem for r in reader_for(fmt, io.BytesIO(data), max_cell_bytes=1 << 20).records()]


def test_a_lone_surrogate_fails_its_row_alike_in_json_and_ndjson():
    json_reason = _reasons("JSON", b'[{"id": 1, "name": "\\ud800"}, {"id": 2, "name": "\\ud83d\\ude80"}]')
    ndjson_reason = _reasons("NDJSON", b'{"id": 1, "name": "\\ud800"}\n{"id": 2, "name": "\\ud83d\\ude80"}\n')
    assert json_reason[1] is None and ndjson_reason[1] is None  # a whole pair is a character (🚀)
    assert json_reason[0].removeprefix("element 1 ") == ndjson_reason[0].removeprefix("line 1 ")
    assert "lone surrogate" in json_reason[0]
    assert _reasons("JSON", b'[{"a": "\\udc00x"}]')[0].startswith("element 1 holds the escape \\udc00")


def test_numbers_keep_their_exact_values_on_the_careful_path():
    data = b'[{"a": -9223372036854775808, "b": 18446744073709551616, "c": 1.5e300, "d": 12345678901234567890.5}]'
    record = next(reader_for("JSON", io.BytesIO(data), max_cell_bytes=1 << 20).records())
    assert record.values == {"a": -(2**63), "b": 2**64, "c": 1.5e300, "d": 12345678901234567890.5}
    line = next(reader_for("NDJSON", io.BytesIO(data[1:-1] + b"\n"), max_cell_bytes=1 << 20).records())
    assert line.values == record.values


async def test_the_error_report_stops_at_its_byte_limit(tmp_path):
    storage = LocalStorage(tmp_path, "http://127.0.0.1:1", "secret")
    services = SimpleNamespace(storage=storage, settings=Settings(import_max_report_bytes=10_000))
    report = ErrorReport(services, "imports/u/t/report/rows-errors.csv")
    for i in range(100):
        await report.add([(i, "id", "not an integer " * 5, "x" * 200)] * 10)
    key = await report.complete()
    text = storage.path_for(key).read_text()
    assert 9_000 < len(text.encode()) < 10_300
    assert "965 more failure lines were left out" in text.splitlines()[-1]


# --- end to end ------------------------------------------------------------------------------------------


def _table_rows(test_data: TestData) -> int:
    with sqlite3.connect(test_data.imports_db) as conn:
        return conn.execute("SELECT count(*) FROM imp").fetchone()[0]


def _log(stack: Stack, name: str = "worker-0.log") -> str:
    return (stack.data_dir / name).read_text(errors="replace")


def test_max_errors_has_a_maximum(local_stack: Stack):
    limit = local_stack.settings.import_max_errors_limit
    api = local_stack.api()
    refused = api.request_import(dataset="imp_sqlite", fileName="a.csv", maxErrors=limit + 1)
    assert [(e["code"], e["field"]) for e in refused["userErrors"]] == [("INVALID_MAX_ERRORS", ["input", "maxErrors"])]
    assert f"{limit:,}" in refused["userErrors"][0]["message"]
    assert api.request_import(dataset="imp_sqlite", fileName="a.csv", maxErrors=limit)["userErrors"] == []


@pytest.mark.parametrize("case", E2E, ids=[case.name for case in E2E])
def test_hostile_files_end_to_end(local_stack: Stack, test_data: TestData, case):
    worker = psutil.Process(local_stack.workers[0].pid)
    started = worker.create_time()
    log_before = len(_log(local_stack))
    rows_before = _table_rows(test_data)
    api = local_stack.api()
    task = api.run_import(
        "imp_sqlite",
        case.content,
        file_format=case.format,
        file_name=case.file_name,
        maxErrors=case.max_errors,
        timeout=300,
    )
    if case.outcome == ROW_ERRORS:
        assert task["status"] == "SUCCEEDED" and task["rowsFailed"] >= 1 and task["rowsImported"] == 0, task
        report = api.download(task["errorReportUrl"]).text
        assert case.says in report, report[:2000]
    else:
        assert task["status"] == "FAILED", task
        assert task["error"]["code"] == case.outcome, task["error"]
        assert case.says in task["error"]["message"], task["error"]
        assert len(task["error"]["message"]) <= MAX_MESSAGE_CHARS + 100
        assert task["attempts"] == 1  # never retried into the next worker
        if task["errorReportUrl"]:
            response = api.download(task["errorReportUrl"])
            assert len(response.content) <= local_stack.settings.import_max_report_bytes + 1024
    assert _table_rows(test_data) == rows_before
    # The same worker process, alive, under the target, with nothing alarming in its log.
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    assert worker.create_time() == started and local_stack.workers[0].poll() is None
    assert worker.memory_info().rss < 400 * 1024 * 1024
    added = _log(local_stack)[log_before:]
    assert "Traceback" not in added and "crashed" not in added, added[-3000:]
    # ... and it runs the next import.
    follow = api.run_import("imp_sqlite", b"id,name\r\n", file_name="empty.csv")
    assert follow["status"] == "SUCCEEDED", follow


def test_a_worker_over_its_memory_bound_restarts_in_place_and_goes_on(queue_stack: Stack):
    """With a bound of one byte, every import leaves the worker over it: it finishes the job, then
    execs itself afresh (same pid), and takes the next one."""
    queue_stack.env["DATAPORT_WORKER_RESTART_RSS_BYTES"] = "1"
    try:
        process = queue_stack.start_worker()
    finally:
        del queue_stack.env["DATAPORT_WORKER_RESTART_RSS_BYTES"]
    log_name = f"worker-{len(queue_stack.workers) - 1}.log"
    try:
        api = queue_stack.api()
        for attempt in range(2):
            task = api.run_import("imp_sqlite", b"id,name\r\n", file_name="empty.csv", timeout=120)
            assert task["status"] == "SUCCEEDED", task
            deadline = time.monotonic() + 60
            while _log(queue_stack, log_name).count("worker restarting in the same process") <= attempt:
                assert time.monotonic() < deadline, _log(queue_stack, log_name)[-3000:]
                time.sleep(0.1)
            assert process.poll() is None  # the same process (exec keeps the pid)
        assert "Traceback" not in _log(queue_stack, log_name)
    finally:
        queue_stack.stop_workers()
