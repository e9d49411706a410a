"""Redis goes away and comes back while exports run: the workers stay, the tasks finish.

The stack here has a Redis of its own (append-only file, as in production and in ``dataport dev``)
that the tests stop and start again on the same port, with real ``dataport api`` and ``dataport
worker`` processes that are never restarted.
"""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from dataport.embedded_redis import EmbeddedRedis
from storage.signing import signed_path
from tests.client import Api
from tests.fixtures.stack import DEMO_ROWS, SECRET, Stack, _stack


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("outage-redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory, own_redis, test_data) -> Iterator[Stack]:
    yield from _stack("outage", tmp_path_factory, own_redis.url, test_data, {"DATAPORT_STORAGE": "local"}, workers=2)


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


def test_during_an_outage_clients_are_told_the_store_is_down_not_that_the_task_is_gone(outage_stack, own_redis):
    api = outage_stack.api()
    done = api.wait(api.export(dataset="special", format="CSV", columns=["id"])["id"])
    link = signed_path(SECRET, "GET", "/files", done["id"], int(time.time()) + 600)

    own_redis.stop()
    try:
        body = api.gql("query($id: ID!) { exportTask(id: $id) { id status } }", {"id": done["id"]})
        download = httpx.get(outage_stack.url + link, timeout=60)
    finally:
        own_redis.start()

    (error,) = body["errors"]
    assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE", "retryAfterSeconds": 5}, body
    assert "Internal error" not in error["message"]
    assert download.status_code == 503 and download.headers["retry-after"] == "5"
    assert download.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "Traceback" not in (outage_stack.data_dir / "api.log").read_text()
    # and once Redis is back, the same task reads as before
    assert api.task(done["id"])["status"] == "SUCCEEDED"


async def test_an_open_subscription_never_completes_before_a_final_status(outage_stack, own_redis):
    api = outage_stack.api()
    task = api.export(dataset="samples", format="CSV", columns=["sample_id", "site", "notes"])
    _processing(api, task["id"])
    watching = asyncio.ensure_future(api.subscribe(task["id"], within=120))
    await asyncio.sleep(0.5)
    own_redis.stop()
    await asyncio.sleep(7)  # past redis-py's retries
    own_redis.start()
    messages = await watching
    last = messages[-1]
    if last["type"] == "complete":  # it followed the task to its end
        assert messages[-2]["payload"]["data"]["exportProgress"]["status"] == "SUCCEEDED", messages[-3:]
    else:  # or it told the truth and stopped
        assert last["type"] == "error" or last["payload"].get("errors"), last
        errors = last["payload"] if last["type"] == "error" else last["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "SERVICE_UNAVAILABLE", last
    assert api.wait(task["id"], timeout=120)["status"] == "SUCCEEDED"


def test_the_cli_follows_an_export_through_an_outage(outage_stack, own_redis, tmp_path):
    out = tmp_path / "samples.csv"
    env = {**outage_stack.env, "DATAPORT_TOKEN": outage_stack.token("cli-outage")}
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataport.cli",
            "export",
            "samples",
            "--columns",
            "sample_id,site,notes",
            "--out",
            str(out),
            "--url",
            outage_stack.url,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = Api(outage_stack.url, env["DATAPORT_TOKEN"])
    deadline = time.monotonic() + 60
    while not (page := api.data("{ exportTasks(first: 1) { edges { node { id status } } } }")["exportTasks"]["edges"]):
        assert time.monotonic() < deadline and cli.poll() is None
        time.sleep(0.05)
    _processing(api, page[0]["node"]["id"])
    _outage(own_redis, 7)  # past redis-py's retries: the subscription is cut off
    output, _ = cli.communicate(timeout=180)
    assert cli.returncode == 0, output
    rows = list(csv.reader(io.StringIO(out.read_text(), newline="")))
    assert len(rows) == DEMO_ROWS + 1
