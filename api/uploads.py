"""How import files arrive: the local backend's signed upload, and S3 bucket notifications.

``PUT /uploads/{task_id}`` is the local backend's stand-in for a presigned S3 URL: the signature
is the authorisation (no bearer token, as with S3), the body streams to disk, and more bytes than
the limit, or than the import declared (``fileSize``), end the request with 413 without keeping any
of them. Only an import still waiting for its file takes one (else 409), checked again once the
body is whole, just before it is kept: an upload that outlasts the start of its import is refused,
not stored (and the import reads its sealed copy anyway, tasks/sealing.py).

``POST /storage-events`` takes the notifications S3-compatible stores send when an object is
created (AWS's ``Records`` JSON, as MinIO's webhook target and SNS deliver it) and starts the
import whose upload it was. Starting is idempotent, so a repeated notification is harmless.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import unquote_plus

import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from audit.outbox import client
from audit.records import ACCESS_DENIED, FILE_UPLOADED, Actor
from storage.base import UploadRefused, UploadTooLarge
from storage.signing import verify
from tasks import imports
from tasks.models import TaskKind, TaskStatus
from tasks.services import Services

log = logging.getLogger("dataport.api")

router = APIRouter()


@router.put("/uploads/{task_id}")
async def upload(request: Request, task_id: str, expires: int = Query(...), signature: str = Query(...)):
    services: Services = request.app.state.services
    settings = services.settings
    if services.storage.name != "local" or not verify(settings.signing_secret, "PUT", task_id, expires, signature):
        await services.audit.record(ACCESS_DENIED, task_id=task_id, reason="upload link invalid or expired")
        raise HTTPException(403, "This upload link is invalid or has expired; request the import again.")
    task = await services.store.get(task_id)
    if task is None or task.kind is not TaskKind.IMPORT or not task.object_key:
        raise HTTPException(404, "There is no such import.")
    if task.status is not TaskStatus.WAITING_FOR_UPLOAD:
        raise HTTPException(409, f"The import is {task.status.value}; it no longer takes a file.")
    limit, what = settings.max_upload_bytes, "the most that can be uploaded"
    declared_size = task.request.get("fileSize")
    if isinstance(declared_size, int) and declared_size < limit:
        limit, what = declared_size, "the size the import declared (fileSize)"
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and len(length) < 20 and int(length) > limit:
        raise HTTPException(413, f"The file is {int(length):,} bytes; at most {limit:,} bytes, {what}.")

    async def still_waiting() -> str | None:
        current = await services.store.get(task_id)
        if current is None or current.status is not TaskStatus.WAITING_FOR_UPLOAD:
            return f"The import is {current.status.value if current else 'gone'}; it no longer takes a file."
        return None

    try:
        stored = await services.storage.receive(task.object_key, request.stream(), max_bytes=limit, keep=still_waiting)
    except UploadTooLarge:
        raise HTTPException(413, f"The file is larger than {limit:,} bytes, {what}.") from None
    except UploadRefused as e:
        raise HTTPException(409, str(e)) from None
    # Upload links are issued to the import's owner alone (tasks/imports.upload_target).
    uploader = Actor(task.owner, (), *client())
    await services.audit.record(
        FILE_UPLOADED, actor=uploader, task_id=task.id, dataset=task.dataset, size=stored.size, sha256=stored.sha256
    )
    return {"size": stored.size, "sha256": stored.sha256}


@router.post("/storage-events")
async def storage_events(request: Request):
    services: Services = request.app.state.services
    secret = services.settings.storage_events_secret
    if not secret:
        raise HTTPException(404, "Storage events are not enabled (DATAPORT_STORAGE_EVENTS_SECRET).")
    if not _authorised(request, secret):
        raise HTTPException(401, "Storage events need the shared secret in the Authorization header.")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise HTTPException(400, "The body is not JSON; expected an S3 event notification.") from None
    keys = created_keys(body, services.settings.s3_bucket)
    started = []
    for key in keys:
        task = await imports.start_from_storage_event(services, key)
        if task is not None:
            started.append(task.id)
    log.info("storage event: %d objects, %d imports started or already running", len(keys), len(started))
    return JSONResponse({"objects": len(keys), "imports": started})


def _authorised(request: Request, secret: str) -> bool:
    """MinIO sends its ``auth_token`` as the Authorization header, with or without ``Bearer``."""
    given = request.headers.get("authorization", "")
    if given.lower().startswith("bearer "):
        given = given[7:]
    return hmac.compare_digest(given.strip().encode(), secret.encode())


def created_keys(body: Any, bucket: str) -> list[str]:
    """Object keys of the ObjectCreated records for ``bucket`` in an S3 notification; an SNS
    envelope is opened first. Keys arrive URL-encoded (spaces as ``+``), as S3 sends them."""
    if isinstance(body, dict) and isinstance(body.get("Message"), str):  # SNS wraps the S3 event
        try:
            body = orjson.loads(body["Message"])
        except orjson.JSONDecodeError:
            return []
    records = body.get("Records") if isinstance(body, dict) else None
    if not isinstance(records, list):
        raise HTTPException(400, "Expected an S3 event notification with a 'Records' list.")
    keys = []
    for record in records:
        if not isinstance(record, dict):
            continue
        # AWS names the event "ObjectCreated:Put", MinIO "s3:ObjectCreated:Put".
        if not str(record.get("eventName", "")).removeprefix("s3:").startswith("ObjectCreated"):
            continue
        s3 = record.get("s3") if isinstance(record.get("s3"), dict) else {}
        if (s3.get("bucket") or {}).get("name", bucket) != bucket:
            continue
        key = (s3.get("object") or {}).get("key")
        if isinstance(key, str) and key:
            keys.append(unquote_plus(key))
    return keys
