"""The import job: uploaded file → reader → row checks → sink, with an error report.

One call of ``run_import`` is one attempt, claimed and fenced like an export's. The file is read
in a worker thread one batch at a time (parsing is CPU work and blocking I/O), so the event loop
keeps renewing the lease and noticing a cancel; the next batch is read while the sink writes this
one. Valid rows go to the dataset's sink, failed rows to the error report; the sink commits once
at the end, so on PostgreSQL and SQLite an import writes all its valid rows or none. A retry
starts again from the first byte.

A CSV file is read and checked column by column (``CsvReader.batches``, ``ColumnChecker``), and
its valid rows go to a sink that takes text (PostgreSQL) as text, never as typed values; other
formats go record by record through ``RowConverter``. Both make the same rows and the same report.

Bounds (issue 15): ``maxErrors`` is at most ``import_max_errors_limit``; the error report lists at
most ``MAX_CELLS_PER_ROW`` cells of a row and stops at ``import_max_report_bytes`` (its last line
says how many failures were left out); a message stored in the task is cut after a few KB
(``formats.limits.capped``). A file past a parser's bound fails with its ``FileError.code``
(``FILE_LIMIT_EXCEEDED``); a ``MemoryError`` fails the import with that code too, and restarts
the worker once its other jobs are done (``workers.memory``), as does an RSS above
``worker_restart_rss_bytes`` after any import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import IO, Any

from dataport.logs import bind_job
from formats.column_checker import NO_OUTPUT, TEXT, TYPED
from formats.header_check import header_problems, header_resolver, map_header
from formats.limits import ParseLimits, capped
from formats.readers import Reader, reader_for
from formats.records import FileError, FileLimitError
from sources.base import Column, Dataset, SourceError
from sources.receipts import Receipt, find_receipt
from sources.sink_base import SinkError
from sources.sinks import KEYED_MODES, RowSink, open_sink
from storage.base import ReadStream, StorageError
from tasks.imports import report_key, results_key
from tasks.models import Task
from tasks.notifications import task_finished
from tasks.services import Services
from workers import memory
from workers.attempts import TRANSIENT, Failure, claim, retry_or_fail, succeed
from workers.attempts import fail as _fail
from workers.import_batches import (  # noqa: F401 (REPORT_COLUMNS, first_cells: imported from here by tests)
    REPORT_COLUMNS,
    Batch,
    ErrorReport,
    FileBatches,
    first_cells,
)
from workers.import_outcomes import Outcomes, ResultsFile
from workers.progress import ProgressReporter, TaskMovedOn
from workers.scoping import Tenant, foreign_key_failures, header_columns, tenant_for

log = logging.getLogger("dataport.worker")


async def run_import(ctx: dict[str, Any], task_id: str, run: int) -> str:
    bind_job("import", task_id, run, ctx)  # logs carry the task id from here on
    services: Services = ctx["services"]
    attempt: int = ctx["job_try"]
    task = await claim(services, task_id, run, attempt, "import")
    if task is None:
        return "nothing to do"
    try:
        return await _attempt(services, task, attempt, ctx)
    finally:
        rss = memory.over(services.settings.worker_restart_rss_bytes)  # a few ms, once per import
        if rss is not None:
            memory.request_restart(
                ctx,
                f"RSS {rss / 2**20:,.0f} MiB after import {task_id} "
                f"(limit {services.settings.worker_restart_rss_bytes / 2**20:,.0f} MiB)",
            )


async def _attempt(services: Services, task: Task, attempt: int, ctx: dict[str, Any]) -> str:
    task_id = task.id
    try:
        return await _import(services, task, attempt)
    except TaskMovedOn:
        log.info("import %s stopped: the task moved on (cancelled)", task_id)
        return "stopped"
    except (SinkError, StorageError) as e:
        if e.transient:
            return await retry_or_fail(services, task, attempt, e)
        code = "STORAGE_ERROR" if isinstance(e, StorageError) else "WRITE_FAILED"
        return await fail(services, task, attempt, code, str(e))
    except TRANSIENT as e:
        return await retry_or_fail(services, task, attempt, e)
    except SourceError as e:
        return await fail(services, task, attempt, "WRITE_FAILED", str(e))
    except Failure as e:
        return await fail(services, task, attempt, e.code, str(e))
    except FileError as e:
        return await fail(services, task, attempt, e.code, f"The file cannot be imported: {e}")
    except MemoryError:
        # Not bounded by formats.limits after all: this attempt fails (a retry would fail
        # alike), and the worker starts afresh once its other jobs are done.
        memory.request_restart(ctx, f"MemoryError in import {task_id}")
        return await fail(
            services,
            task,
            attempt,
            FileLimitError.code,
            "The file needs more memory than an import may use; split it into smaller files. "
            f"{nothing_written(task, services)}",
        )
    except Exception as e:
        log.exception("import %s attempt %s crashed", task_id, attempt)
        return await fail(
            services,
            task,
            attempt,
            "INTERNAL_ERROR",
            f"The import failed unexpectedly ({type(e).__name__}); {nothing_written(task, services)}",
        )


async def fail(services: Services, task: Task, attempt: int, code: str, message: str, **fields: Any) -> str:
    """``workers.attempts.fail`` with the message capped: it is stored in the task and sent on every poll."""
    return await _fail(services, task, attempt, code, capped(message), **fields)


async def _import(services: Services, task: Task, attempt: int) -> str:
    settings = services.settings
    dataset = services.registry.get(task.dataset)
    if dataset is None or not dataset.importable:
        raise Failure("DATASET_NOT_FOUND", f"Dataset '{task.dataset}' no longer accepts imports.")
    request = task.request
    tenant = tenant_for(dataset, request)  # a scoped dataset: the tenant it writes for (or Failure)
    dry_run = bool(request.get("dryRun"))
    # Tasks requested before the limit existed may ask for more: the limit holds for them too.
    max_errors = min(request.get("maxErrors") or settings.import_max_errors, settings.import_max_errors_limit)
    size = await services.storage.size_of(task.object_key) if task.object_key else None
    if size is None:
        raise Failure("UPLOAD_MISSING", "The uploaded file is gone from storage; upload it again.")

    progress = ProgressReporter(
        services.store, task.id, attempt, None, settings.progress_interval_seconds, total_bytes=size
    )
    progress.counters = {"rows_imported": 0, "rows_failed": 0}
    await progress.flush()
    report = ErrorReport(services, report_key(task))
    results = ResultsFile(services, results_key(task)) if request.get("results") else None
    stream = await _open_file(services, task)
    sink: RowSink | None = None
    probe: RowSink | None = None  # a sink only asked about stored rows (a dry run), never written
    ahead: asyncio.Future[Batch] | None = None  # the next batch, read while this one is written
    try:
        reader = await asyncio.to_thread(
            reader_for,
            task.format,
            stream,
            max_cell_bytes=settings.import_max_cell_bytes,
            limits=ParseLimits.from_settings(settings),
        )
        mode = request["mode"]
        columns, header, rename = _plan_columns(dataset, reader, tenant, mode, request.get("columnMap"))
        # An earlier attempt of this run may have committed before its worker died: then its rows
        # are in, and this attempt only reads the file again for the counts and the error report.
        committed = None if dry_run else await find_receipt(dataset, task.id, task.run)
        scope = tenant.sink_scope if tenant is not None else None
        outcomes = Outcomes(
            dataset,
            columns,
            mode,
            dry_run=dry_run,
            results=results,
            missing_required=_missing_required(dataset, columns, tenant, mode) if reader.fields is not None else (),
        )
        if committed is not None:
            outcomes.lookup = False  # the rows are in: their outcomes can no longer be told
        guarded = tenant is not None and tenant.guards_keys
        if not dry_run and committed is None:
            sink = await open_sink(dataset, columns, mode, settings, scope)
        elif guarded or (dry_run and outcomes.lookup):  # the same row errors as a real run
            probe = await open_sink(dataset, columns, mode, settings, scope)
        keys = sink or probe if guarded or outcomes.lookup else None  # asked for foreign keys, stored rows
        typed = keys is not None or dry_run or results is not None  # rows looked at, sampled or listed
        output = TYPED if typed else _output(sink)
        batches = FileBatches(
            reader,
            dataset,
            columns,
            task.format,
            output=output,
            tenant=tenant,
            header=header,
            rename=rename,
            keep_origin=outcomes.lookup or results is not None or dry_run,
        )
        rows = settings.import_batch_rows
        valid = failed = 0
        ahead = asyncio.ensure_future(asyncio.to_thread(batches.next, rows, max_errors))
        while True:
            assert ahead is not None  # set below on every turn that does not end the loop
            batch = await asyncio.shield(ahead)  # a cancel leaves the read to finish (see _settle)
            ahead = None
            if keys is not None and tenant is not None and guarded and batch.rows:
                await _refuse_foreign_keys(keys, dataset, tenant, batch)
            if keys is not None and outcomes.lookup:
                await outcomes.classify(keys, batch)
            failed += batch.failed_rows
            if not batch.done and failed < max_errors:
                ahead = asyncio.ensure_future(asyncio.to_thread(batches.next, rows, max_errors - failed))
            if sink is not None and batch.valid:
                await _write(sink, batch)
            await report.add(batch.failures)
            await outcomes.record(batch)
            valid += batch.valid
            progress.counters = {"rows_imported": 0 if dry_run else valid, "rows_failed": failed}
            await progress.advance(batch.records, batch.bytes_read - progress.bytes)
            if failed >= max_errors:
                return await _too_many_errors(services, task, attempt, sink, report, progress, max_errors, results)
            if batch.done:
                break
        await progress.flush()  # raises TaskMovedOn if cancelled: nothing is committed then
        written = await sink.commit(Receipt(task.id, task.run)) if sink is not None else 0
        if committed is not None:
            written = committed.rows
            log.info("import %s run %d had committed %d rows before its worker stopped", task.id, task.run, written)
    except BaseException:
        await asyncio.shield(_discard(sink, report))
        if results is not None:
            results.close()
        raise
    finally:
        await _settle(ahead)  # a read in progress ends before its stream is closed
        await asyncio.to_thread(stream.close)
        for opened in (sink, probe):
            if opened is not None:
                await asyncio.shield(opened.close())

    if written:
        await services.store.mark_dataset_written(dataset.name)
    report_at = await report.complete()
    results_at = await results.complete() if results is not None else None
    message = (
        f"dry run: {valid:,} rows valid{outcomes.summary()}, {failed:,} failed; nothing was written"
        if dry_run
        else f"{written:,} rows written{outcomes.summary()}, {failed:,} failed"
        + (" (committed by an earlier attempt whose worker stopped)" if committed is not None else "")
    )
    finished = await succeed(
        services,
        task,
        attempt,
        message,
        progress.rows,
        size,
        rows_imported=valid if dry_run else written,
        rows_failed=failed,
        report_key=report_at,
        results_key=results_at,
        # A run keeps it too: its failed rows' samples are shown inline (ImportTask.failedSamples).
        preview=outcomes.preview.as_json(),
    )
    if finished.ok:
        await task_finished(services, task)
    else:
        # Cancelled between the last check and the commit: the rows are in, and the events say so.
        log.warning("import %s was cancelled after its rows were committed", task.id)
    return "succeeded"


def _output(sink: RowSink | None) -> int:
    """What the checks hand on: nothing for a dry run, text to a sink that parses it."""
    if sink is None:
        return NO_OUTPUT
    return TEXT if callable(getattr(sink, "write_text", None)) else TYPED


async def _refuse_foreign_keys(keys: RowSink, dataset: Dataset, tenant: Tenant, batch: Batch) -> None:
    """Take the rows whose key another tenant's stored row holds out of ``batch``, as failures
    (``workers.scoping``). An import stopped by maxErrors may then list a few more than maxErrors."""
    refused = await keys.foreign_rows(batch.rows)
    if not refused:
        return
    failures = foreign_key_failures(dataset, tenant, refused, batch.original_of)
    batch.failures = sorted(batch.failures + failures, key=itemgetter(0))
    batch.drop(set(refused))


async def _write(sink: RowSink, batch: Batch) -> None:
    if batch.text is not None:
        # The optional write_text() of a sink that parses text: batch.text is set only for such a
        # sink (_output).
        await sink.write_text(batch.text, batch.valid)  # type: ignore[attr-defined]
    else:
        await sink.write(batch.rows)


# How long a stopping import waits for the batch being read ahead (normally a few milliseconds).
SETTLE_SECONDS = 1.0


async def _settle(ahead: asyncio.Future[Batch] | None) -> None:
    """Let a batch being read in a thread finish (its outcome is not wanted any more)."""
    if ahead is None:
        return
    ahead.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
    with contextlib.suppress(Exception, asyncio.CancelledError):  # the import stops anyway: clean up
        await asyncio.wait([ahead], timeout=SETTLE_SECONDS)


def nothing_written(task: Task, services: Services) -> str:
    """What a stopped import left behind: nothing, where the store has transactions."""
    dataset = services.registry.get(task.dataset)
    if dataset is not None and dataset.source == "opensearch":
        return (
            "rows sent before it stopped stay in the index (OpenSearch has no transactions); running "
            "the import again converges on the same documents."
        )
    return "nothing was written."


def _columns(dataset: Dataset, reader: Reader, tenant: Tenant | None = None) -> list[Column]:
    """The columns an INSERT of the file writes (``_plan_columns``' first part)."""
    return _plan_columns(dataset, reader, tenant)[0]


def _plan_columns(
    dataset: Dataset,
    reader: Reader,
    tenant: Tenant | None = None,
    mode: str = "INSERT",
    column_map: Mapping[str, str] | None = None,
) -> tuple[list[Column], list[str] | None, Callable[[str], str | None] | None]:
    """The dataset's columns this import writes, and how the file names them. With a header (CSV,
    XLSX): the header's columns, mapped (``formats.header_check.map_header``: ``columnMap``, then
    names ignoring case and surrounding spaces) and checked before any row is read, returned with
    the column of each field. Without one (JSON, NDJSON): every column (a missing key is null),
    and the resolver of each record's keys. A scoped import always writes the scope column, which a
    header need not name (it is filled). UPSERT and UPDATE need the key's columns, not the other
    required ones (``Outcomes`` refuses a new row that lacks them)."""
    if reader.fields is None:
        return list(dataset.columns), None, header_resolver(dataset.columns, column_map) if column_map else None
    mapped, problems = map_header(reader.fields, dataset.columns, column_map)
    checked = header_columns(dataset, tenant)
    if mode in KEYED_MODES:
        checked = tuple(replace(c, required=c.name in dataset.key) for c in checked)
    problems += header_problems(mapped, checked)
    if problems:
        raise Failure(
            "INVALID_HEADER",
            f"The file's header does not fit dataset '{dataset.name}': {'; '.join(problems)}. Nothing was written.",
        )
    named = set(mapped)
    if tenant is not None:
        named.add(tenant.column.name)
    return [c for c in dataset.columns if c.name in named], mapped, None


def _missing_required(dataset: Dataset, columns: Sequence[Column], tenant: Tenant | None, mode: str) -> list[str]:
    """The required columns an UPSERT's file lacks: a new row cannot be inserted without them."""
    if mode != "UPSERT":
        return []
    named = {c.name for c in columns}
    return [c.name for c in header_columns(dataset, tenant) if c.required and c.name not in named]


async def _too_many_errors(
    services: Services,
    task: Task,
    attempt: int,
    sink: RowSink | None,
    report: ErrorReport,
    progress: ProgressReporter,
    max_errors: int,
    results: ResultsFile | None = None,
) -> str:
    if sink is not None:
        await sink.rollback()
    report_at = await report.complete()
    results_at = None
    if results is not None:
        dataset = services.registry.get(task.dataset)
        kept = sink is not None and dataset is not None and dataset.source == "opensearch"  # no rollback there
        results_at = await results.complete(None if kept else "not written: the import stopped at maxErrors")
    message = (
        f"Stopped after {max_errors:,} failed rows (maxErrors); {nothing_written(task, services)} "
        "The error report lists them."
    )
    return await _fail(
        services,
        task,
        attempt,
        "TOO_MANY_ERRORS",
        message,
        report_key=report_at,
        results_key=results_at,
        rows_failed=progress.counters["rows_failed"],
        rows_imported=0,
        processed_rows=progress.rows,
    )


async def _discard(sink: RowSink | None, report: ErrorReport) -> None:
    if sink is not None:
        await sink.rollback()
    await report.abort()


async def _open_file(services: Services, task: Task) -> ReadStream:
    """The uploaded file as a stream. XLSX is a zip, read by seeking: it is copied to a temporary
    file first (on disk, never in memory); the other formats stream straight from storage."""
    assert task.object_key
    stream = await services.storage.open_stream(task.object_key)
    if task.format != "XLSX":
        return stream

    def spool() -> IO[bytes]:
        local = tempfile.TemporaryFile(prefix="dataport-import-")
        try:
            shutil.copyfileobj(stream, local, 1024 * 1024)
        except BaseException:
            local.close()
            raise
        finally:
            stream.close()
        local.seek(0)
        return local

    return await asyncio.to_thread(spool)
