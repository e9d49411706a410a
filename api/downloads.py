"""``GET /files/{task_id}?expires=&signature=``: the one download route, for both backends.

The signature is the authorisation (HMAC over method, task id and expiry, ``storage/signing.py``),
as with a presigned S3 URL: no bearer token. A bad or expired signature is refused the same way
whether or not the task exists, so the route tells nothing about other owners' tasks.

What it serves, by how the file is stored:

- encrypted (``storage/encrypted.py``, either backend): decrypted on the fly, with single byte
  ranges (``Range: bytes=a-b``) decrypted from the chunk that holds their start. The end of the
  file and its first records are authenticated before the response starts, so a cut-off file,
  or one altered near its start, is refused with a 500 and no body; an altered record further in
  ends the response there, short of its ``Content-Length``, which clients report as a failed
  download (never as a complete one);
- in clear on local disk: the file, as before (Starlette's ``FileResponse``, ranges included);
- in clear on S3: a redirect (307) to a fresh presigned URL, valid for a minute.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from audit.records import ACCESS_DENIED
from storage.base import Storage, StorageError
from storage.disposition import content_disposition, media_type
from storage.encrypted import EncryptedStorage, MissingFile, Plaintext
from storage.local import LocalStorage
from storage.signing import verify
from tasks.imports import RESULTS_SUFFIX
from tasks.models import TaskKind, TaskStatus
from tasks.services import Services

log = logging.getLogger("dataport.api")

router = APIRouter()

CHUNK = 1024 * 1024
REDIRECT_SECONDS = 60
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@router.get("/files/{task_id}")
async def download(request: Request, task_id: str, expires: int = Query(...), signature: str = Query(...)) -> Response:
    """An export's file once it succeeded; an import's error report (or, as ``{id}.results``, its
    results file) once it finished."""
    services: Services = request.app.state.services
    if not verify(services.settings.signing_secret, "GET", task_id, expires, signature):
        await services.audit.record(ACCESS_DENIED, task_id=task_id, reason="download link invalid or expired")
        raise HTTPException(403, "This download link is invalid or has expired; ask for a new one.")
    # An import's results file is "{task_id}.results" (tasks/imports.py): signed as such above.
    task_id, results = task_id.removesuffix(RESULTS_SUFFIX), task_id.endswith(RESULTS_SUFFIX)
    task = await services.store.get(task_id)
    key = (task.report_key if task.kind is TaskKind.IMPORT else task.object_key) if task else None
    if results:
        key = task.results_key if task is not None and task.kind is TaskKind.IMPORT else None
    ready = task is not None and (
        task.status.is_final and task.status is not TaskStatus.EXPIRED
        if task.kind is TaskKind.IMPORT
        else task.status is TaskStatus.SUCCEEDED
    )
    if not ready or not key:
        raise HTTPException(404, "There is no such file.")
    await services.audit.downloaded(task_id, task.dataset if task else None, signature, key=key)  # docs/audit.md
    filename = key.rsplit("/", 1)[-1]
    storage = services.storage
    try:
        plain = await storage.open_plaintext(key) if isinstance(storage, EncryptedStorage) else None
        if plain is not None:
            return await _decrypted(request, plain, filename)
        return await _in_clear(storage.inner if isinstance(storage, EncryptedStorage) else storage, key, filename)
    except MissingFile:
        raise HTTPException(404, "There is no such file.") from None
    except StorageError as e:
        if e.transient:
            raise HTTPException(503, "The file cannot be read right now; try again shortly.") from None
        log.error("download of %s refused: %s", key, e)
        raise HTTPException(500, "The stored file failed its integrity check and cannot be served.") from None


async def _in_clear(storage: Storage, key: str, filename: str) -> Response:
    if isinstance(storage, LocalStorage):
        path = storage.path_for(key)
        if not path.exists():
            raise HTTPException(404, "There is no such file.")
        return FileResponse(
            path, filename=filename, content_disposition_type="attachment", media_type=media_type(filename)
        )
    presign = getattr(storage, "presigned_download_url", None)  # S3
    if presign is None or await storage.size_of(key) is None:
        raise HTTPException(404, "There is no such file.")
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=REDIRECT_SECONDS)
    return RedirectResponse(await presign(key, filename=filename, expires_at=expires_at), status_code=307)


def _byte_range(header: str | None, if_range: str | None, etag: str, size: int) -> tuple[int, int] | None:
    """The one range asked for, as (start, end exclusive); None for the whole file (no Range, a
    stale If-Range, or several ranges, which HTTP lets a server answer whole). 416 when it lies
    past the end."""
    if header is None or (if_range is not None and if_range != etag):
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise HTTPException(416, "The range lies outside the file.", headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def _decrypted(request: Request, plain: Plaintext, filename: str) -> Response:
    size = plain.size
    span = _byte_range(request.headers.get("range"), request.headers.get("if-range"), plain.etag, size)
    start, end = span or (0, size)
    await plain.check_end()
    stream = await plain.open(start)
    try:
        first = await asyncio.to_thread(stream.read, min(CHUNK, end - start))  # authenticated before we answer
    except BaseException:
        await asyncio.to_thread(stream.close)
        raise

    async def body() -> AsyncIterator[bytes]:
        left = end - start - len(first)
        try:
            yield first
            while left > 0:
                chunk = await asyncio.to_thread(stream.read, min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        except StorageError as e:
            log.error("download of %s stopped mid-way: %s", plain.key, e)
            raise
        finally:
            await asyncio.to_thread(stream.close)

    headers = {
        "Content-Length": str(end - start),
        "Content-Disposition": content_disposition(filename),
        "Accept-Ranges": "bytes",
        "ETag": plain.etag,
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(body(), status_code=206 if span else 200, headers=headers, media_type=media_type(filename))
