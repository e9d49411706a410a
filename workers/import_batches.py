"""The reading half of an import, and its error report: the uploaded file's records checked a
batch at a time (``FileBatches``, in a worker thread), and the failed rows written as CSV
(``ErrorReport``). ``workers.imports`` runs the job around them; ``workers.import_outcomes`` tells
the valid rows' outcomes apart (inserted, updated, unchanged) for previews and results files.

Headers: the worker maps the file's header to the dataset's columns first
(``formats.header_check.map_header``: the request's ``columnMap``, then names ignoring case and
surrounding spaces), and hands ``FileBatches`` the column of each field (``header``); files
without a header (JSON, NDJSON) have each record's keys mapped alike (``rename``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from formats.column_checker import TEXT, TYPED, ColumnChecker
from formats.converters import CellError
from formats.csv import CsvWriter
from formats.limits import listed
from formats.readers import Reader
from formats.records import Record, RowBatch
from formats.row_converter import RowConverter
from sources.base import Column, Dataset, Row
from storage.base import ObjectWriter
from tasks.services import Services
from workers.scoping import Tenant

REPORT_COLUMNS = (Column("row", "integer"), Column("column"), Column("reason"), Column("original"))
# Formats whose exports carry the formula guard: their text cells lose exactly that prefix again.
GUARDED_FORMATS = ("CSV", "XLSX")
# The report lists at most this many bad cells of one row (a 16,384-column row once took 160 MB).
MAX_CELLS_PER_ROW = 20


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
    # Where each of ``rows`` was in the batch as read, once rows were taken out (``drop``).
    kept: list[int] | None = None
    # Each row's outcome and changed cells (``workers.import_outcomes.Outcomes.classify``).
    kinds: list[str] | None = None
    changes: list[dict[str, tuple[Any, Any]]] | None = None

    def number_of(self, n: int) -> int:
        """The row number in the file of ``rows[n]`` (needs ``origin``)."""
        assert self.origin is not None
        return self.origin(self.kept[n] if self.kept is not None else n)[0]

    def original_of(self, n: int) -> tuple[int, str]:
        """``origin`` of ``rows[n]``: its row number and original text."""
        assert self.origin is not None
        return self.origin(self.kept[n] if self.kept is not None else n)

    def drop(self, out: set[int]) -> None:
        """Take ``rows[n]`` for each n in ``out`` out of the batch (their failures are the caller's)."""
        keep = [n for n in range(len(self.rows)) if n not in out]
        self.kept = [self.kept[n] for n in keep] if self.kept is not None else keep
        self.rows = [self.rows[n] for n in keep]
        if self.kinds is not None:
            self.kinds = [self.kinds[n] for n in keep]
        if self.changes is not None:
            self.changes = [self.changes[n] for n in keep]
        self.valid = len(self.rows)
        self.failed_rows += len(out)


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
        *,
        header: Sequence[str] | None = None,
        rename: Callable[[str], str | None] | None = None,
        keep_origin: bool = False,
    ) -> None:
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
        # Each valid row's number and original, for the key look-ups and the results file.
        self.keep_origin = keep_origin or (tenant is not None and tenant.guards_keys)
        # The column each field of the header stands for (``map_header``), where it is not its name.
        self.header = list(header) if header is not None and list(header) != reader.fields else None
        self.mapped = list(zip(reader.fields or (), self.header or (), strict=False))  # (field, column)
        self.rename = rename
        if self.by_column:
            assert reader.fields is not None
            at = {name: i for i, name in enumerate(self.header or reader.fields)}
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
        if problem is None and self.header is not None:
            values = record.values
            record.values = {to: values[name] for name, to in self.mapped if name in values}
        elif problem is None and self.rename is not None:
            rename = self.rename
            record.values = {rename(name) or name: value for name, value in record.values.items()}
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
