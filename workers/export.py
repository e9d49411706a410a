"""The export job: source → writer → storage, with progress, retries and cancellation.

One call of ``run_export`` is one attempt. It claims the task (PENDING, or PROCESSING left by a
dead worker) by bumping ``attempts``; every later write is fenced on that number, so a stale
attempt can never overwrite a newer one or revive a cancelled task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from contextlib import aclosing
from typing import Any

import redis.exceptions
from arq import Retry

from dataport.errors import UserErrors
from dataport.services import Services
from formats import WRITERS
from formats.pipeline import encode
from sources.base import SourceError, TransientSourceError
from sources.query import build_query
from storage.base import StorageError
from tasks.models import Task, TaskStatus, stamp
from workers.lease import renew_lease
from workers.progress import ProgressReporter, TaskMovedOn

log = logging.getLogger("dataport.worker")

# Failures that may pass on their own: the next attempt runs after a short pause.
TRANSIENT = (TransientSourceError, OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _Failure(Exception):
    """Not retried: the message is what the user sees."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


async def run_export(ctx: dict[str, Any], task_id: str, run: int) -> str:
    services: Services = ctx["services"]
    store = services.store
    attempt: int = ctx["job_try"]
    task = await store.get(task_id)
    if task is None or task.run != run or task.status not in (TaskStatus.PENDING, TaskStatus.PROCESSING):
        return "nothing to do"  # cancelled while waiting, deleted, or superseded by a newer run

    resumed = task.status is TaskStatus.PROCESSING
    if attempt > services.settings.max_tries:
        # arq grants one try beyond max_tries so that this, not a silent drop, ends the task
        await store.transition(
            task_id, TaskStatus.FAILED, f"gave up: the worker running attempt {attempt - 1} stopped",
            allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
            fields={"finished_at": stamp(), "error_code": "TRANSIENT_ERROR",
                    "error_message": f"Gave up after {attempt - 1} attempts; the last worker stopped mid-export."},
        )
        return "failed"
    claimed = await store.transition(
        task_id,
        TaskStatus.PROCESSING,
        f"attempt {attempt} started on {socket.gethostname()}"
        + (" (the previous attempt's worker stopped)" if resumed else ""),
        allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
        fields={"attempts": attempt, "started_at": stamp(), "processed_rows": 0, "bytes": 0,
                "rows_per_second": None, "eta_seconds": None},
    )
    if not claimed.ok:
        return "nothing to do"

    lease = asyncio.create_task(renew_lease(services, ctx["job_id"]))
    try:
        await _export(services, task, attempt)
        return "succeeded"
    except TaskMovedOn:
        log.info("export %s stopped: the task moved on (cancelled or deleted)", task_id)
        return "stopped"
    except asyncio.CancelledError:
        # arq cancels the job on abort (the task is CANCELLED already) and on worker shutdown
        # (the task stays PROCESSING and is claimed again by the next worker).
        raise
    except TRANSIENT as e:
        return await _retry_or_fail(services, task, attempt, e)
    except StorageError as e:
        if e.transient:
            return await _retry_or_fail(services, task, attempt, e)
        return await _fail(services, task, attempt, "STORAGE_ERROR", f"The file could not be stored: {e}")
    except SourceError as e:
        return await _fail(services, task, attempt, "SOURCE_ERROR", str(e))
    except UserErrors as e:  # the dataset changed under a queued request
        return await _fail(services, task, attempt, "INVALID_REQUEST", str(e))
    except _Failure as e:
        return await _fail(services, task, attempt, e.code, str(e))
    except Exception as e:
        log.exception("export %s attempt %s crashed", task_id, attempt)
        return await _fail(services, task, attempt, "INTERNAL_ERROR",
                           f"The export failed unexpectedly ({type(e).__name__}); it can be retried.")
    finally:
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease


async def _export(services: Services, task: Task, attempt: int) -> None:
    settings = services.settings
    dataset = services.registry.get(task.dataset)
    if dataset is None:
        raise _Failure("DATASET_NOT_FOUND", f"Dataset '{task.dataset}' no longer exists.")
    r = task.request
    query = build_query(dataset, r.get("columns"), r.get("filters"), r.get("sort"), r.get("limit"))
    file_format = WRITERS[task.format]
    key = f"exports/{task.owner}/{task.id}/{dataset.name}-{task.run}.{file_format.extension}"

    source = services.registry.open(dataset)
    try:
        total = await source.count(query)
        progress = ProgressReporter(services.store, task.id, attempt, total, settings.progress_interval_seconds)
        await progress.flush()
        await services.storage.discard_incomplete(key)  # a killed attempt's half-written parts
        out = await services.storage.open_writer(key, file_format.content_type)
        try:
            chunks = encode(source, query, task.format, batch_rows=settings.batch_rows,
                            formula_guard=settings.csv_formula_guard)
            async with aclosing(chunks):
                async for chunk, rows in chunks:
                    await out.write(chunk)
                    await progress.advance(rows, len(chunk))
            stored = await out.complete()
        except BaseException:
            await asyncio.shield(out.abort())
            raise
    finally:
        await source.close()

    verified = await services.storage.verify(key)
    if verified is None or (verified.size, verified.sha256) != (stored.size, stored.sha256):
        await services.storage.delete(key)
        raise StorageError(f"the stored file does not match what was written ({verified})")

    finished = await services.store.transition(
        task.id,
        TaskStatus.SUCCEEDED,
        f"{progress.rows:,} rows, {stored.size:,} bytes written",
        allowed_from=[TaskStatus.PROCESSING],
        fence_attempt=attempt,
        fields={
            "finished_at": stamp(),
            "processed_rows": progress.rows,
            "total_rows": progress.rows,
            "bytes": stored.size,
            "eta_seconds": 0,
            "row_count": progress.rows,
            "file_size": stored.size,
            "checksum_sha256": stored.sha256,
            "object_key": key,
        },
    )
    if not finished.ok:  # cancelled at the last moment: the file must not outlive the task
        await services.storage.delete(key)
        raise TaskMovedOn(task.id)


async def _retry_or_fail(services: Services, task: Task, attempt: int, error: BaseException) -> str:
    reason = str(error) or type(error).__name__
    if attempt >= services.settings.max_tries:
        return await _fail(services, task, attempt, "TRANSIENT_ERROR",
                           f"Gave up after {attempt} attempts; the last one failed with: {reason}")
    delay = services.settings.retry_delay_seconds * attempt
    moved = await services.store.transition(
        task.id, TaskStatus.PENDING, f"attempt {attempt} failed: {reason}; retrying in {delay:g}s",
        allowed_from=[TaskStatus.PROCESSING], fence_attempt=attempt,
    )
    if not moved.ok:
        return "stopped"
    raise Retry(defer=delay)


async def _fail(services: Services, task: Task, attempt: int, code: str, message: str) -> str:
    await services.store.transition(
        task.id, TaskStatus.FAILED, message, allowed_from=[TaskStatus.PROCESSING], fence_attempt=attempt,
        fields={"finished_at": stamp(), "error_code": code, "error_message": message},
    )
    return "failed"
