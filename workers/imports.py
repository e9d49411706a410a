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
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, Any

from dataport.logs import bind_job
from dataport.services import Services
from formats.column_checker import NO_OUTPUT, TEXT, TYPED, ColumnChecker
from formats.converters import CellError
from formats.csv import CsvWriter
from formats.header_check import header_problems
from formats.limits import ParseLimits, capped, listed
from formats.readers import Reader, reader_for
from formats.records import FileError, FileLimitError, Record, RowBatch
from formats.row_converter import RowConverter
from sources.base import Column, Dataset, Row, SourceError
from sources.receipts import Receipt, find_receipt
from sources.sink_base import SinkError
from sources.sinks import RowSink, open_sink
from storage.base import ObjectWriter, ReadStream, StorageError
from tasks.imports import report_key
from tasks.models import Task, TaskStatus, stamp
from tasks.notifications import task_finished
from workers import memory
from workers.attempts import TRANSIENT, Failure, claim, retry_or_fail
from workers.attempts import fail as _fail
from workers.progress import ProgressReporter, TaskMovedOn
from workers.scoping import Tenant, foreign_key_failures, header_columns, tenant_for

log = logging.getLogger("dataport.worker")

REPORT_COLUMNS = (Column("row", "integer"), Column("column"), Column("reason"), Column("original"))
# Formats whose exports carry the formula guard: their text cells lose exactly that prefix again.
GUARDED_FORMATS = ("CSV", "XLSX")
# The report lists at most this many bad cells of one row (a 16,384-column row once took 160 MB).
MAX_CELLS_PER_ROW = 20


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


@dataclass
class Batch:
    # The valid rows: typed row tuples (``rows``), or with TEXT output their cells as text, column
    # by column (``text``, see formats.column_checker.ColumnChecker); ``valid`` counts them either way.
    rows: list[Row] = field(default_factory=list)
    text: list[Sequence[str]] | None = None
    valid: int = 0
    failures: list[tuple[int, str, str, str]] = field(default_factory=list)  # row, column, reason, original
    failed_rows: int = 0
    records: int = 0
    bytes_read: int = 0
    done: bool = False
    # For a scoped import whose keys are looked up: the row number and original text of each
    # valid row, by its index in ``rows`` (made only for the rows that are refused after all).
    origin: Callable[[int], tuple[int, str]] | None = None


class FileBatches:
    """The reading half of an import: records of the file, checked, a batch at a time. Runs in a
    worker thread; holds one batch, never the file.

    A reader with ``batches`` (CSV) is checked column by column (``ColumnChecker``), and its valid
    rows come out as ``output`` asks: TYPED rows, TEXT columns (for a sink with ``write_text``) or
    nothing (a dry run). Other readers go record by record through ``RowConverter`` (TYPED rows;
    none for a dry run). Both check and convert every cell as ``formats.converters`` defines."""

    def __init__(
        self,
        reader: Reader,
        dataset: Dataset,
        columns: Sequence[Column],
        file_format: str,
        output: int = TYPED,
        tenant: Tenant | None = None,
    ):
        self.reader = reader
        self.dataset = dataset
        unguard_text = file_format in GUARDED_FORMATS
        self.unguard_text = unguard_text
        self._batches: Iterator[RowBatch] | None = None
        self.by_column = reader.fields is not None and callable(getattr(reader, "batches", None))
        # A scoped import (workers.scoping): where the scope column is, what fills it, whether each
        # valid row's number and original are kept for the key look-up.
        self.tenant = tenant
        self.scope_at = next(i for i, c in enumerate(columns) if c.name == tenant.column.name) if tenant else -1
        self.fill = tenant.fill_cell(unguard_text) if tenant else None
        self.keep_origin = tenant is not None and tenant.guards_keys
        if self.by_column:
            assert reader.fields is not None
            at = {name: i for i, name in enumerate(reader.fields)}
            # None: a column the file lacks (the scope column, which is filled)
            self.positions = [at.get(c.name) for c in columns]
            self.checker = ColumnChecker(columns, unguard_text=unguard_text)
            self.output = TYPED if output == TEXT and not unguard_text else output
        else:
            self.records = reader.records()
            # Files with a header had their names checked once, before the first row.
            self.names = {c.name for c in columns} if reader.fields is None else None
            self.converter = RowConverter(columns, unguard_text=unguard_text)
            self.output = TYPED

    def next(self, size: int, failures_allowed: int) -> Batch:
        """Up to ``size`` records; fewer when ``failures_allowed`` rows have failed, so that an
        import stopped by maxErrors reports exactly that many."""
        if self.by_column:
            return self._next_columns(size, failures_allowed)
        batch = Batch()
        kept: list[Record] | None = [] if self.keep_origin else None
        for record in self.records:
            batch.records += 1
            self._check(record, batch, kept)
            if batch.records >= size or batch.failed_rows >= failures_allowed:
                break
        else:
            batch.done = True
        batch.valid = len(batch.rows)
        batch.bytes_read = self.reader.bytes_read
        if kept is not None:
            batch.origin = lambda n: (kept[n].number, kept[n].original())
        return batch

    def _check(self, record: Record, batch: Batch, kept: list[Record] | None = None) -> None:
        problem = record.problem
        if problem is None and self.names is not None:
            unknown = [name for name in record.values if name not in self.names]
            if unknown:
                problem = f"not a column of dataset '{self.dataset.name}': {listed(unknown)}"
        if problem is not None:
            batch.failed_rows += 1
            batch.failures.append((record.number, "", problem, record.original()))
            return
        tenant = self.tenant
        values = record.values if tenant is None else tenant.filled(record.values, self.fill)
        row, errors = self.converter.convert(values)
        if row is not None and tenant is not None and not tenant.owns(row, self.scope_at):
            row, errors = None, [CellError(tenant.column.name, tenant.refusal)]
        if row is not None:
            batch.rows.append(row)
            if kept is not None:
                kept.append(record)
            return
        batch.failed_rows += 1
        original = record.original()
        batch.failures.extend((record.number, e.column, e.reason, original) for e in first_cells(errors))

    def _next_columns(self, size: int, failures_allowed: int) -> Batch:
        if self._batches is None:
            # CSV's optional batches() (formats.readers.Reader): taken only where the reader has it.
            self._batches = self.reader.batches(size)  # type: ignore[attr-defined]
        read = next(self._batches, None)
        batch = Batch(bytes_read=self.reader.bytes_read)
        if read is None:
            batch.done = True
            return batch
        count = len(read.numbers)
        cells = [read.columns[i] if i is not None else [""] * count for i in self.positions]
        foreign: list[int] = []
        if self.tenant is not None:
            cells[self.scope_at], foreign = self.tenant.column_cells(cells[self.scope_at], self.unguard_text)
        out, errors = self.checker.check(cells, self.output)
        for i in foreign:  # a row of another tenant (its scope cell was checked as the tenant's)
            errors.setdefault(i, []).append(CellError(self.tenant.column.name, self.tenant.refusal))  # type: ignore[union-attr]
        keep = count  # the rows looked at: all, unless maxErrors is reached within the batch
        batch.records = count + len(read.problems)
        if errors or read.problems:
            # The failed records in file order, up to the one that reaches failures_allowed.
            failed = sorted(
                [(read.numbers[i], i, None) for i in errors] + [(p.number, -1, p) for p in read.problems],
                key=itemgetter(0),
            )
            for number, i, problem in failed:
                if problem is None:
                    original = read.original(i)
                    batch.failures.extend((number, e.column, e.reason, original) for e in first_cells(errors[i]))
                else:
                    batch.failures.append((number, "", problem.problem or "", problem.original()))
                batch.failed_rows += 1
                if batch.failed_rows >= failures_allowed:
                    keep = bisect_right(read.numbers, number)
                    batch.records = keep + sum(1 for p in read.problems if p.number <= number)
                    break
        good: Sequence[int] = range(count)
        if errors or keep < count:
            good = [i for i in range(keep) if i not in errors]
            batch.valid = len(good)
            if out is not None:
                out = [[column[i] for i in good] for column in out]
        else:
            batch.valid = count
        if out is not None and batch.valid:
            if self.output == TEXT:
                batch.text = out
            else:
                batch.rows = list(zip(*out, strict=False))  # columns of a length
        if self.keep_origin:
            batch.origin = lambda n: (read.numbers[good[n]], read.original(good[n]))
        return batch


def first_cells(errors: list[CellError]) -> list[CellError]:
    """A row's bad cells as the report lists them: the first ``MAX_CELLS_PER_ROW``, then one line
    for the rest."""
    if len(errors) <= MAX_CELLS_PER_ROW:
        return errors
    more = len(errors) - MAX_CELLS_PER_ROW
    return [*errors[:MAX_CELLS_PER_ROW], CellError("", f"… and {more:,} more cells of this row failed")]


class ErrorReport:
    """The failed rows as CSV (row, column, reason, original), written to storage only once there
    is something in it. Text is formula-guarded: people open this file in spreadsheets. It stops
    growing past ``max_bytes``: a last line says how many failure lines were left out."""

    def __init__(self, services: Services, key: str, max_bytes: int | None = None):
        self.services = services
        self.key = key
        self.writer = CsvWriter(REPORT_COLUMNS, formula_guard=True)
        self.out: ObjectWriter | None = None
        self.max_bytes = max_bytes if max_bytes is not None else services.settings.import_max_report_bytes
        self.written = 0
        self.left_out = 0  # failure lines not written: the report was full

    async def add(self, failures: list[tuple[int, str, str, str]]) -> None:
        if not failures:
            return
        if self.left_out:
            self.left_out += len(failures)
            return
        if self.out is None:
            self.out = await self.services.storage.open_writer(self.key, "text/csv; charset=utf-8")
            await self._put(self.writer.begin())
        data = self.writer.write(failures)
        if self.written + len(data) > self.max_bytes:
            # Line by line up to the limit (only this once), then nothing more.
            for i, failure in enumerate(failures):
                line = self.writer.write([failure])
                if self.written + len(line) > self.max_bytes:
                    self.left_out = len(failures) - i
                    return
                await self._put(line)
            return
        await self._put(data)

    async def _put(self, data: bytes) -> None:
        assert self.out is not None
        self.written += len(data)
        await self.out.write(data)

    async def complete(self) -> str | None:
        if self.out is None:
            return None
        if self.left_out:
            note = (
                f"the report stops here at {self.max_bytes:,} bytes: {self.left_out:,} more failure lines were left out"
            )
            await self.out.write(self.writer.write([(None, "", note, "")]))
        await self.out.complete()
        return self.key

    async def abort(self) -> None:
        if self.out is not None:
            await self.out.abort()


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
    stream = await _open_file(services, task)
    sink: RowSink | None = None
    probe: RowSink | None = None  # a sink only asked about keys (a dry run of a scoped import), never written
    ahead: asyncio.Future[Batch] | None = None  # the next batch, read while this one is written
    try:
        reader = await asyncio.to_thread(
            reader_for,
            task.format,
            stream,
            max_cell_bytes=settings.import_max_cell_bytes,
            limits=ParseLimits.from_settings(settings),
        )
        columns = _columns(dataset, reader, tenant)
        # An earlier attempt of this run may have committed before its worker died: then its rows
        # are in, and this attempt only reads the file again for the counts and the error report.
        committed = None if dry_run else await find_receipt(dataset, task.id, task.run)
        scope = tenant.sink_scope if tenant is not None else None
        if not dry_run and committed is None:
            sink = await open_sink(dataset, columns, request["mode"], settings, scope)
        elif tenant is not None and tenant.guards_keys:  # the same row errors as a real run
            probe = await open_sink(dataset, columns, request["mode"], settings, scope)
        keys = sink or probe if tenant is not None and tenant.guards_keys else None  # asked for foreign keys
        output = TYPED if keys is not None else _output(sink)
        batches = FileBatches(reader, dataset, columns, task.format, output=output, tenant=tenant)
        rows = settings.import_batch_rows
        valid = failed = 0
        ahead = asyncio.ensure_future(asyncio.to_thread(batches.next, rows, max_errors))
        while True:
            assert ahead is not None  # set below on every turn that does not end the loop
            batch = await asyncio.shield(ahead)  # a cancel leaves the read to finish (see _settle)
            ahead = None
            if keys is not None and tenant is not None and batch.rows:
                await _refuse_foreign_keys(keys, dataset, tenant, batch)
            failed += batch.failed_rows
            if not batch.done and failed < max_errors:
                ahead = asyncio.ensure_future(asyncio.to_thread(batches.next, rows, max_errors - failed))
            if sink is not None and batch.valid:
                await _write(sink, batch)
            await report.add(batch.failures)
            valid += batch.valid
            progress.counters = {"rows_imported": 0 if dry_run else valid, "rows_failed": failed}
            await progress.advance(batch.records, batch.bytes_read - progress.bytes)
            if failed >= max_errors:
                return await _too_many_errors(services, task, attempt, sink, report, progress, max_errors)
            if batch.done:
                break
        await progress.flush()  # raises TaskMovedOn if cancelled: nothing is committed then
        written = await sink.commit(Receipt(task.id, task.run)) if sink is not None else 0
        if committed is not None:
            written = committed.rows
            log.info("import %s run %d had committed %d rows before its worker stopped", task.id, task.run, written)
    except BaseException:
        await asyncio.shield(_discard(sink, report))
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
    message = (
        f"dry run: {valid:,} rows valid, {failed:,} failed; nothing was written"
        if dry_run
        else f"{written:,} rows written, {failed:,} failed"
        + (" (committed by an earlier attempt whose worker stopped)" if committed is not None else "")
    )
    finished = await services.store.transition(
        task.id,
        TaskStatus.SUCCEEDED,
        message,
        allowed_from=[TaskStatus.PROCESSING],
        fence_attempt=attempt,
        fields={
            "finished_at": stamp(),
            "processed_rows": progress.rows,
            "total_rows": progress.rows,
            "bytes": size,
            "eta_seconds": 0,
            "rows_imported": valid if dry_run else written,
            "rows_failed": failed,
            "row_count": progress.rows,
            "report_key": report_at,
        },
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
    assert batch.origin is not None
    batch.failures = sorted(
        batch.failures + foreign_key_failures(dataset, tenant, refused, batch.origin), key=itemgetter(0)
    )
    out = set(refused)
    batch.rows = [row for n, row in enumerate(batch.rows) if n not in out]
    batch.valid = len(batch.rows)
    batch.failed_rows += len(refused)


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
    """The dataset's columns this import writes: the header's (CSV, XLSX), checked before any
    row is read; every column for files without a header (JSON, NDJSON: a missing key is null).
    A scoped import always writes the scope column, which a header need not name (it is filled)."""
    if reader.fields is None:
        return list(dataset.columns)
    problems = header_problems(reader.fields, header_columns(dataset, tenant))
    if problems:
        raise Failure(
            "INVALID_HEADER",
            f"The file's header does not fit dataset '{dataset.name}': {'; '.join(problems)}. Nothing was written.",
        )
    named = set(reader.fields)
    if tenant is not None:
        named.add(tenant.column.name)
    return [c for c in dataset.columns if c.name in named]


async def _too_many_errors(
    services: Services,
    task: Task,
    attempt: int,
    sink: RowSink | None,
    report: ErrorReport,
    progress: ProgressReporter,
    max_errors: int,
) -> str:
    if sink is not None:
        await sink.rollback()
    report_at = await report.complete()
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
