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
repeated in the file ends with its last row.

Stored values: a column ``a.b`` is the object field ``{"a": {"b": v}}`` (the source flattens it
back); None is an explicit null (UPSERT then clears the field, like SQL's NULL); integers, floats
and booleans as JSON numbers and booleans; dates as ``YYYY-MM-DD`` and date-times as the canonical
ISO text (``2024-01-02T03:04:05.5Z``), which ``date`` fields accept. NaN and ±Infinity have no JSON
form and are refused.

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
    error_reason,
    explain_error,
    is_transient,
    redact,
)
from sources.opensearch.cells import cell_converter
from sources.receipts import Receipt
from sources.sink_base import DuplicateKeyError, SinkError, check_floats, check_keys, describe_key, key_positions

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
        try:
            check_keys(self.dataset, self.columns, self._keys, rows, first)
            check_floats(self.dataset, self.columns, rows, first, "OpenSearch", infinite=True)
            ids = [self._id(row) for row in rows]
            lines = self._lines(rows, ids)
            conflicts: list[int] = []
            start = 0
            while start < len(rows):  # one bulk request per MAX_BULK_BYTES of body
                stop, size = start, 0
                while stop < len(rows) and (stop == start or size + len(lines[stop]) <= MAX_BULK_BYTES):
                    size += len(lines[stop])
                    stop += 1
                conflicts += await self._bulk(list(range(start, stop)), lines, ids, first)
                start = stop
            if conflicts:
                await self._compare(rows, ids, conflicts, first)
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}".strip()
            raise
        self.rows += len(rows)

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
        return [
            b'{"update":{"_id":%b,"retry_on_conflict":3}}\n{"doc":%b,"doc_as_upsert":true}\n'
            % (dumps(i), dumps(self._doc(row)))
            for i, row in zip(ids, rows, strict=True)
        ]

    # -- requests

    async def _bulk(self, pending: list[int], lines: list[bytes], ids: list[str], first: int) -> list[int]:
        """Send the rows ``pending`` (indexes into the batch); retry the items that failed for a
        passing reason. Returns the rows whose ``create`` met an existing id."""
        conflicts: list[int] = []
        what = f"writing to index '{self.index}'"
        for attempt in range(len(self.retry_delays) + 1):
            body = b"".join(lines[i] for i in pending)
            response = await self._call(what, lambda body=body: self.client.bulk(body=body, index=self.index))
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
                result = next(iter(item.values()), {}) or {}
                status = int(result.get("status") or 0)
                if 200 <= status < 300:
                    continue
                error = result.get("error") or {}
                reason = (
                    f"{error.get('type')}: {error.get('reason')}" if isinstance(error, dict) else str(error)
                ) or f"status {status}"
                if status == 409 and self.mode == "INSERT":
                    conflicts.append(i)
                elif status == 429 or status >= 500 or status == 409:  # 409 in UPSERT: concurrent updates
                    again.append(i)
                    last_error = reason
                else:
                    caused = error.get("caused_by") if isinstance(error, dict) else None
                    if isinstance(caused, dict) and caused.get("reason"):
                        reason += f" ({caused.get('reason')})"
                    raise SinkError(
                        f"dataset '{self.dataset.name}': row {first + i} (document '{ids[i]}') was "
                        f"refused by index '{self.index}': {reason}",
                        row=first + i,
                    )
            if not again:
                return conflicts
            if attempt == len(self.retry_delays):
                raise SinkError(
                    f"dataset '{self.dataset.name}': {len(again)} documents could not be written to index "
                    f"'{self.index}' after {attempt + 1} tries (last: {last_error}); the cluster may be "
                    f"overloaded",
                    transient=True,
                    row=first + again[0],
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

    async def _compare(self, rows: list[Row], ids: list[str], conflicts: list[int], first: int) -> None:
        """Rows whose id exists already: fine if the stored document holds the same values in the
        imported columns (a re-run), else ``DuplicateKeyError``."""
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
            if not doc.get("found"):  # deleted since the conflict: the import has to run again
                raise SinkError(
                    f"dataset '{self.dataset.name}': the document with {key} changed during the import",
                    transient=True,
                    row=first + i,
                )
            try:
                stored = self._read([doc])[0]
            except SourceError:
                stored = None
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
                f"import in UPSERT mode to update it (row {first + i})",
                row=first + i,
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
                    raise SinkError(
                        f"OpenSearch at {redact(self.dataset.url)} failed {tries} times while {what} over "
                        f"{time.monotonic() - started:.1f} s (last: {e.status_code} {error_reason(e)}); it may be "
                        f"overloaded or down.",
                        transient=True,
                    ) from e
                delay = self.retry_delays[attempt] * random.uniform(0.8, 1.2)
                log.info(
                    "index '%s': %s failed (%s %s); try %d of %d in %.1f s",
                    self.index,
                    what,
                    e.status_code,
                    error_reason(e),
                    attempt + 2,
                    tries,
                    delay,
                )
                await asyncio.sleep(delay)
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


def _same(stored: Any, written: Any) -> bool:
    """Equal as an export shows them: True is not 1, None is nothing else; 3 equals 3.0."""
    if stored is None or written is None or stored.__class__ is bool or written.__class__ is bool:
        return stored is written
    return stored == written
