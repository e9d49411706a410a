"""The notification job: the owner's email and the webhook for one finished run of a task.

``tasks/notifications.py`` queues ``notify_task(task_id, run)`` once a task reaches SUCCEEDED or
FAILED. Each try of the job does whatever is still undone, per channel:

Email (when the request said ``notify: true`` or the dataset has ``notify = true``), recorded in
``delivery_key(task, "email")``:
  1. ``sent``/``failed``/``skipped`` there already: nothing to do (a retry for the webhook's sake);
  2. ``SET NX "sending:<token>" EX 120``: a claim on sending it; taken by another try that is still
     running, or that died mid-send, so this try waits for the claim to lapse and looks again;
  3. send (dev mode, ``DATAPORT_SMTP_HOST`` empty: log it at INFO instead);
  4. ``SET "sent"``. An SMTP error releases the claim (only this try's token) so the next try
     sends; a permanent one (5xx, no STARTTLS) records ``failed``.
  The guarantee: exactly once when tries fail cleanly; at least once when a worker dies. A worker
  killed between the server accepting the message and step 4 (milliseconds) leaves the claim
  behind; it lapses and the rerun sends a second copy, with the same Message-ID so mail systems
  can recognise it. A worker killed before the server accepted it costs a delay, never the email.

Webhook (when ``DATAPORT_WEBHOOK_URL`` is set), recorded in ``delivery_key(task, "webhook")``:
  POST of the task as JSON, signed (``sign``), at least once: ``delivered`` after a 2xx; connection
  errors, timeouts, 5xx and 429 are tried again after ``webhook_backoff_seconds`` doubling each try
  (a longer ``Retry-After`` wins), up to ``webhook_max_tries``; other answers are final (``failed``).

The states live as long as the task is kept (``retention_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any, cast

import aiosmtplib
import httpx
import orjson
from arq import Retry

from dataport.logs import bind_job
from tasks import exports, imports
from tasks.access import Identity, Owner
from tasks.models import Task, TaskKind, TaskStatus
from tasks.notifications import NOTIFIED_STATUSES, delivery_key, email_requested
from tasks.services import Services

log = logging.getLogger("dataport.notify")

SMTP_TIMEOUT_SECONDS = 30.0
WEBHOOK_TIMEOUT_SECONDS = 10.0
# A try's claim on sending an email: longer than any one SMTP conversation (a few timeouts).
SENDING_CLAIM_SECONDS = 120
MAX_BACKOFF_SECONDS = 3600.0
SIGNATURE_HEADER = "X-Dataport-Signature"
TIMESTAMP_HEADER = "X-Dataport-Timestamp"

# Delete the claim only if it is still this try's (a lapsed claim may be another try's by now).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class Later:
    """A channel to try again after ``delay`` seconds."""

    delay: float
    reason: str


async def notify_task(ctx: dict[str, Any], task_id: str, run: int) -> str:
    bind_job("notify", task_id, run, ctx)  # logs carry the task id from here on
    services: Services = ctx["services"]
    attempt: int = ctx["job_try"]
    task = await services.store.get(task_id)
    if task is None or task.run != run or task.status not in NOTIFIED_STATUSES:
        log.info(
            "no notification for task %s run %s: it moved on (now %s)",
            task_id,
            run,
            f"{task.status.value}, run {task.run}" if task else "deleted",
        )
        return "nothing to do: the task moved on"

    outcomes: dict[str, str | Later] = {}
    if await email_requested(services, task):
        outcomes["email"] = await deliver_email(services, task, attempt)
    if services.settings.webhook_url:
        outcomes["webhook"] = await deliver_webhook(services, task, attempt)
    later = [o for o in outcomes.values() if isinstance(o, Later)]
    if later:
        raise Retry(defer=min(o.delay for o in later))
    return "; ".join(f"{channel}: {outcome}" for channel, outcome in outcomes.items()) or "nothing to send"


def backoff(services: Services, attempt: int) -> float:
    """The pause after try ``attempt`` failed: the base, doubled for every try before, capped."""
    # Annotated: an int power has no static type (a negative exponent makes a float).
    delay: float = min(services.settings.webhook_backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
    return delay


# -- email ----------------------------------------------------------------------------------------


async def deliver_email(services: Services, task: Task, attempt: int) -> str | Later:
    settings = services.settings
    redis = services.redis
    key = delivery_key(task, "email")
    keep = int(settings.retention_seconds)
    state = await redis.get(key)
    if state is not None and not state.startswith("sending"):
        return f"{state} before"
    if not task.email:
        log.info("no email about %s %s: its owner %s has no email address", task.kind.value, task.id, task.owner)
        await redis.set(key, "skipped", ex=keep)
        return "skipped: the owner has no email address"

    token = f"sending:{uuid.uuid4().hex}"
    if not await redis.set(key, token, nx=True, ex=SENDING_CLAIM_SECONDS):
        state = await redis.get(key)
        if state is not None and not state.startswith("sending"):
            return f"{state} before"
        # Another try holds the claim: it is sending right now, or it died mid-send (then the
        # server may or may not have the message). Look again once the claim has lapsed.
        if attempt >= settings.max_tries:
            log.error(
                "email about %s %s run %s: a previous try stopped while sending it; not sent again",
                task.kind.value,
                task.id,
                task.run,
            )
            return "unknown: a previous try stopped while sending it"
        return Later(max(1.0, float(await redis.ttl(key))), "another try is sending it")

    try:
        message = await compose(services, task)
        await send(services, message)
    except asyncio.CancelledError:
        raise  # the worker stops: the claim lapses and the rerun sends it
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        if _permanent(e) or attempt >= settings.max_tries:
            await redis.set(key, "failed", ex=keep)
            log.error(
                "email about %s %s run %s to %s failed for good: %s",
                task.kind.value,
                task.id,
                task.run,
                task.email,
                reason,
            )
            return f"failed: {reason}"
        # redis-py types asyncio commands as "Awaitable[T] | T"; this client's are always awaitable.
        await cast("Awaitable[object]", redis.eval(_RELEASE, 1, key, token))
        log.warning("email about %s %s run %s failed (try %s): %s", task.kind.value, task.id, task.run, attempt, reason)
        return Later(backoff(services, attempt), reason)
    await redis.set(key, "sent", ex=keep)
    return "sent"


def _permanent(error: Exception) -> bool:
    """Whether trying again cannot help: a 5xx answer, a missing feature, a message that cannot be built."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in error.recipients)
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return error.code >= 500
    return isinstance(error, aiosmtplib.SMTPNotSupported | ValueError | TypeError)


async def send(services: Services, message: EmailMessage) -> None:
    settings = services.settings
    if not settings.smtp_host:
        body = message.get_body(("plain",))
        assert body is not None  # compose() always sets a plain body
        log.info(
            "mail (not sent: DATAPORT_SMTP_HOST is empty)\nTo: %s\nSubject: %s\n\n%s",
            message["To"],
            message["Subject"],
            body.get_content(),
        )
        return
    await aiosmtplib.send(
        message,
        hostname=settings.smtp_host,
        port=settings.smtp_port,
        username=settings.smtp_username or None,
        password=settings.smtp_password or None,
        use_tls=settings.smtp_tls == "tls",
        start_tls=settings.smtp_tls == "starttls",
        timeout=SMTP_TIMEOUT_SECONDS,
    )


@dataclass(frozen=True)
class Link:
    url: str


async def compose(services: Services, task: Task) -> EmailMessage:
    """The email about this run: plain text, and the same as HTML."""
    settings = services.settings
    subject, paragraphs = await _content(services, task)
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = task.email
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    domain = parseaddr(settings.mail_from)[1].rpartition("@")[2] or "localhost"
    # The same for every try of this run, so that a second copy (worker died mid-send) is recognisable.
    run = f"{task.kind.value}.{task.id}.{task.run}.{int(task.created_at.timestamp())}"
    message["Message-ID"] = f"<dataport.{run}@{domain}>"
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies, please
    message.set_content("\n\n".join(p.url if isinstance(p, Link) else p for p in paragraphs) + "\n")
    message.add_alternative(
        "<!doctype html><html><body>"
        + "".join(
            f'<p><a href="{html.escape(p.url)}">{html.escape(p.url)}</a></p>'
            if isinstance(p, Link)
            else "<p>" + html.escape(p).replace("\n", "<br>") + "</p>"
            for p in paragraphs
        )
        + "</body></html>\n",
        subtype="html",
    )
    return message


def _owner(task: Task) -> Identity:
    """Whom an email's or a webhook's links are issued to: the task's owner."""
    return Identity(Owner(task.owner, task.email))


async def _content(services: Services, task: Task) -> tuple[str, list[str | Link]]:
    settings = services.settings
    minutes = max(1, round(settings.download_url_ttl_seconds / 60))
    kept = f" The file is kept until {task.expires_at:%Y-%m-%d %H:%M} UTC." if task.expires_at else ""
    fresh = f"After that, open Dataport for a fresh link: {settings.public_url.rstrip('/')}/"
    footer = f"Dataport {task.kind.value} {task.id}, run {task.run}."
    name = task.dataset
    if task.kind is TaskKind.EXPORT:
        if task.status is TaskStatus.SUCCEEDED:
            url = await exports.signed_download_url(services, task, _owner(task))
            summary = (
                f"Your export of {name} is ready: {_rows(task.row_count or 0)}, {task.format}, "
                f"{_size(task.file_size or 0)}."
            )
            body: list[str | Link] = [summary]
            if url:
                body += [f"Download it here (the link works for {minutes} minutes):", Link(url), fresh + kept]
            return f"Your export of {name} is ready", [*body, footer]
        return f"Your export of {name} failed", [
            f"Your export of {name} failed: {_reason(task)}",
            f"You can retry it in Dataport: {settings.public_url.rstrip('/')}/",
            footer,
        ]

    file_name = task.request.get("fileName") or "the file"
    dry_run = bool(task.request.get("dryRun"))
    report = await imports.signed_report_url(services, task, _owner(task))
    report_part: list[str | Link] = (
        [f"The error report lists the failed rows (the link works for {minutes} minutes):", Link(report)]
        if report
        else []
    )
    if task.status is TaskStatus.SUCCEEDED:
        if dry_run:
            counts = (
                f"Dry run of {file_name} into {name}: {_rows(task.rows_imported)} valid, "
                f"{_rows(task.rows_failed)} failed. Nothing was written."
            )
        else:
            counts = (
                f"Your import of {file_name} into {name} is done: {_rows(task.rows_imported)} imported, "
                f"{_rows(task.rows_failed)} failed."
            )
        return f"Your import into {name} is done", [counts, *report_part, footer]
    return f"Your import into {name} failed", [
        f"Your import of {file_name} into {name} failed: {_reason(task)}",
        f"Rows imported: {task.rows_imported:,}; rows failed: {task.rows_failed:,}.",
        *report_part,
        footer,
    ]


def _reason(task: Task) -> str:
    message = task.error_message or "no reason was recorded."
    return f"{message} ({task.error_code})" if task.error_code else message


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# -- webhook --------------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256, keyed with the secret, of ``{timestamp}.{body}``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


async def webhook_payload(services: Services, task: Task) -> dict[str, Any]:
    """The task as the webhook receives it (names as in the GraphQL API)."""
    payload: dict[str, Any] = {
        "event": f"{task.kind.value}.{task.status.value.lower()}",
        "id": task.id,
        "kind": task.kind.value,
        "status": task.status.value,
        "owner": task.owner,
        "dataset": task.dataset,
        "format": task.format,
        "run": task.run,
        "attempts": task.attempts,
        "createdAt": task.created_at.isoformat(),
        "finishedAt": task.finished_at.isoformat() if task.finished_at else None,
        "error": {"code": task.error_code, "message": task.error_message} if task.error_code else None,
    }
    if task.kind is TaskKind.EXPORT:
        payload.update(
            rowCount=task.row_count,
            fileSize=task.file_size,
            checksumSha256=task.checksum_sha256,
            downloadUrl=await exports.signed_download_url(services, task, _owner(task)),
        )
    else:
        payload.update(
            rowsImported=task.rows_imported,
            rowsFailed=task.rows_failed,
            dryRun=bool(task.request.get("dryRun")),
            errorReportUrl=await imports.signed_report_url(services, task, _owner(task)),
        )
    return payload


async def deliver_webhook(services: Services, task: Task, attempt: int) -> str | Later:
    settings = services.settings
    key = delivery_key(task, "webhook")
    state = await services.redis.get(key)
    if state is not None:
        return f"{state} before"
    payload = await webhook_payload(services, task)
    body = orjson.dumps(payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "dataport-webhook",
        "X-Dataport-Event": payload["event"],
        "X-Dataport-Delivery": f"{task.id}:{task.run}",  # the same on every try: receivers dedupe on it
        "X-Dataport-Attempt": str(attempt),
        TIMESTAMP_HEADER: timestamp,
    }
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(settings.webhook_secret, timestamp, body)
    retry_after = 0.0
    try:
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_SECONDS, follow_redirects=False) as client:
            response = await client.post(settings.webhook_url, content=body, headers=headers)
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
    else:
        if response.is_success:
            await services.redis.set(key, "delivered", ex=int(settings.retention_seconds))
            return "delivered"
        reason = f"HTTP {response.status_code}"
        if response.status_code != 429 and response.status_code < 500:
            await services.redis.set(key, "failed", ex=int(settings.retention_seconds))
            log.error("webhook for %s %s run %s refused: %s", task.kind.value, task.id, task.run, reason)
            return f"failed: {reason}"
        with contextlib.suppress(ValueError):
            retry_after = float(response.headers.get("Retry-After", "0"))
    if attempt >= settings.webhook_max_tries:
        await services.redis.set(key, "failed", ex=int(settings.retention_seconds))
        log.error(
            "webhook for %s %s run %s gave up after %s tries: %s", task.kind.value, task.id, task.run, attempt, reason
        )
        return f"failed after {attempt} tries: {reason}"
    log.warning("webhook for %s %s run %s failed (try %s): %s", task.kind.value, task.id, task.run, attempt, reason)
    return Later(min(max(backoff(services, attempt), retry_after), MAX_BACKOFF_SECONDS), reason)
