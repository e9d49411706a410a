"""OpenSearch sink: bulk requests, document ids from the key, no transactions.

OpenSearch cannot undo a write, so this sink's guarantee is convergence, not atomicity: every
document's ``_id`` is derived from the dataset's key, so an import that failed half way (or a
worker that died) and is run again writes the same documents under the same ids and ends in the
same state as one clean run. ``rollback()`` cannot remove what was written (it logs how many rows
were sent); ``commit()`` refreshes the index so that an export right after sees every row.

Ids: a single-column key gives the value's text (``42``, ``"A-7"`` → ``A-7``, ``true``); a compound
key gives the JSON array of its values, compact (``[42,"A-7"]``): stable, and unambiguous whatever
the values contain. A row without a value in a key column is refused. Documents indexed by other
means under other ids are not matched. Datasets without a key are refused: with generated ids
every retry of an import (the worker retries transient failures by itself) would add the rows a
second time.

INSERT writes ``create`` operations. A version conflict (409: the id exists) is looked at: the
stored documents are fetched (``mget``) and read the way the source reads them; if the imported
columns hold the same values, the row is already there (a re-run converges); if not,
``DuplicateKeyError`` names the key and the first column that differs. UPSERT writes ``update``
with ``doc_as_upsert``: fields not in the file keep their values, as the SQL UPSERT does; a key
repeated in the file ends with its last row. UPDATE writes ``update`` without it: the worker
refused unknown keys (asking ``stored``, an ``mget`` read as the source reads), and a document
deleted since (404) fails the batch, transient.

Stored values: a column ``a.b`` is the object field ``{"a": {"b": v}}`` (the source flattens it
back); None is an explicit null (UPSERT then clears the field, like SQL's NULL); integers, floats
and booleans as JSON numbers and booleans; dates as ``YYYY-MM-DD`` and date-times as the canonical
ISO text (``2024-01-02T03:04:05.5Z``), which ``date`` fields accept. NaN and ±Infinity have no JSON
form and are refused.

A scoped import (``sink_base.RowScope``) whose key leaves out the scope column is guarded: before
each batch the stored documents of its ids are fetched (``mget``, with their sequence numbers).
A document of another tenant is never written to (``foreign_rows`` told the worker, which refused
those rows; meeting one here fails the batch, transient); UPSERT then updates the tenant's own
documents only ``if_seq_no``/``if_primary_term`` are still those read, and ``create``s the rest, so
no document can change hands between the look and the write: a 409 fails the batch, transient,
and the retried import looks again. A key repeated within a batch is written once, with its last
row. INSERT's conflicts are compared as above, but one with another tenant's document fails the
batch (transient) without naming its values.

Requests are ``client.bulk`` with a body serialised here (orjson), at most ``MAX_BULK_BYTES``
each, rather than ``helpers.async_bulk``: the helpers retry only 429 items, and a request that
times out raises with no way to tell which items got through. Here a request failing with a
connection error, a timeout, 429 or 5xx is sent again whole (safe: ``create`` of a document that
got through comes back as a conflict and is compared; ``update`` is idempotent), and items that
fail with 429 or 5xx are sent again alone; both with the source's backoff (``RETRY_DELAYS``).
Other item failures (a value the mapping refuses) are a ``SinkError`` naming the row, the id and
the reason; the rows before it in the batch are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from opensearchpy import AsyncOpenSearch
from opensearchpy.exceptions import SerializationError, TransportError

from sources.base import Column, Dataset, Row, SourceError
from sources.opensearch import (
    REQUEST_TIMEOUT_SECONDS,
    RETRY_DELAYS,
    OrjsonSerializer,
    explain_error,
    is_transient,
    redact,
)
from sources.opensearch.cells import cell_converter
from sources.opensearch.retries import back_off, gave_up
from sources.receipts import Receipt
from sources.sink_base import (
    DuplicateKeyError,
    RowScope,
    SinkError,
    check_floats,
    check_keys,
    check_scope,
    describe_key,
    guards_keys,
    key_positions,
    same_value,
    scope_position,
)

log = logging.getLogger("dataport.sinks.opensearch")

MAX_BULK_BYTES = 8 * 1024 * 1024  # far below http.max_content_length (100 MB by default)


class OpenSearchSink:
    def __init__(
        self,
        dataset: Dataset,
        columns: tuple[Column, ...],
        mode: str,
        settings: Any = None,
        *,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        scope: RowScope | None = None,
    ):
        self.dataset = dataset
        self.columns = columns
        self.mode = mode
        self.index = dataset.table
        self.rows = 0
        self.retry_delays = tuple(retry_delays)
        timeout = float(settings.opensearch_timeout_seconds if settings is not None else REQUEST_TIMEOUT_SECONDS)
        self.client = AsyncOpenSearch(
            hosts=[dataset.url], timeout=timeout, max_retries=0, retry_on_status=(), serializer=OrjsonSerializer()
        )
        self._keys = key_positions(dataset, columns)
        self._names = [c.name for c in columns]
        self._paths = [tuple(c.name.split(".")) for c in columns]
        self._nested = any(len(p) > 1 for p in self._paths)
        self._read = cell_converter(columns)
        self.scope = scope
        self._scope_at = scope_position(dataset, columns, scope)
        self._guard = guards_keys(dataset, scope)  # another tenant's document may hold a key of the file
        self._read_scope = cell_converter((columns[self._scope_at],)) if self._scope_at is not None else None
        self._done = False
        self._failed: str | None = None

    @classmethod
    async def open(
        cls, dataset: Dataset, columns: tuple[Column, ...], mode: str, settings: Any, **options: Any
    ) -> OpenSearchSink:
        if not dataset.key:
            raise SinkError(
                f"dataset '{dataset.name}' has no key: OpenSearch imports derive document ids from the "
                f"key, so that a retried import does not add its rows twice; set `key` in the datasets "
                f"file"
            )
        missing = [k for k in dataset.key if k not in {c.name for c in columns}]
        if missing:
            raise SinkError(
                f"dataset '{dataset.name}': the file has no column '{missing[0]}', which is part of the "
                f"key ({', '.join(dataset.key)}) that document ids are made from"
            )
        paths = {c.name for c in columns}
        for c in columns:
            parts = c.name.split(".")
            for i in range(1, len(parts)):
                if ".".join(parts[:i]) in paths:
                    raise SinkError(
                        f"dataset '{dataset.name}': columns '{'.'.join(parts[:i])}' and '{c.name}' "
                        f"cannot both be written: the first would be a value and an object at once"
                    )
        sink = cls(dataset, columns, mode, settings, **options)
        try:
            exists = await sink._call(
                f"checking index '{sink.index}'", lambda: sink.client.indices.exists(index=sink.index)
            )
            if not exists:
                raise SinkError(
                    f"dataset '{dataset.name}': index '{sink.index}' does not exist at "
                    f"{redact(dataset.url)}; create it (with its mapping) first"
                )
        except BaseException:
            await sink.client.close()
            raise
        return sink

    # -- the protocol

    async def write(self, rows: list[Row]) -> None:
        self._check_open()
        if not rows:
            return
        first = self.rows + 1
        count = len(rows)
        try:
            check_keys(self.dataset, self.columns, self._keys, rows, first)
            check_scope(self.dataset, self.columns, self._scope_at, self.scope, rows, first)
            check_floats(self.dataset, self.columns, rows, first, "OpenSearch", infinite=True)
            ids = [self._id(row) for row in rows]
            if self._guard:
                rows, ids, lines, first_of = await self._guarded_lines(rows, ids, first)
            else:
                lines, first_of = self._lines(rows, ids), None
            conflicts: list[int] = []
            start = 0
            while start < len(rows):  # one bulk request per MAX_BULK_BYTES of body
                stop, size = start, 0
                while stop < len(rows) and (stop == start or size + len(lines[stop]) <= MAX_BULK_BYTES):
                    size += len(lines[stop])
                    stop += 1
                conflicts += await self._bulk(list(range(start, stop)), lines, ids, first, first_of)
                start = stop
            if conflicts:
                await self._compare(rows, ids, conflicts, first, first_of)
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}".strip()
            raise
        self.rows += count

    async def foreign_rows(self, rows: list[Row]) -> list[int]:
        """``RowSink.foreign_rows``: the indexes of ``rows`` whose document is another tenant's."""
        self._check_open()
        if not self._guard or not rows:
            return []
        ids = [self._id(row) for row in rows]
        stored = await self._stored(ids)
        return [n for n, i in enumerate(ids) if i in stored and stored[i][0] is not None]

    async def stored(self, rows: list[Row]) -> list[Row | None]:
        """``RowSink.stored``: the documents of the rows' ids (``mget``), read as the source reads
        them; of a scoped import, the tenant's own only."""
        self._check_open()
        if not rows:
            return []
        ids = [self._id(row) for row in rows]
        response = await self._call(
            f"reading existing documents of index '{self.index}'",
            lambda: self.client.mget(
                index=self.index, body={"ids": sorted(set(ids))}, params={"_source_includes": ",".join(self._names)}
            ),
        )
        found: dict[str, Row] = {}
        for doc in response.get("docs") or []:
            if doc.get("found"):
                with contextlib.suppress(SourceError):  # a document the source cannot read: not matched
                    found[str(doc.get("_id"))] = self._read([doc])[0]
        at, scope = self._scope_at, self.scope
        out: list[Row | None] = [found.get(i) for i in ids]
        if at is not None and scope is not None:
            out = [row if row is not None and same_value(row[at], scope.value) else None for row in out]
        return out

    async def _stored(self, ids: list[str]) -> dict[str, tuple[str | None, int, int]]:
        """The documents of ``ids`` that exist: id → (why it is another tenant's, else None;
        its ``_seq_no``; its ``_primary_term``)."""
        assert self.scope is not None and self._read_scope is not None
        column = self.scope.column
        response = await self._call(
            f"reading existing documents of index '{self.index}'",
            lambda: self.client.mget(
                index=self.index, body={"ids": sorted(set(ids))}, params={"_source_includes": column}
            ),
        )
        found: dict[str, tuple[str | None, int, int]] = {}
        for doc in response.get("docs") or []:
            if not doc.get("found"):
                continue
            try:
                value = self._read_scope([doc])[0][0]
            except SourceError:
                value = None
            other = None if same_value(value, self.scope.value) else f"belongs to another tenant (column '{column}')"
            found[str(doc.get("_id"))] = (other, int(doc.get("_seq_no", -1)), int(doc.get("_primary_term", -1)))
        return found

    async def _guarded_lines(
        self, rows: list[Row], ids: list[str], first: int
    ) -> tuple[list[Row], list[str], list[bytes], list[int]]:
        """A guarded batch (module docstring): the rows to send (each id once, its last row), their
        ids, their bulk lines, and each one's number in the batch (0-based)."""
        if self.mode == "UPSERT":  # one update per id and batch: a second would meet a new _seq_no
            numbers = sorted({i: n for n, i in enumerate(ids)}.values())
        else:  # INSERT: a repeated key meets its first row's document and is compared
            numbers = list(range(len(ids)))
        rows, ids = [rows[n] for n in numbers], [ids[n] for n in numbers]
        stored = await self._stored(ids)
        dumps = orjson.dumps
        lines = []
        for n, i, row in zip(numbers, ids, rows, strict=True):
            other, seq_no, term = stored.get(i, (None, -1, -1))
            if other is not None:
                raise SinkError(
                    f"dataset '{self.dataset.name}': row {first + n} is keyed like a document that "
                    "belongs to another tenant; run the import again",
                    transient=True,
                    row=first + n,
                )
            if seq_no < 0 and self.mode == "UPDATE":
                raise SinkError(
                    f"dataset '{self.dataset.name}': the row to update of row {first + n} was deleted while the "
                    "import ran; run it again",
                    transient=True,
                    row=first + n,
                )
            if self.mode == "INSERT" or seq_no < 0:
                lines.append(b'{"create":{"_id":%b}}\n%b\n' % (dumps(i), dumps(self._doc(row))))
            else:
                action = {"update": {"_id": i, "if_seq_no": seq_no, "if_primary_term": term}}
                lines.append(b'%b\n{"doc":%b}\n' % (dumps(action), dumps(self._doc(row))))
        return rows, ids, lines, numbers

    async def commit(self, receipt: Receipt | None = None) -> int:
        """``receipt`` is not kept: a re-run converges on the same documents (module docstring)."""
        self._check_open()
        await self._call(f"refreshing index '{self.index}'", lambda: self.client.indices.refresh(index=self.index))
        self._done = True
        await self.client.close()
        return self.rows

    async def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        if self.rows:
            log.warning(
                "dataset %s: rollback cannot remove the %d rows already written to index '%s'; running the "
                "import again converges on the same documents",
                self.dataset.name,
                self.rows,
                self.index,
            )

    async def close(self) -> None:
        await self.rollback()
        await self.client.close()

    # -- documents

    def _id(self, row: Row) -> str:
        if len(self._keys) == 1:
            value = row[self._keys[0]]
            return value if value.__class__ is str else orjson.dumps(value).decode()
        return orjson.dumps([row[i] for i in self._keys]).decode()

    def _doc(self, row: Row) -> dict[str, Any]:
        if not self._nested:
            return dict(zip(self._names, row, strict=True))
        doc: dict[str, Any] = {}
        for path, value in zip(self._paths, row, strict=True):
            place = doc
            for part in path[:-1]:
                place = place.setdefault(part, {})
            place[path[-1]] = value
        return doc

    def _lines(self, rows: list[Row], ids: list[str]) -> list[bytes]:
        """Each row's action and source lines of the bulk body."""
        dumps = orjson.dumps
        if self.mode == "INSERT":
            return [
                b'{"create":{"_id":%b}}\n%b\n' % (dumps(i), dumps(self._doc(row)))
                for i, row in zip(ids, rows, strict=True)
            ]
        upsert = b',"doc_as_upsert":true' if self.mode == "UPSERT" else b""  # UPDATE: existing documents only
        return [
            b'{"update":{"_id":%b,"retry_on_conflict":3}}\n{"doc":%b%b}\n' % (dumps(i), dumps(self._doc(row)), upsert)
            for i, row in zip(ids, rows, strict=True)
        ]

    # -- requests

    async def _bulk(
        self, pending: list[int], lines: list[bytes], ids: list[str], first: int, first_of: list[int] | None = None
    ) -> list[int]:
        """Send the rows ``pending`` (indexes into the batch, or into ``first_of``, which then says
        where each is in the batch); retry the items that failed for a passing reason. Returns the
        rows whose ``create`` met an existing id."""
        conflicts: list[int] = []
        what = f"writing to index '{self.index}'"
        for attempt in range(len(self.retry_delays) + 1):
            body = b"".join(lines[i] for i in pending)
            response = await self._call(what, functools.partial(self.client.bulk, body=body, index=self.index))
            items = response.get("items") or []
            if len(items) != len(pending):
                raise SinkError(
                    f"dataset '{self.dataset.name}': OpenSearch answered {len(items)} results for "
                    f"{len(pending)} documents while {what}",
                    transient=True,
                )
            again: list[int] = []
            last_error = ""
            for i, item in zip(pending, items, strict=True):
                result: dict[str, Any] = next(iter(item.values()), {}) or {}
                status = int(result.get("status") or 0)
                if 200 <= status < 300:
                    continue
                error = result.get("error") or {}
                reason = (
                    f"{error.get('type')}: {error.get('reason')}" if isinstance(error, dict) else str(error)
                ) or f"status {status}"
                number = first + (i if first_of is None else first_of[i])
                if status == 409 and self._guard and self.mode == "UPSERT":
                    raise SinkError(
                        f"dataset '{self.dataset.name}': the document of row {number} changed while the "
                        "import wrote it; run the import again",
                        transient=True,
                        row=number,
                    )
                if status == 409 and self.mode == "INSERT":
                    conflicts.append(i)
                elif status == 404 and self.mode == "UPDATE":  # document_missing: deleted since the look-up
                    raise SinkError(
                        f"dataset '{self.dataset.name}': the document of row {number} ('{ids[i]}') was deleted "
                        "while the import ran; run it again",
                        transient=True,
                        row=number,
                    )
                elif status == 429 or status >= 500 or status == 409:  # 409 in UPSERT: concurrent updates
                    again.append(i)
                    last_error = reason
                else:
                    caused = error.get("caused_by") if isinstance(error, dict) else None
                    if isinstance(caused, dict) and caused.get("reason"):
                        reason += f" ({caused.get('reason')})"
                    raise SinkError(
                        f"dataset '{self.dataset.name}': row {number} (document '{ids[i]}') was "
                        f"refused by index '{self.index}': {reason}",
                        row=number,
                    )
            if not again:
                return conflicts
            if attempt == len(self.retry_delays):
                raise SinkError(
                    f"dataset '{self.dataset.name}': {len(again)} documents could not be written to index "
                    f"'{self.index}' after {attempt + 1} tries (last: {last_error}); the cluster may be "
                    f"overloaded",
                    transient=True,
                    row=first + (again[0] if first_of is None else first_of[again[0]]),
                )
            delay = self.retry_delays[attempt] * random.uniform(0.8, 1.2)
            log.info(
                "index '%s': %d documents failed (%s); try %d in %.1f s",
                self.index,
                len(again),
                last_error,
                attempt + 2,
                delay,
            )
            await asyncio.sleep(delay)
            pending = again
        raise AssertionError("unreachable")

    async def _compare(
        self, rows: list[Row], ids: list[str], conflicts: list[int], first: int, first_of: list[int] | None = None
    ) -> None:
        """Rows whose id exists already: fine if the stored document holds the same values in the
        imported columns (a re-run), else ``DuplicateKeyError``; with a guard, a document of another
        tenant (written since the guard looked) fails the batch, transient, naming none of its values."""
        response = await self._call(
            f"reading existing documents of index '{self.index}'",
            lambda: self.client.mget(
                index=self.index,
                body={"ids": [ids[i] for i in conflicts]},
                params={"_source_includes": ",".join(self._names)},
            ),
        )
        docs = response.get("docs") or []
        for i, doc in zip(conflicts, docs, strict=False):
            key = describe_key(self.dataset.key, [rows[i][k] for k in self._keys])
            number = first + (i if first_of is None else first_of[i])
            if not doc.get("found"):  # deleted since the conflict: the import has to run again
                raise SinkError(
                    f"dataset '{self.dataset.name}': the document with {key} changed during the import",
                    transient=True,
                    row=number,
                )
            try:
                stored = self._read([doc])[0]
            except SourceError:
                stored = None
            at, scope = self._scope_at, self.scope
            if at is not None and scope is not None and (stored is None or not same_value(stored[at], scope.value)):
                raise SinkError(
                    f"dataset '{self.dataset.name}': row {number} is keyed like a document that belongs "
                    "to another tenant; run the import again",
                    transient=True,
                    row=number,
                )
            if stored is not None and all(map(_same, stored, rows[i])):
                continue
            difference = ""
            if stored is not None:
                column, old, new = next(
                    (c.name, a, b) for c, a, b in zip(self.columns, stored, rows[i], strict=True) if not _same(a, b)
                )
                difference = f" with {column}={old!r} (the file has {new!r})"
            raise DuplicateKeyError(
                f"a row with {key} already exists in dataset '{self.dataset.name}'{difference}; "
                f"import in UPSERT mode to update it (row {number})",
                row=number,
            )

    async def _call(self, what: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """One request, tried again with backoff while the failure may pass (connection errors,
        timeouts, 429, 5xx)."""
        started = time.monotonic()
        tries = len(self.retry_delays) + 1
        for attempt in range(tries):
            try:
                return await request()
            except TransportError as e:
                if not is_transient(e):
                    raise SinkError(
                        f"dataset '{self.dataset.name}': {explain_error(e, what, self.index, self.dataset.url)}"
                    ) from e
                if attempt == tries - 1:
                    raise SinkError(gave_up(self.dataset.url, what, started, tries, e), transient=True) from e
                await back_off(log, self.index, what, e, attempt, self.retry_delays)
            except SerializationError as e:
                raise SinkError(f"OpenSearch sent an answer that is not JSON while {what}: {e}") from e
        raise AssertionError("unreachable")

    def _check_open(self) -> None:
        if self._done:
            raise SinkError(f"dataset '{self.dataset.name}': this import was already committed or rolled back")
        if self._failed:
            raise SinkError(
                f"dataset '{self.dataset.name}': an earlier write of this import failed "
                f"({self._failed}); run the import again"
            )


_same = same_value  # equal as an export shows them
