"""S3 goes away in the middle of an export: back in seconds, or for good.

A SeaweedFS of its own is SIGKILLed while a worker streams an export into it as a multipart
upload. Brought back on the same ports and data, the export ends SUCCEEDED with the same bytes as
an undisturbed run; never brought back, the task ends FAILED once its retry window has passed,
saying that storage failed, and the upload it leaves open is swept away afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator

import psutil
import pytest

from storage.s3 import S3Storage
from tests.faults.test_graceful_shutdown import start_worker
from tests.fixtures.s3 import S3Server, start_server
from tests.fixtures.stack import Stack, _stack

WIDE = dict(dataset="samples", format="CSV")  # every column of the 100,000 demo rows: tens of MB


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory) -> Iterator[S3Server]:
    server = start_server(tmp_path_factory.mktemp("outage-s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_outage_stack(tmp_path_factory, own_s3, redis_url, test_data) -> Iterator[Stack]:
    env = {
        **own_s3.settings_env(own_s3.make_bucket("outage")),
        "DATAPORT_RETRY_WINDOW_SECONDS": "25",
        "DATAPORT_RETRY_MAX_DELAY_SECONDS": "4",
    }
    yield from _stack("s3outage", tmp_path_factory, redis_url, test_data, env, workers=1)


def _writing(api, task_id: str, past: int = 0) -> None:
    """Until the export has written more than ``past`` bytes."""
    deadline = time.monotonic() + 60
    while api.task(task_id)["progress"]["bytes"] <= past:
        assert time.monotonic() < deadline, api.task(task_id)
        time.sleep(0.01)


def _open_uploads(server: S3Server, bucket: str) -> list[dict]:
    return server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_s3_killed_mid_upload_and_back_within_the_window(s3_outage_stack, own_s3):
    api = s3_outage_stack.api()
    task = api.export(**WIDE)
    _writing(api, task["id"])
    own_s3.kill()
    time.sleep(2)
    own_s3.restart()

    done = api.wait(task["id"], timeout=180)
    assert done["status"] == "SUCCEEDED", done
    assert any("failed" in (e["message"] or "") for e in done["events"]), "the outage went unnoticed"
    other = s3_outage_stack.api()  # another owner: one undisturbed run
    reference = other.wait(other.export(**WIDE)["id"], timeout=180)
    assert done["checksumSha256"] == reference["checksumSha256"] and done["fileSize"] == reference["fileSize"]
    assert api.download(done["downloadUrl"]).content[:9] == b"sample_id"
    assert _open_uploads(own_s3, s3_outage_stack.env["DATAPORT_S3_BUCKET"]) == []


def test_a_worker_killed_mid_upload_leaves_no_upload_and_no_process(s3_outage_stack, own_s3):
    api = s3_outage_stack.api()
    task = api.export(**WIDE, columns=None, limit=95_000)
    _writing(api, task["id"], past=12 * 1024 * 1024)  # past the first 8 MiB part: the upload is open
    (worker,) = s3_outage_stack.workers
    family = psutil.Process(worker.pid).children(recursive=True)  # its fork server and helpers, if any
    s3_outage_stack.kill(worker)
    s3_outage_stack.workers.remove(worker)
    bucket = s3_outage_stack.env["DATAPORT_S3_BUCKET"]
    assert [u["Key"] for u in _open_uploads(own_s3, bucket)], "the killed attempt's upload was not open"

    s3_outage_stack.start_worker()
    done = api.wait(task["id"], timeout=180)
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 2, done
    other = s3_outage_stack.api()
    reference = other.wait(other.export(**WIDE, columns=None, limit=95_000)["id"], timeout=180)
    assert done["checksumSha256"] == reference["checksumSha256"]
    assert _open_uploads(own_s3, bucket) == []  # the next attempt discarded the killed one's parts
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], f"the killed worker left processes behind: {alive}"


def test_s3_gone_for_good_fails_after_the_window_and_leaves_nothing_once_swept(s3_outage_stack, own_s3):
    s3_outage_stack.stop_workers()  # a worker with a short window: the outcome is the same, sooner
    start_worker(s3_outage_stack, grace=1, DATAPORT_RETRY_WINDOW_SECONDS="6")
    api = s3_outage_stack.api()
    task = api.export(**WIDE, columns=None, limit=90_000)
    _writing(api, task["id"])
    own_s3.kill()
    try:
        done = api.wait(task["id"], "FAILED", "SUCCEEDED", timeout=180)
    finally:
        own_s3.restart()
    assert done["status"] == "FAILED" and done["error"]["code"] in ("TRANSIENT_ERROR", "STORAGE_ERROR"), done
    assert "Gave up after" in done["error"]["message"] and "S3" in done["error"]["message"], done["error"]
    retries = [e for e in done["events"] if "retrying in" in (e["message"] or "")]
    assert len(retries) >= 3

    bucket = s3_outage_stack.env["DATAPORT_S3_BUCKET"]
    storage = S3Storage.from_settings(s3_outage_stack.settings)
    asyncio.run(storage.sweep_incomplete(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)))
    assert _open_uploads(own_s3, bucket) == []
    listed = own_s3.client().list_objects_v2(Bucket=bucket, Prefix=f"exports/{done['id']}")
    assert listed.get("KeyCount", 0) == 0
