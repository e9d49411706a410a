"""Import tasks run in process, as tests/test_import_modes.py and tests/test_scoped_imports.py run
them: the file put in storage, the task made as ``tasks.imports.request_import`` makes it, and the
worker's job (``workers.imports.run_import``) run to its end."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson

from tasks.models import Task, TaskKind, TaskStatus, stamp
from tasks.services import Services
from workers.imports import run_import


def csv_file(header: list[str], rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


async def run_import_task(
    services: Services,
    identifier: str,
    *,
    owner: str,
    dataset: str,
    file_format: str,
    key: str,
    content: bytes,
    request: dict[str, Any],
) -> Task:
    """``content`` stored at ``key``, an import task of it made and run by the worker's job; the
    finished task."""
    writer = await services.storage.open_writer(key, "application/octet-stream")
    await writer.write(content)
    await writer.complete()
    await services.store.request(
        identifier,
        {
            "id": identifier,
            "kind": TaskKind.IMPORT.value,
            "owner": owner,
            "email": None,
            "dataset": dataset,
            "format": file_format,
            "request": orjson.dumps(request).decode(),
            "notify": False,
            "status": TaskStatus.PENDING.value,
            "created_at": stamp(),
            "object_key": key,
            "attempts": 0,
            "processed_rows": 0,
            "bytes": 0,
        },
        reuse_seconds=-1,
    )
    await run_import({"services": services, "job_try": 1, "job_id": f"import:{identifier}:1"}, identifier, 1)
    task = await services.store.get(identifier)
    assert task is not None
    return task


async def read_csv(services: Services, key: str | None) -> list[dict[str, str]]:
    """The lines of a stored CSV file (an error report, a results file); none without a key."""
    if not key:
        return []
    stream = await services.storage.open_stream(key)
    try:
        return list(csv.DictReader(io.StringIO(stream.read().decode())))
    finally:
        stream.close()
