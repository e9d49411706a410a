"""The export job: source → writer → storage, with progress, retries and cancellation.

One call of ``run_export`` is one attempt, claimed, retried and failed as ``workers/attempts.py``
describes.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from dataport.errors import UserErrors
from dataport.logs import bind_job
from formats import WRITERS
from formats.compression import compressed, compression_for
from sources.base import SourceError
from sources.pipeline import encode
from storage.base import StorageError
from tasks.exports import task_query
from tasks.file_names import file_name
from tasks.models import Task
from tasks.notifications import task_finished
from tasks.services import Services
from workers.attempts import TRANSIENT, Failure, claim, fail, retry_or_fail, succeed
from workers.progress import ProgressReporter, TaskMovedOn

log = logging.getLogger("dataport.worker")


async def run_export(ctx: dict[str, Any], task_id: str, run: int) -> str:
    bind_job("export", task_id, run, ctx)  # logs carry the task id from here on
    services: Services = ctx["services"]
    attempt: int = ctx["job_try"]
    task = await claim(services, task_id, run, attempt, "export")
    if task is None:
        return "nothing to do"

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
        return await retry_or_fail(services, task, attempt, e)
    except StorageError as e:
        if e.transient:
            return await retry_or_fail(services, task, attempt, e)
        return await fail(services, task, attempt, "STORAGE_ERROR", f"The file could not be stored: {e}")
    except SourceError as e:
        return await fail(services, task, attempt, "SOURCE_ERROR", str(e))
    except UserErrors as e:  # the dataset changed under a queued request
        return await fail(services, task, attempt, "INVALID_REQUEST", str(e))
    except Failure as e:
        return await fail(services, task, attempt, e.code, str(e))
    except Exception as e:
        log.exception("export %s attempt %s crashed", task_id, attempt)
        return await fail(
            services,
            task,
            attempt,
            "INTERNAL_ERROR",
            f"The export failed unexpectedly ({type(e).__name__}); it can be retried.",
        )


async def _export(services: Services, task: Task, attempt: int) -> None:
    settings = services.settings
    dataset = services.registry.get(task.dataset)
    if dataset is None:
        raise Failure("DATASET_NOT_FOUND", f"Dataset '{task.dataset}' no longer exists.")
    query = task_query(dataset, task.request)  # under the scope it was asked with
    file_format = WRITERS[task.format]
    compression = compression_for(task.request.get("compression"))
    # One folder a run, the file named as the user downloads it (tasks/file_names.py).
    key = f"exports/{task.owner}/{task.id}/{task.run}/{file_name(task)}"

    source = services.registry.open(dataset)
    try:
        if task.progress.total_rows is not None:
            # Counted by the api when the export was requested (or by an earlier attempt of this
            # run): a progress total, and what a source plans its read by. The rows written are
            # counted as they go; SUCCEEDED records those.
            total = task.progress.total_rows
            await source.counted(query, total)
        else:
            total = await source.count(query)
        progress = ProgressReporter(services.store, task.id, attempt, total, settings.progress_interval_seconds)
        await progress.flush()
        await services.storage.discard_incomplete(key)  # a killed attempt's half-written parts
        out = await services.storage.open_writer(key, compression.content_type or file_format.content_type)
        try:
            chunks = compressed(
                encode(
                    source, query, task.format, batch_rows=settings.batch_rows, formula_guard=settings.csv_formula_guard
                ),
                compression,
            )
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

    finished = await succeed(
        services,
        task,
        attempt,
        f"{progress.rows:,} rows, {stored.size:,} bytes written",
        progress.rows,
        stored.size,
        file_size=stored.size,
        checksum_sha256=stored.sha256,
        object_key=key,
    )
    if not finished.ok:  # cancelled at the last moment: the file must not outlive the task
        await services.storage.delete(key)
        raise TaskMovedOn(task.id)
    await task_finished(services, task)
