"""What each valid row of an import does: inserted, updated or unchanged (or, after the look-up,
failed after all), for UPDATE, UPSERT, previews and results files.

``Outcomes.classify`` asks the sink for the stored rows of a batch's keys (``RowSink.stored``) and
sorts the batch's rows:

- a key no stored row has: inserted; refused in UPDATE mode (a row error: UPDATE changes existing
  rows only), and in UPSERT mode when the file lacks a required column (a new row needs it; the
  row error names the missing columns); in an INSERT dry run a key that exists is a row error
  too (the real INSERT would fail the whole import on it);
- a key a stored row has: updated when a cell of the file's columns differs (the changed cells,
  old → new, are kept for the preview's samples), else unchanged;
- a key an earlier row of this file had: updated (it is written over that row).

The counts and the first ``SAMPLES`` rows of each kind make the dry run's preview
(``ImportTask.preview``). With ``results: true`` every row's outcome is kept, one line per
input row in file order (``ResultsFile``: in a local temporary file while the import runs, then
written through ``services.storage``, which may encrypt it, beside the error report).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, Any

import orjson

from formats.csv import CsvWriter
from sources.base import Column, Dataset, Row
from sources.sink_base import describe_key, same_value
from sources.sinks import RowSink
from tasks.services import Services
from workers.import_batches import Batch

INSERTED, UPDATED, UNCHANGED, FAILED = "inserted", "updated", "unchanged", "failed"
# The preview's samples: at most this many rows of each kind.
SAMPLES = 5
RESULTS_COLUMNS = (Column("row", "integer"), Column("outcome"), Column("key"), Column("message"))
# At most this many changed cells of an updated row are listed (in a sample, and in its results line).
SHOWN_CHANGES = 20
# A text cell in a sample is cut after this many characters.
SAMPLE_CHARS = 200


@dataclass
class Preview:
    """A dry run's counts and samples (``ImportPreview`` in the API), kept in the task as JSON."""

    new: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    samples: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"new": [], "updated": [], "unchanged": [], "failed": []}
    )

    def as_json(self) -> str:
        return orjson.dumps(
            {
                "newRows": self.new,
                "updatedRows": self.updated,
                "unchangedRows": self.unchanged,
                "failedRows": self.failed,
                "samples": self.samples,
            }
        ).decode()

    def sample(self, kind: str, entry: dict[str, Any]) -> None:
        if len(self.samples[kind]) < SAMPLES:
            self.samples[kind].append(entry)


class Outcomes:
    """The valid rows' outcomes of one import (module docstring). ``lookup``: whether the stored
    rows are asked for at all (UPDATE always; UPSERT and keyed INSERT dry runs when a preview, a
    results file or a required column the file lacks needs them)."""

    def __init__(
        self,
        dataset: Dataset,
        columns: Sequence[Column],
        mode: str,
        *,
        dry_run: bool,
        results: ResultsFile | None,
        missing_required: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.columns = tuple(columns)
        self.mode = mode
        self.dry_run = dry_run
        self.results = results
        self.missing_required = tuple(missing_required)
        names = [c.name for c in self.columns]
        self.key_at = [names.index(k) for k in dataset.key] if all(k in names for k in dataset.key) else []
        keyed = bool(dataset.key) and bool(self.key_at)
        self.lookup = keyed and (
            mode == "UPDATE"
            or (mode == "UPSERT" and bool(dry_run or results is not None or self.missing_required))
            or (mode == "INSERT" and dry_run)
        )
        self.preview = Preview()
        self.counts = {INSERTED: 0, UPDATED: 0, UNCHANGED: 0}
        self._seen: set[tuple[Any, ...]] = set()  # keys of valid rows earlier in the file

    def _key(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[i] for i in self.key_at)

    def _shown_key(self, row: Row) -> str:
        return describe_key(self.dataset.key, self._key(row)) if self.key_at else ""

    async def classify(self, sink: RowSink, batch: Batch) -> None:
        """Sort ``batch``'s typed rows by what they do; rows refused after the look-up move to its
        failures (and out of its rows)."""
        if not batch.rows:
            return
        assert batch.origin is not None
        stored = await sink.stored(batch.rows)
        refused: list[tuple[int, str, str]] = []  # index, column, reason
        kinds: list[tuple[str, dict[str, tuple[Any, Any]]]] = []
        for n, (row, old) in enumerate(zip(batch.rows, stored, strict=True)):
            key = self._key(row)
            if old is None and key not in self._seen:
                problem = self._new_row_problem(row)
                if problem is not None:
                    refused.append((n, problem[0], problem[1]))
                    kinds.append((FAILED, {}))
                    continue
                kinds.append((INSERTED, {}))
            elif old is None:
                kinds.append((UPDATED, {}))
            elif self.mode == "INSERT":
                refused.append(
                    (
                        n,
                        ", ".join(self.dataset.key),
                        f"a row with {self._shown_key(row)} already exists; an INSERT import fails whole on it "
                        "(import in UPSERT or UPDATE mode to change it)",
                    )
                )
                kinds.append((FAILED, {}))
                continue
            else:
                changes = {
                    c.name: (a, b)
                    for c, a, b in zip(self.columns, old, row, strict=True)
                    if not same_value(a, b) and not _same_float(a, b)
                }
                kinds.append((UPDATED if changes else UNCHANGED, changes))
            self._seen.add(key)
        batch.kinds = [kind for kind, _ in kinds]
        batch.changes = [changes for _, changes in kinds]
        if refused:
            lines = [_line(batch.original_of(n), column, reason) for n, column, reason in refused]
            batch.failures = sorted(batch.failures + lines, key=itemgetter(0))
            batch.drop({n for n, _, _ in refused})

    def _new_row_problem(self, row: Row) -> tuple[str, str] | None:
        """Why a row whose key no stored row has cannot be imported in this mode; None if it can."""
        key = ", ".join(self.dataset.key)
        if self.mode == "UPDATE":
            return key, (
                f"no row with {self._shown_key(row)} exists; UPDATE changes existing rows only "
                "(import in UPSERT mode to add it)"
            )
        if self.mode == "UPSERT" and self.missing_required:
            return ", ".join(self.missing_required), (
                f"no row with {self._shown_key(row)} exists, and a new row needs the required columns "
                f"{', '.join(self.missing_required)}, which the file lacks"
            )
        return None

    async def record(self, batch: Batch) -> None:
        """Count ``batch``'s outcomes (after ``classify``, or without it: every valid row inserted,
        or written in UPSERT/UPDATE mode) into the preview, and its lines into the results file."""
        kinds = batch.kinds if batch.kinds is not None else [self._unlooked] * batch.valid
        failed_rows: dict[int, list[tuple[str, str]]] = {}
        for number, column, reason, _ in batch.failures:
            failed_rows.setdefault(number, []).append((column, reason))
        preview = self.preview
        preview.failed += len(failed_rows)
        for number, errors in failed_rows.items():
            listed = [{"column": c, "reason": _cell(r)} for c, r in errors[:5]]
            preview.sample("failed", {"row": number, "errors": listed})
        lines: list[tuple[int, str, str, str]] = []
        rows = batch.rows if batch.rows else [None] * batch.valid
        for n, (kind, row) in enumerate(zip(kinds, rows, strict=True)):
            self.counts[kind] = self.counts.get(kind, 0) + 1
            changes = batch.changes[n] if batch.changes is not None else {}
            key = self._shown_key(row) if row is not None else ""
            self._sample(kind, n, row, batch, changes)
            if self.results is not None:
                number = batch.number_of(n)
                shown = list(changes)[:SHOWN_CHANGES]
                lines.append((number, kind, key, f"changed: {', '.join(shown)}" if shown else ""))
        if self.results is not None:
            for number, errors in failed_rows.items():
                lines.append((number, FAILED, "", "; ".join(_reason(c, r) for c, r in errors)))
            await self.results.add(sorted(lines, key=itemgetter(0)))

    @property
    def _unlooked(self) -> str:
        return INSERTED if self.mode == "INSERT" else UPDATED

    def _sample(self, kind: str, n: int, row: Row | None, batch: Batch, changes: dict[str, tuple[Any, Any]]) -> None:
        preview = self.preview
        if kind == INSERTED:
            preview.new += 1
            slot = "new"
        elif kind == UPDATED:
            preview.updated += 1
            slot = "updated"
        else:
            preview.unchanged += 1
            slot = "unchanged"
        if row is None or len(preview.samples[slot]) >= SAMPLES or batch.origin is None:
            return
        entry: dict[str, Any] = {"row": batch.number_of(n)}
        if self.key_at:
            entry["key"] = {k: row[i] for k, i in zip(self.dataset.key, self.key_at, strict=True)}
        if kind == INSERTED:
            entry["values"] = {c.name: _cell(v) for c, v in zip(self.columns, row, strict=True)}
        elif kind == UPDATED:
            entry["changes"] = {
                name: {"old": _cell(old), "new": _cell(new)}
                for name, (old, new) in list(changes.items())[:SHOWN_CHANGES]
            }
        preview.sample(slot, entry)

    def summary(self) -> str:
        """``12 new, 30 updated, 5 unchanged`` for the task's final message ('' without a look-up)."""
        if not self.lookup:
            return ""
        c = self.counts
        return f" ({c[INSERTED]:,} new, {c[UPDATED]:,} updated, {c[UNCHANGED]:,} unchanged)"


def _line(origin: tuple[int, str], column: str, reason: str) -> tuple[int, str, str, str]:
    """An error report line (row, column, reason, original) of a row refused after the look-up."""
    return origin[0], column, reason, origin[1]


def _cell(value: Any) -> Any:
    """A cell as a sample shows it: text cut after ``SAMPLE_CHARS`` (the preview lives in the task)."""
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return value[:SAMPLE_CHARS] + "…"
    return value


def _reason(column: str, reason: str) -> str:
    return f"{column}: {reason}" if column else reason


def _same_float(a: Any, b: Any) -> bool:
    """3 and 3.0 in a float column are one value (SQLite keeps 3.0 as 3 in some tables)."""
    return isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and a == b


class ResultsFile:
    """The results file (CSV: row, outcome, key, message; formula-guarded, as people open it in
    spreadsheets). Lines go to a local temporary file while the import runs (as NDJSON, one line a
    row), and to storage at the end: ``complete`` with each line as recorded, or, for an import
    that wrote nothing after all (stopped by maxErrors on a store with transactions), with every
    row that was not already failed marked failed, ``not_written`` saying why."""

    def __init__(self, services: Services, key: str) -> None:
        self.services = services
        self.key = key
        self.spool: IO[bytes] = tempfile.TemporaryFile(prefix="dataport-results-")

    async def add(self, lines: list[tuple[int, str, str, str]]) -> None:
        if lines:
            data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            await asyncio.to_thread(self.spool.write, data)

    async def complete(self, not_written: str | None = None) -> str:
        """Write the file to storage; its key."""
        writer = CsvWriter(RESULTS_COLUMNS, formula_guard=True)
        out = await self.services.storage.open_writer(self.key, "text/csv; charset=utf-8")
        try:
            await out.write(writer.begin())
            for chunk in _chunks(self.spool, not_written):
                await out.write(writer.write(chunk))
            await out.complete()
        except BaseException:
            await out.abort()
            raise
        finally:
            self.close()
        return self.key

    def close(self) -> None:
        self.spool.close()


def _chunks(spool: IO[bytes], not_written: str | None, size: int = 5_000) -> Iterator[list[tuple[Any, ...]]]:
    spool.seek(0)
    chunk: list[tuple[Any, ...]] = []
    fix: Callable[[list[Any]], tuple[Any, ...]] = tuple
    if not_written is not None:

        def fix(line: list[Any]) -> tuple[Any, ...]:
            return tuple(line) if line[1] == FAILED else (line[0], FAILED, line[2], not_written)

    for raw in spool:
        chunk.append(fix(orjson.loads(raw)))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
