"""Redis goes away and comes back while exports run: the workers stay, the tasks finish.

The stack here has a Redis of its own (append-only file, as in production and in ``dataport dev``)
that the tests stop and start again on the same port, with real ``dataport api`` and ``dataport
worker`` processes that are never restarted.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator

import httpx
import pytest

from dataport.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import DEMO_ROWS, Stack, _stack


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("outage-redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory, own_redis, test_data) -> Iterator[Stack]:
    yield from _stack("outage", tmp_path_factory, own_redis.url, test_data, {"DATAPORT_STORAGE": "local"},
                      workers=2)


def _processing(api, task_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (task := api.task(task_id))["status"] == "PENDING":
        assert time.monotonic() < deadline, task
        time.sleep(0.02)


def _outage(server: EmbeddedRedis, seconds: float) -> None:
    server.stop()  # SIGTERM: the server writes its append-only file and exits
    time.sleep(seconds)
    server.start()


@pytest.mark.parametrize("seconds", [1.0, 8.0], ids=["blip", "longer-than-a-command-retry"])
def test_workers_ride_out_a_redis_outage_and_the_export_succeeds(outage_stack, own_redis, seconds):
    api = outage_stack.api()
    task = api.export(dataset="samples", format="CSV", columns=["sample_id", "site", "au_ppm", "notes"])
    _processing(api, task["id"])

    _outage(own_redis, seconds)

    done = api.wait(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED", done
    assert done["rowCount"] == DEMO_ROWS
    rows = list(csv.reader(io.StringIO(api.download(done["downloadUrl"]).text, newline="")))
    assert len(rows) == DEMO_ROWS + 1 and [int(r[0]) for r in rows[1:]] == list(range(1, DEMO_ROWS + 1))
    assert [w.poll() for w in outage_stack.workers] == [None, None], "a worker exited on the outage"

    # and they still take new work
    _, again = api.run_export(dataset="special", format="JSON", columns=["id", "name"])
    assert again.startswith(b"[")


def test_readyz_and_metrics_report_the_live_workers(outage_stack):
    body = httpx.get(f"{outage_stack.url}/readyz", timeout=30).json()
    assert body["checks"]["workers"] == "ok", body
    metrics = httpx.get(f"{outage_stack.url}/metrics", timeout=30).text
    assert "\ndataport_workers 2.0\n" in metrics
