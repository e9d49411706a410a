"""``GET /files/{task_id}?expires=&signature=``: the one download route, for both backends.

The signature is the authorisation (HMAC over method, task id and expiry, ``storage/signing.py``),
as with a presigned S3 URL: no bearer token. A bad or expired signature is refused the same way
whether or not the task exists, so the route tells nothing about other owners' tasks.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse

from dataport.services import Services
from storage.signing import verify
from tasks.models import TaskKind, TaskStatus

router = APIRouter()


@router.get("/files/{task_id}")
async def download(request: Request, task_id: str, expires: int = Query(...), signature: str = Query(...)):
    """Signed download for the local backend. A bad or expired signature is refused the same
    way whether or not the task exists, so the route tells nothing about other owners' tasks."""
    services: Services = request.app.state.services
    if not verify(services.settings.signing_secret, "GET", task_id, expires, signature):
        raise HTTPException(403, "This download link is invalid or has expired; ask for a new one.")
    task = await services.store.get(task_id)
    # An export's file once it succeeded; an import's error report once it finished.
    key = (task.report_key if task.kind is TaskKind.IMPORT else task.object_key) if task else None
    ready = task is not None and (
        task.status.is_final if task.kind is TaskKind.IMPORT else task.status is TaskStatus.SUCCEEDED
    )
    if not ready or not key or services.storage.name != "local":
        raise HTTPException(404, "There is no such file.")
    path = services.storage.path_for(key)
    if not path.exists():
        raise HTTPException(404, "There is no such file.")
    return FileResponse(path, filename=path.name, content_disposition_type="attachment")
