"""Operations: /readyz (Redis, storage, every dataset's source), /metrics from Redis, JSON logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from api.app import create_app
from api.readiness import reason, redact
from dataport.logs import JobContextFilter, JsonFormatter, TextFormatter, bind_job
from dataport.net import free_port
from dataport.settings import Settings
from sources.base import Column, Dataset
from sources.registry import Registry
from tasks.ids import task_id
from tasks.models import TaskKind, TaskStatus, stamp
from tasks.services import Services
from tasks.store import TaskStore, stats_tasks_key
from tests.task_fields import pending_task

# -- /metrics -------------------------------------------------------------------------------------


def scrape(stack) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    response = httpx.get(f"{stack.url}/metrics", timeout=30)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def test_metrics_list_every_series_even_before_any_task(local_stack):
    samples = scrape(local_stack)
    assert value(samples, "dataport_task_store_up") == 1
    assert value(samples, "dataport_stream_reads_in_progress") >= 0  # the process's own gauge stays
    for kind in ("export", "import"):
        for status in TaskStatus:
            assert value(samples, "dataport_tasks", kind=kind, status=status.value) >= 0
        for status in ("SUCCEEDED", "FAILED"):
            assert value(samples, "dataport_task_duration_seconds_count", kind=kind, status=status) >= 0
            assert value(samples, "dataport_task_duration_seconds_bucket", kind=kind, status=status, le="+Inf") >= 0
        assert value(samples, "dataport_rows_total", kind=kind) >= 0
        assert value(samples, "dataport_bytes_total", kind=kind) >= 0
    for function in ("export", "import", "notify", "cron"):
        assert value(samples, "dataport_queue_depth", function=function) >= 0
        assert value(samples, "dataport_jobs_in_progress", function=function) >= 0


def test_an_export_moves_the_counts_and_adds_its_rows_bytes_and_duration(local_stack):
    before = scrape(local_stack)
    api = local_stack.api()
    task, content = api.run_export(dataset="special", format="JSON", columns=["id", "name"])
    after = scrape(local_stack)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("dataport_tasks", kind="export", status="SUCCEEDED") >= 1
    assert grew("dataport_rows_total", kind="export") >= task["rowCount"] == 7
    assert grew("dataport_bytes_total", kind="export") >= task["fileSize"] == len(content)
    assert grew("dataport_task_duration_seconds_count", kind="export", status="SUCCEEDED") >= 1
    assert grew("dataport_task_duration_seconds_sum", kind="export", status="SUCCEEDED") > 0
    # Buckets are cumulative and end with the count.
    buckets = sorted(
        (
            (float(dict(labels)["le"]), v)
            for (name, labels), v in after.items()
            if name == "dataport_task_duration_seconds_bucket"
            and dict(labels)["kind"] == "export"
            and dict(labels)["status"] == "SUCCEEDED"
        )
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == value(after, "dataport_task_duration_seconds_count", kind="export", status="SUCCEEDED")

    # Deleting the task takes it out of the counts.
    assert api.mutate("deleteExport", task["id"])["userErrors"] == []
    deleted = scrape(local_stack)
    assert (
        value(deleted, "dataport_tasks", kind="export", status="SUCCEEDED")
        <= value(after, "dataport_tasks", kind="export", status="SUCCEEDED") - 1
    )


def test_an_import_adds_the_rows_it_wrote_and_a_dry_run_none(local_stack):
    api = local_stack.api()
    first = random.randrange(10**8, 10**9)
    content = f"id,name\n{first},metrics one\n{first + 1},metrics two\n".encode()
    before = scrape(local_stack)
    dry = api.run_import("imp_sqlite", content, dryRun=True)
    assert dry["status"] == "SUCCEEDED" and dry["rowsImported"] == 2
    middle = scrape(local_stack)
    done = api.run_import("imp_sqlite", content)
    assert done["status"] == "SUCCEEDED" and done["rowsImported"] == 2
    after = scrape(local_stack)

    assert value(middle, "dataport_rows_total", kind="import") == value(before, "dataport_rows_total", kind="import")
    assert value(after, "dataport_rows_total", kind="import") >= value(middle, "dataport_rows_total", kind="import") + 2
    assert value(after, "dataport_bytes_total", kind="import") >= (
        value(before, "dataport_bytes_total", kind="import") + 2 * len(content)
    )
    assert value(after, "dataport_task_duration_seconds_count", kind="import", status="SUCCEEDED") >= (
        value(before, "dataport_task_duration_seconds_count", kind="import", status="SUCCEEDED") + 2
    )


def test_queue_depth_and_jobs_in_progress_follow_a_job(idle_queue):
    api = idle_queue.api()
    empty = scrape(idle_queue)
    task = api.export(dataset="samples", format="CSV")
    waiting = scrape(idle_queue)
    assert value(waiting, "dataport_queue_depth", function="export") == (
        value(empty, "dataport_queue_depth", function="export") + 1
    )
    assert value(waiting, "dataport_jobs_in_progress", function="export") == 0
    assert value(waiting, "dataport_tasks", kind="export", status="PENDING") >= 1

    idle_queue.start_worker()
    deadline = time.monotonic() + 60
    while api.task(task["id"])["status"] != "PROCESSING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    running = scrape(idle_queue)
    assert value(running, "dataport_jobs_in_progress", function="export") >= 1
    assert (
        value(running, "dataport_queue_depth", function="export")
        <= value(waiting, "dataport_queue_depth", function="export") - 1
    )
    assert value(running, "dataport_tasks", kind="export", status="PROCESSING") >= 1

    api.mutate("cancelExport", task["id"])
    deadline = time.monotonic() + 30
    while value(scrape(idle_queue), "dataport_jobs_in_progress", function="export") > 0:
        assert time.monotonic() < deadline, "the cancelled job still counts as running"
        time.sleep(0.1)


# -- the statistics in the task store --------------------------------------------------------------


@pytest.fixture
async def store(redis_url) -> AsyncIterator[TaskStore]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield TaskStore(redis, retention_seconds=3600)
    await redis.aclose()


async def _new(store: TaskStore, kind: str = "export") -> str:
    owner = f"ops-{uuid.uuid4().hex[:8]}"
    tid = task_id(owner, kind, "samples", {"n": uuid.uuid4().hex})
    await store.request(tid, pending_task(tid, owner, kind), reuse_seconds=600)
    return tid


async def _statuses_of(store: TaskStore, tid: str, kind: TaskKind = TaskKind.EXPORT) -> list[str]:
    """The statistics sets that hold ``tid``: exactly one while the task exists, none after."""
    found = []
    for status in TaskStatus:
        if await store.redis.zscore(stats_tasks_key(kind, status), tid) is not None:
            found.append(status.value)
    return found


async def test_every_status_change_moves_the_task_between_the_counts(store):
    tid = await _new(store)
    assert await _statuses_of(store, tid) == ["PENDING"]
    await store.transition(tid, TaskStatus.PROCESSING, "go", fields={"attempts": 1, "started_at": stamp()})
    assert await _statuses_of(store, tid) == ["PROCESSING"]
    refused = await store.transition(tid, TaskStatus.EXPIRED, "not allowed from PROCESSING")
    assert not refused.ok and await _statuses_of(store, tid) == ["PROCESSING"]
    before = await store.read_stats()
    await store.transition(
        tid,
        TaskStatus.SUCCEEDED,
        "done",
        fence_attempt=1,
        fields={"finished_at": stamp(), "row_count": 12, "file_size": 3456},
    )
    after = await store.read_stats()
    assert await _statuses_of(store, tid) == ["SUCCEEDED"]
    assert after.rows[TaskKind.EXPORT] >= before.rows[TaskKind.EXPORT] + 12
    assert after.bytes[TaskKind.EXPORT] >= before.bytes[TaskKind.EXPORT] + 3456
    key = (TaskKind.EXPORT, TaskStatus.SUCCEEDED)
    assert after.durations[key].count >= before.durations[key].count + 1

    rerun = await store.request(tid, pending_task(tid, "x"), reuse_seconds=-1)
    assert rerun.outcome == "rerun" and await _statuses_of(store, tid) == ["PENDING"]
    await store.transition(tid, TaskStatus.CANCELLED, "stop", fields={"finished_at": stamp()})
    assert await _statuses_of(store, tid) == ["CANCELLED"]

    expired = await store.expired(await store.get(tid), "gone")
    assert expired.ok and await _statuses_of(store, tid) == ["EXPIRED"]
    # The task lapses with its retention; so does its place in the EXPIRED count, at the same moment.
    ttl = await store.redis.ttl(f"dataport:task:{tid}")
    lapses_at = await store.redis.zscore(stats_tasks_key(TaskKind.EXPORT, TaskStatus.EXPIRED), tid)
    assert 3590 <= ttl <= 3600 and abs(lapses_at - (time.time() + ttl)) < 5
    assert await store.redis.zscore("dataport:expiry", tid) is None

    await store.delete(await store.get(tid))
    assert await _statuses_of(store, tid) == []


async def test_a_lapsed_expired_task_stops_counting(store):
    tid = await _new(store)
    await store.transition(tid, TaskStatus.CANCELLED, "stop", fields={"finished_at": stamp()})
    short = TaskStore(store.redis, retention_seconds=1)
    await short.expired(await short.get(tid), "gone")
    key = (TaskKind.EXPORT, TaskStatus.EXPIRED)
    counted = (await store.read_stats()).tasks[key]
    await asyncio.sleep(2.2)
    assert await store.get(tid) is None  # Redis dropped the hash: nothing decremented anything
    assert (await store.read_stats()).tasks[key] <= counted - 1


async def test_the_index_puts_tasks_back_into_their_counts(store):
    """The back-fill for tasks written before the statistics existed, and a repair."""
    tid = await _new(store, "import")
    await store.redis.zrem(stats_tasks_key(TaskKind.IMPORT, TaskStatus.PENDING), tid)
    await store.redis.zadd(stats_tasks_key(TaskKind.IMPORT, TaskStatus.FAILED), {tid: "+inf"})  # a wrong one
    assert await store.index_stats() >= 1
    assert await _statuses_of(store, tid, TaskKind.IMPORT) == ["PENDING"]


async def test_a_failure_observes_its_duration(store):
    tid = await _new(store)
    started = time.time() - 42
    await store.transition(tid, TaskStatus.PROCESSING, "go", fields={"attempts": 1, "started_at": f"{started:.3f}"})
    key = (TaskKind.EXPORT, TaskStatus.FAILED)
    before = (await store.read_stats()).durations[key]
    await store.transition(tid, TaskStatus.FAILED, "broke", fields={"finished_at": stamp()})
    after = (await store.read_stats()).durations[key]
    assert after.count == before.count + 1 and after.sum - before.sum == pytest.approx(42, abs=1)
    grew = {le: n - dict(before.buckets)[le] for le, n in after.buckets}
    assert grew["30"] == 0 and grew["60"] == 1 and grew["+Inf"] == 1


# -- /readyz -------------------------------------------------------------------------------------


def test_readyz_checks_redis_storage_and_every_dataset(local_stack):
    response = httpx.get(f"{local_stack.url}/readyz", timeout=30)
    body = response.json()
    assert response.status_code == 200, body
    assert body["ready"] is True and body["checks"] == {"redis": "ok", "storage": "ok", "workers": "ok"}
    assert {"samples", "special", "special_pg", "special_docs", "special_os", "big_os"} <= set(body["datasets"])
    assert set(body["datasets"].values()) == {"ok"}


class SilentServer:
    """Accepts connections and never answers: a store that hangs."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = free_port()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        async def accept(_reader, writer):
            self.connections += 1
            self._writers.append(writer)

        self._server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_exc) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)


@pytest.fixture
async def app_with(redis_url, tmp_path):
    """An api in this process over the given datasets, its services started."""
    started: list[Services] = []

    async def make(datasets: dict[str, Dataset]):
        settings = Settings(
            redis_url=redis_url,
            data_dir=tmp_path,
            jwt_secret="ops",
            storage="local",
            queue_name=f"dataport:queue:ops:{uuid.uuid4().hex[:6]}",
        )
        registry = Registry(datasets, settings)
        app = create_app(settings, registry)
        app.state.services = await Services.start(settings, registry)
        started.append(app.state.services)
        return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")

    yield make
    for services in started:
        await services.close()


COLUMNS = (Column("id", "integer"),)


async def test_readyz_fails_per_dataset_without_leaking_a_password(app_with, test_data):
    closed = free_port()
    datasets = {
        "fine": Dataset("fine", "sqlite", str(test_data.special_db), "special", COLUMNS, key=("id",)),
        "pg_down": Dataset("pg_down", "postgres", f"postgresql://reader:pg-s3cret@127.0.0.1:{closed}/db", "t", COLUMNS),
        "os_down": Dataset("os_down", "opensearch", f"http://admin:os-s3cret@127.0.0.1:{closed}", "idx", COLUMNS),
        "no_table": Dataset("no_table", "sqlite", str(test_data.special_db), "missing", COLUMNS),
    }
    app, client = await app_with(datasets)
    async with client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["checks"]["redis"] == "ok" and body["checks"]["storage"] == "ok"
    assert body["checks"]["workers"].startswith("error: NoWorkers: no worker on queue")  # none in this process
    assert body["datasets"]["fine"] == "ok"
    for name in ("pg_down", "os_down", "no_table"):
        assert body["datasets"][name].startswith("error: ") and len(body["datasets"][name]) <= 207, body
    assert "s3cret" not in response.text


async def test_readyz_times_out_each_check_and_caches_the_answer(app_with, test_data):
    async with SilentServer() as silent:
        datasets = {
            "fine": Dataset("fine", "sqlite", str(test_data.special_db), "special", COLUMNS, key=("id",)),
            "hangs": Dataset("hangs", "postgres", f"postgresql://reader:pw@127.0.0.1:{silent.port}/db", "t", COLUMNS),
        }
        app, client = await app_with(datasets)
        app.state.readiness.timeout = 0.5
        app.state.readiness.cache_seconds = 1.5
        async with client:
            began = time.monotonic()
            storm = await asyncio.gather(*(client.get("/readyz") for _ in range(10)))
            took = time.monotonic() - began
            assert {r.status_code for r in storm} == {503} and took < 3
            body = storm[0].json()
            assert body["datasets"] == {"fine": "ok", "hangs": "error: no answer within 0.5 s"}
            assert silent.connections == 1, "a probe storm reached the store more than once"
            assert (await client.get("/readyz")).json() == body and silent.connections == 1  # cached
            await asyncio.sleep(1.6)
            await client.get("/readyz")
            assert silent.connections == 2  # checked again once the answer is stale


def test_reasons_are_short_and_masked():
    url = "postgresql://reader:hunter2@db.internal:5432/samples"
    error = RuntimeError(f"cannot connect to {url} (password=hunter2)\nsecond line with hunter2")
    text = reason(error, url)
    assert text.startswith("error: RuntimeError: cannot connect to postgresql://reader:***@db.internal:5432/")
    assert "hunter2" not in text and "second line" not in text
    assert redact("https://u:p%40ss@host/x and https://host/y") == "https://u:***@host/x and https://host/y"
    assert len(reason(ValueError("x" * 1000))) <= 207


# -- logs ---------------------------------------------------------------------------------------


def _json_lines(path) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(raw))
    return lines


def test_worker_and_api_log_json_lines_that_carry_the_task(local_stack):
    api = local_stack.api()
    task, _ = api.run_export(dataset="special", format="CSV", columns=["id"])
    deadline = time.monotonic() + 10
    while True:
        lines = _json_lines(local_stack.data_dir / "worker-0.log")
        mine = [line for line in lines if line.get("task_id") == task["id"]]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine, "no JSON line of the worker names the task"
    assert mine[0]["kind"] == "export" and mine[0]["attempt"] == 1 and mine[0]["run"] == 1
    assert {"time", "level", "logger", "message"} <= set(mine[0])
    [ready] = [line["message"] for line in lines if line["message"].startswith("worker ready")]
    assert ready.endswith("event loop uvloop")  # installed with uvicorn[standard]: the worker runs on it

    httpx.get(f"{local_stack.url}/healthz")
    deadline = time.monotonic() + 10
    while not [
        line
        for line in _json_lines(local_stack.data_dir / "api.log")
        if line["logger"] == "uvicorn.access" and line.get("path") == "/healthz"
    ]:
        assert time.monotonic() < deadline, "uvicorn's access lines are not JSON with their fields"
        time.sleep(0.2)
    # The download above used a signed link: its line keeps the path and masks the signature.
    lines = _json_lines(local_stack.data_dir / "api.log")
    [download] = [line for line in lines if str(line.get("path", "")).startswith(f"/files/{task['id']}?")]
    signature = task["downloadUrl"].split("signature=")[1]
    assert "signature=***" in download["path"] and "expires=" in download["path"]
    assert all(signature not in str(line) for line in lines)


def _record(message: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("dataport.test", logging.ERROR, __file__, 1, message, (), exc_info)


def test_the_json_formatter_keeps_a_traceback_inside_one_valid_line():
    try:
        raise ValueError("bad value\nover two lines")
    except ValueError:
        record = _record("it broke: %s", sys.exc_info())
    record.args = ('oh "no"\n',)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "dataport.test"
    assert entry["message"] == 'it broke: oh "no"\n'
    assert entry["exception_type"] == "ValueError"
    assert entry["exception"].startswith("Traceback") and "over two lines" in entry["exception"]
    assert entry["time"].endswith("Z")


async def test_the_job_context_reaches_records_of_its_task_only():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dataport.test.context")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:

        async def job(name: str) -> None:
            bind_job("export", name, 1, {"job_try": 2})
            await asyncio.sleep(0.01)
            await asyncio.create_task(asyncio.sleep(0))  # tasks it starts inherit the binding
            logger.info("working on %s", name)

        await asyncio.gather(job("task-a"), job("task-b"))
        logger.info("outside any job")
    finally:
        logger.removeHandler(handler)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_message = {e["message"]: e for e in entries}
    assert by_message["working on task-a"]["task_id"] == "task-a"
    assert by_message["working on task-b"]["task_id"] == "task-b"
    assert by_message["working on task-b"]["attempt"] == 2 and by_message["working on task-b"]["kind"] == "export"
    assert "task_id" not in by_message["outside any job"]


def test_the_text_format_names_the_task_after_the_line():
    record = _record("hello")
    record.task_id, record.kind, record.attempt = "abc", "import", 3
    assert TextFormatter().format(record).endswith("dataport.test hello [import abc attempt 3]")
