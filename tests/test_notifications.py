"""Notifications: the owner's email and the signed webhook when an export or import ends.

End to end against ``notify_stack`` (tests/fixtures/notify.py): ``dataport api`` and ``dataport
worker`` processes sending to a real SMTP server (aiosmtpd, in this process) and a real HTTP
receiver. The once-only rules of the notification job are also driven in-process, against the same
Redis and SMTP server, where a test can play a crashed or refused try.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import html
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from arq import Retry

from dataport.settings import Settings
from sources.registry import DatasetConfigError, load_registry
from tasks.ids import random_task_id
from tasks.models import Task, TaskKind, TaskStatus, stamp
from tasks.notifications import delivery_key, notify_job_id, task_finished
from tasks.services import Services
from tests.fixtures.notify import MAIL_FROM, WEBHOOK_SECRET, Hook, NotifyData, NotifyStack, SmtpServer
from tests.fixtures.stack import SPECIAL_COLUMNS, first_attempt_fails_on_a_lock
from workers.attempts import claim
from workers.notify import notify_task, sign

pytestmark = pytest.mark.timeout(180)


def verified(hook: Hook, secret: str = WEBHOOK_SECRET) -> dict[str, Any]:
    """The payload, after checking the signature as a receiver would (README, "Notifications")."""
    timestamp = hook.headers["x-dataport-timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + hook.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(hook.headers["x-dataport-signature"], expected)
    assert abs(time.time() - int(timestamp)) < 300, "a receiver refuses old timestamps (replays)"
    return hook.json


def link_in(text: str, part: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("http") and part in line)


def csv_rows(rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([c.name for c in SPECIAL_COLUMNS])
    writer.writerows(rows)
    return out.getvalue().encode()


# -- exports, end to end ------------------------------------------------------------------------------


def test_an_export_with_notify_emails_its_owner_once_with_a_link_that_downloads_the_file(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task, content = api.run_export(dataset="special", format="CSV", notify=True)
    result = notify_stack.job_result(task["id"])
    assert result.success and result.result == "email: sent; webhook: delivered", result.result

    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your export of special is ready"
    assert mail.message["To"] == address and mail.message["From"] == MAIL_FROM
    assert mail.message["Auto-Submitted"] == "auto-generated"
    assert mail.message["Message-ID"].strip().startswith(f"<dataport.export.{task['id']}.1.")
    assert f"is ready: 7 rows, CSV, {task['fileSize']:,} bytes." in mail.text
    link = link_in(mail.text, f"/files/{task['id']}")
    assert html.escape(link) in mail.html
    downloaded = api.download(link)
    assert downloaded.status_code == 200 and downloaded.content == content


def test_a_failed_export_emails_the_reason_once(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task = api.export(dataset="broken", format="CSV", notify=True)
    done = api.wait(task["id"])
    assert done["status"] == "FAILED" and done["error"]["code"] == "SOURCE_ERROR", done
    assert notify_stack.job_result(task["id"]).result == "email: sent; webhook: delivered"

    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your export of broken failed"
    assert f"failed: {done['error']['message']} (SOURCE_ERROR)" in mail.text and "Row 3001" in mail.text
    assert "/files/" not in mail.text
    [hook] = notify_stack.receiver.for_task(task["id"])
    payload = verified(hook)
    assert (payload["event"], payload["status"], payload["downloadUrl"]) == ("export.failed", "FAILED", None)
    assert payload["error"] == {"code": "SOURCE_ERROR", "message": done["error"]["message"]}


def test_without_notify_no_email_is_sent_but_the_webhook_is(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task, _ = api.run_export(dataset="special", format="CSV")
    assert notify_stack.job_result(task["id"]).result == "webhook: delivered"  # the job ran, and sent no mail
    assert notify_stack.mail.to(address) == []


def test_a_dataset_with_notify_emails_without_the_flag(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task, content = api.run_export(dataset="special_notify", format="NDJSON")
    assert notify_stack.job_result(task["id"]).result == "email: sent; webhook: delivered"
    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your export of special_notify is ready"
    assert api.download(link_in(mail.text, "/files/")).content == content


def test_an_owner_without_an_email_address_gets_none(notify_stack: NotifyStack):
    api, user, _ = notify_stack.user(with_email=False)
    task, _ = api.run_export(dataset="special", format="CSV", notify=True)
    result = notify_stack.job_result(task["id"])
    assert result.result == "email: skipped: the owner has no email address; webhook: delivered"
    assert not [m for m in notify_stack.mail.mails if any(user in r for r in m.rcpt_tos)]


def test_an_export_retried_after_a_transient_failure_emails_once(notify_stack: NotifyStack):
    stack = notify_stack.stack
    stack.stop_workers()
    try:
        api, _, address = notify_stack.user()
        task = api.export(dataset="lockable", format="CSV", notify=True)  # counted before the lock is taken
        first_attempt_fails_on_a_lock(api, task["id"], notify_stack.data.lockable_db, stack.start_worker)
        done = api.wait(task["id"])
    finally:
        if not stack.workers:
            stack.start_worker()
    assert done["status"] == "SUCCEEDED" and done["attempts"] >= 2 and done["rowCount"] == 2_000, done
    assert notify_stack.job_result(task["id"]).result == "email: sent; webhook: delivered"
    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your export of lockable is ready" and "2,000 rows" in mail.text
    assert len(notify_stack.receiver.for_task(task["id"])) == 1


# -- webhooks -----------------------------------------------------------------------------------------


def test_the_webhook_is_signed_and_tried_again_until_delivered_once(notify_stack: NotifyStack):
    api, user, address = notify_stack.user()
    notify_stack.receiver.script(user, 500, 500)  # then 200
    task, content = api.run_export(dataset="special", format="JSON", notify=True)
    result = notify_stack.job_result(task["id"])
    # The last try found the email sent by the first: the two channels are tracked apart.
    assert result.result == "email: sent before; webhook: delivered" and result.job_try == 3, result

    hooks = notify_stack.receiver.for_task(task["id"])
    assert [h.status for h in hooks] == [500, 500, 200]
    assert [h.headers["x-dataport-attempt"] for h in hooks] == ["1", "2", "3"]
    assert {h.headers["x-dataport-delivery"] for h in hooks} == {f"{task['id']}:1"}
    payloads = [verified(h) for h in hooks]
    payload = payloads[-1]
    assert {k: payload[k] for k in ("event", "id", "kind", "status", "owner", "dataset", "format", "run")} == {
        "event": "export.succeeded",
        "id": task["id"],
        "kind": "export",
        "status": "SUCCEEDED",
        "owner": user,
        "dataset": "special",
        "format": "JSON",
        "run": 1,
    }
    assert (payload["rowCount"], payload["fileSize"], payload["checksumSha256"]) == (
        7,
        task["fileSize"],
        task["checksumSha256"],
    )
    assert payload["finishedAt"] and payload["error"] is None
    assert api.download(payload["downloadUrl"]).content == content
    assert hooks[-1].headers["x-dataport-event"] == "export.succeeded"

    # The signature covers the timestamp and every byte of the body.
    last = hooks[-1]
    assert sign(WEBHOOK_SECRET, last.headers["x-dataport-timestamp"], last.body) == last.headers["x-dataport-signature"]
    assert (
        sign(WEBHOOK_SECRET, str(int(last.headers["x-dataport-timestamp"]) + 1), last.body)
        != (last.headers["x-dataport-signature"])
    )
    assert (
        sign(WEBHOOK_SECRET, last.headers["x-dataport-timestamp"], last.body + b" ")
        != (last.headers["x-dataport-signature"])
    )
    assert (
        sign("another secret", last.headers["x-dataport-timestamp"], last.body)
        != (last.headers["x-dataport-signature"])
    )

    # Three tries of the job, one email: the webhook's retries did not send it again.
    assert len(notify_stack.mail.to(address)) == 1


def test_a_webhook_refused_with_a_4xx_is_not_tried_again(notify_stack: NotifyStack):
    api, user, _ = notify_stack.user()
    notify_stack.receiver.script(user, 410)
    task, _ = api.run_export(dataset="special", format="CSV")
    result = notify_stack.job_result(task["id"])
    assert result.result == "webhook: failed: HTTP 410" and result.job_try == 1
    assert [h.status for h in notify_stack.receiver.for_task(task["id"])] == [410]


def test_a_webhook_that_keeps_failing_is_given_up_after_the_last_try(notify_stack: NotifyStack):
    api, user, _ = notify_stack.user()
    notify_stack.receiver.script(user, 503, 429, 503, 503, 503)
    task, _ = api.run_export(dataset="special", format="CSV")
    result = notify_stack.job_result(task["id"])
    assert result.result == "webhook: failed after 4 tries: HTTP 503"  # DATAPORT_WEBHOOK_MAX_TRIES=4
    assert [h.status for h in notify_stack.receiver.for_task(task["id"])] == [503, 429, 503, 503]


# -- imports ------------------------------------------------------------------------------------------


def test_an_import_into_a_dataset_with_notify_emails_the_rows_imported(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    rows = [[i, f"row {i}", i / 4, i, "true", "2024-02-29", "2024-02-29T12:30:00Z", "note"] for i in range(1, 6)]
    rows[2][2] = "not a float"
    task = api.run_import("imp_notify", csv_rows(rows), file_name="rocks.csv")
    assert task["status"] == "SUCCEEDED" and (task["rowsImported"], task["rowsFailed"]) == (4, 1), task
    assert notify_stack.job_result(task["id"]).result == "email: sent; webhook: delivered"

    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your import into imp_notify is done"
    assert "Your import of rocks.csv into imp_notify is done: 4 rows imported, 1 row failed." in mail.text
    report = api.download(link_in(mail.text, f"/files/{task['id']}"))
    assert report.status_code == 200 and "score" in report.text
    [hook] = notify_stack.receiver.for_task(task["id"])
    payload = verified(hook)
    assert (payload["event"], payload["rowsImported"], payload["rowsFailed"]) == ("import.succeeded", 4, 1)
    assert payload["errorReportUrl"]


def test_an_import_asks_for_an_email_with_notify(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    rows = [[i, f"row {i}", 0.5, i, "false", "2024-02-29", "2024-02-29T12:30:00Z", ""] for i in (901, 902)]
    quiet = api.run_import("imp_quiet", csv_rows(rows[:1]), file_name="quiet.csv")
    assert notify_stack.job_result(quiet["id"]).result == "webhook: delivered"
    asked = api.run_import("imp_quiet", csv_rows(rows[1:]), file_name="asked.csv", notify=True)
    assert asked["status"] == "SUCCEEDED", asked
    assert notify_stack.job_result(asked["id"]).result == "email: sent; webhook: delivered"
    [mail] = notify_stack.mail.to(address)
    assert "asked.csv" in mail.text


def test_retry_export_keeps_the_request_for_an_email(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task = api.export(dataset="broken", format="CSV", notify=True)
    assert api.wait(task["id"])["status"] == "FAILED"
    notify_stack.job_result(task["id"])
    retried = api.mutate("retryExport", task["id"])["task"]
    assert retried["run"] == 2
    assert api.wait(task["id"])["status"] == "FAILED"
    deadline = time.monotonic() + 30
    while len(notify_stack.mail.to(address)) < 2:
        assert time.monotonic() < deadline, notify_stack.mail.to(address)
        time.sleep(0.1)
    assert [m.subject for m in notify_stack.mail.to(address)] == ["Your export of broken failed"] * 2


def test_a_failed_import_emails_the_reason(notify_stack: NotifyStack):
    api, _, address = notify_stack.user()
    task = api.run_import("imp_notify", b"id,colour\r\n1,blue\r\n", file_name="wrong.csv")
    assert task["status"] == "FAILED" and task["error"]["code"] == "INVALID_HEADER", task
    notify_stack.job_result(task["id"])
    [mail] = notify_stack.mail.to(address)
    assert mail.subject == "Your import into imp_notify failed"
    assert task["error"]["message"] in mail.text and "(INVALID_HEADER)" in mail.text


# -- the job's once-only rules, in-process --------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process(notify_data: NotifyData, redis_url: str, tmp_path, **overrides: Any) -> AsyncIterator[Services]:
    settings = Settings(
        redis_url=redis_url,
        datasets=notify_data.datasets_file,
        data_dir=tmp_path,
        jwt_secret="in-process",
        queue_name=f"dataport:queue:notify-unit:{uuid.uuid4().hex[:6]}",
        **overrides,
    )
    services = await Services.start(settings)
    try:
        yield services
    finally:
        await services.close()


async def failed_export(services: Services, email: str | None, dataset: str = "special", notify: bool = True) -> Task:
    """A finished (FAILED) export task in the store, as a worker would have left it."""
    identifier = random_task_id()
    await services.store.request(
        identifier,
        {
            "id": identifier,
            "kind": TaskKind.EXPORT.value,
            "owner": "in-process",
            "email": email,
            "dataset": dataset,
            "format": "CSV",
            "request": "{}",
            "notify": notify,
            "status": TaskStatus.PENDING.value,
            "created_at": stamp(),
            "attempts": 0,
            "processed_rows": 0,
            "bytes": 0,
        },
        reuse_seconds=-1,
    )
    await services.store.transition(identifier, TaskStatus.PROCESSING, "attempt 1", fields={"attempts": 1})
    await services.store.transition(
        identifier,
        TaskStatus.FAILED,
        "the table is gone",
        fields={"finished_at": stamp(), "error_code": "SOURCE_ERROR", "error_message": "Table 'special' is gone."},
    )
    task = await services.store.get(identifier)
    assert task is not None
    return task


def job(services: Services, task: Task, attempt: int) -> dict[str, Any]:
    return {"services": services, "job_try": attempt, "job_id": notify_job_id(task.id, task.run)}


def smtp(server: SmtpServer) -> dict[str, Any]:
    return {"smtp_host": server.host, "smtp_port": server.port, "mail_from": MAIL_FROM}


async def test_an_smtp_failure_is_tried_again_and_the_email_sent_once(notify_data, redis_url, tmp_path, smtp_server):
    address = f"retry-{uuid.uuid4().hex[:8]}@example.test"
    smtp_server.recorder.refuse(address, "451 4.3.0 Try again later")
    async with in_process(notify_data, redis_url, tmp_path, **smtp(smtp_server)) as services:
        task = await failed_export(services, address)
        with pytest.raises(Retry):
            await notify_task(job(services, task, 1), task.id, task.run)
        assert smtp_server.recorder.to(address) == []
        assert await notify_task(job(services, task, 2), task.id, task.run) == "email: sent"
        assert await notify_task(job(services, task, 3), task.id, task.run) == "email: sent before"
    [mail] = smtp_server.recorder.to(address)
    assert mail.subject == "Your export of special failed" and "Table 'special' is gone. (SOURCE_ERROR)" in mail.text


async def test_a_permanent_smtp_refusal_is_not_tried_again(notify_data, redis_url, tmp_path, smtp_server):
    address = f"refused-{uuid.uuid4().hex[:8]}@example.test"
    smtp_server.recorder.refuse(address, "550 5.1.1 No such mailbox")
    async with in_process(notify_data, redis_url, tmp_path, **smtp(smtp_server)) as services:
        task = await failed_export(services, address)
        outcome = await notify_task(job(services, task, 1), task.id, task.run)
        assert outcome.startswith("email: failed: SMTPDataError") and "No such mailbox" in outcome
        assert await notify_task(job(services, task, 2), task.id, task.run) == "email: failed before"
    assert smtp_server.recorder.to(address) == []


async def test_a_claim_left_by_a_dead_worker_holds_the_email_until_it_lapses(
    notify_data, redis_url, tmp_path, smtp_server
):
    address = f"claimed-{uuid.uuid4().hex[:8]}@example.test"
    async with in_process(notify_data, redis_url, tmp_path, **smtp(smtp_server)) as services:
        task = await failed_export(services, address)
        await services.redis.set(delivery_key(task, "email"), "sending:a-try-that-died", ex=1)
        with pytest.raises(Retry) as later:
            await notify_task(job(services, task, 1), task.id, task.run)
        assert 0 < later.value.defer_score <= 1000
        assert smtp_server.recorder.to(address) == []
        await asyncio.sleep(1.1)
        assert await notify_task(job(services, task, 2), task.id, task.run) == "email: sent"
    assert len(smtp_server.recorder.to(address)) == 1


async def test_dev_mode_logs_the_mail_instead_of_sending_it(notify_data, redis_url, tmp_path, smtp_server, caplog):
    address = f"dev-{uuid.uuid4().hex[:8]}@example.test"
    caplog.set_level(logging.INFO, logger="dataport.notify")
    async with in_process(notify_data, redis_url, tmp_path) as services:  # DATAPORT_SMTP_HOST empty
        task = await failed_export(services, address)
        assert await notify_task(job(services, task, 1), task.id, task.run) == "email: sent"
        assert await notify_task(job(services, task, 2), task.id, task.run) == "email: sent before"
    logged = [r.getMessage() for r in caplog.records if r.name == "dataport.notify" and address in r.getMessage()]
    assert len(logged) == 1
    assert "Subject: Your export of special failed" in logged[0] and "Table 'special' is gone." in logged[0]
    assert smtp_server.recorder.to(address) == []


async def test_task_finished_queues_one_job_and_only_when_someone_is_to_be_told(notify_data, redis_url, tmp_path):
    async with in_process(notify_data, redis_url, tmp_path) as services:
        queue = services.settings.queue_name
        quiet = await failed_export(services, "a@example.test", notify=False)
        await task_finished(services, quiet)
        assert await services.arq.zcard(queue) == 0

        asked = await failed_export(services, "a@example.test", notify=True)
        required = await failed_export(services, "a@example.test", dataset="special_notify", notify=False)
        for task in (asked, asked, required, required):  # twice each: arq refuses the second
            await task_finished(services, task)
        queued = sorted(m.decode() for m in await services.arq.zrange(queue, 0, -1))
        assert queued == sorted([notify_job_id(asked.id, 1), notify_job_id(required.id, 1)])
        await services.arq.delete(queue, *(f"arq:job:{j}" for j in queued))


async def test_a_job_delivered_again_after_its_run_ended_queues_the_notification(notify_data, redis_url, tmp_path):
    """A worker that died between the final transition and queueing the notification: arq runs its
    job again, the claim finds the run over, and queues the notification instead."""
    async with in_process(notify_data, redis_url, tmp_path) as services:
        queue = services.settings.queue_name
        task = await failed_export(services, "a@example.test", notify=True)
        assert await claim(services, task.id, task.run, 2, "export") is None
        assert [m.decode() for m in await services.arq.zrange(queue, 0, -1)] == [notify_job_id(task.id, 1)]
        await services.arq.delete(queue, f"arq:job:{notify_job_id(task.id, 1)}")


async def test_with_a_webhook_every_finished_task_queues_the_job(notify_data, redis_url, tmp_path):
    async with in_process(notify_data, redis_url, tmp_path, webhook_url="http://127.0.0.1:9/hooks") as services:
        queue = services.settings.queue_name
        task = await failed_export(services, None, notify=False)
        await task_finished(services, task)
        assert [m.decode() for m in await services.arq.zrange(queue, 0, -1)] == [notify_job_id(task.id, 1)]
        await services.arq.delete(queue, f"arq:job:{notify_job_id(task.id, 1)}")


# -- the datasets file ------------------------------------------------------------------------------------


def test_the_datasets_file_notify_key_is_a_boolean(tmp_path, notify_data):
    registry = load_registry(Settings(datasets=notify_data.datasets_file, data_dir=tmp_path))
    assert registry.get("special_notify").notify and not registry.get("special").notify
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[datasets.d]\nsource = "sqlite"\nurl = "{notify_data.special_db}"\ntable = "special"\nnotify = "yes"\n'
    )
    with pytest.raises(DatasetConfigError, match="dataset 'd', key 'notify': must be true or false"):
        load_registry(Settings(datasets=path, data_dir=tmp_path))


def test_the_payload_is_signed_over_timestamp_dot_body():
    body = orjson.dumps({"id": "x"})
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s3cret", "1700000000", body) == f"sha256={expected}"
