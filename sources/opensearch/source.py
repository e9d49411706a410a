"""OpenSearch source: the export query as query DSL, read in one pass (point in time or scroll).

``OpenSearchSource`` is the ``Source`` interface (``sources.base``) over one index; the modules
beside this one do its work, one job each:

- ``dsl``: the query as OpenSearch query DSL, with the semantics of ``sources.sql``;
- ``mapping``: the index mapping as columns, and where each column's filters and sorts look;
- ``plan``: how a read is made: the body, the page size, a point in time or a scroll (``Planning``);
- ``cursors``: the pages, through a point in time with ``search_after`` or a scroll, prefetched
  and released when the read ends, fails or is abandoned (``Cursors``);
- ``retries``: one request, retried while the failure may pass, its answer parsed and digested
  (``Requests``); ``errors``: what a failure means, and a message that says what to change;
- ``client``: opensearch-py made to hand successful answers over as bytes, parsed by orjson;
- ``cells`` and ``decoding``: a page's hits as typed cells, one document at a time (the
  reference) and by column (``PageReader``, msgspec);
- ``rendering``: cells by column as CSV, and pages made into CSV by helper processes.

Speed: the next page is asked for before the current one is handed out (the cluster prepares it
meanwhile); an export of every mapped field asks for whole documents (a ``_source`` filter that
drops nothing costs the cluster a rewrite of each); a page's answer is parsed from its bytes and
converted at once, column by column in C where the cells allow (``PageReader``), with the cyclic
garbage collector paused until the documents are freed; CSV goes to the writer by column
(``csv_batches``), never as row tuples. A CSV read of ``HELPERS_AFTER_CELLS`` cells or more hands
each answer's bytes to helper processes that convert and write it (``RenderedPages``): this
process only fetches, both cores convert while the cluster prepares the next pages.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from opensearchpy import AsyncOpenSearch

import formats.csv as csv_format
from sources.base import Dataset, Row
from sources.helpers import HELPERS
from sources.opensearch.client import _Connection, _SourceSerializer
from sources.opensearch.cursors import Cursors, _Cursor
from sources.opensearch.decoding import PageReader
from sources.opensearch.dsl import _compile
from sources.opensearch.errors import _shard_problem
from sources.opensearch.mapping import Field
from sources.opensearch.plan import PIT_MAX_PAGES, Planning, _query_key
from sources.opensearch.rendering import RenderedPages, csv_of
from sources.opensearch.retries import REQUEST_TIMEOUT_SECONDS, RETRY_DELAYS
from sources.query import Query

# A CSV read of this many cells (documents x columns) or more is converted by helper processes
# (``RenderedPages``). Forked from a running fork server they pay off from about one page of
# 10,000 narrow documents on (measured here); a few pages' worth keeps small reads, and the api's
# streaming route (whose fork server may not be running yet), to one process.
HELPERS_AFTER_CELLS = 500_000


class OpenSearchSource(Planning, Cursors):
    """The ``Source`` protocol over one index: counts and reads planned by ``Planning``, paged by
    ``Cursors``, every request sent through ``Requests``."""

    def __init__(self, dataset: Dataset, settings: Any = None, *, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 timeout: float = REQUEST_TIMEOUT_SECONDS, page_rows: int | None = None,
                 pit_max_pages: int = PIT_MAX_PAGES, helpers_after_cells: int = HELPERS_AFTER_CELLS):  # fmt: skip
        """``page_rows`` fixes the documents per request (default: by a cell budget, at least a
        batch); ``retry_delays`` are the pauses between tries; a read in key order of more than
        ``pit_max_pages`` pages is one sorted scroll instead of a point in time; a CSV read of at
        least ``helpers_after_cells`` cells is converted by helper processes."""
        self.dataset = dataset
        self.page_rows = page_rows
        self.pit_max_pages = pit_max_pages
        self.helpers_after_cells = helpers_after_cells
        self.index = dataset.table
        self.retry_delays = tuple(retry_delays)
        self.timeout = float(settings.opensearch_timeout_seconds if settings is not None else timeout)
        self.client = AsyncOpenSearch(
            hosts=[dataset.url], timeout=self.timeout, max_retries=0, retry_on_status=(),
            serializer=_SourceSerializer(), connection_class=_Connection,
        )  # fmt: skip
        self._fields: dict[str, Field] | None = None
        self._source_fields: frozenset[str] | None = None
        self._cursors: list[_Cursor] = []
        self._pit_supported: bool | None = None
        # The last count of each query (its "query" part as JSON): (documents, exact). Callers count
        # before they read; the read uses it to choose between a point in time and a scroll.
        self._counted: dict[bytes, tuple[int, bool]] = {}

    # -- the protocol

    async def count(self, query: Query, cap: int | None = None) -> int:
        fields = await self._mapping()
        body, _ = _compile(query, fields)
        limits = [n for n in (cap, query.limit) if n is not None]
        track: int | bool = min(limits) if limits else True
        what = f"counting documents in index '{self.index}'"
        response = await self._call(what, lambda: self.client.search(
            index=self.index, body={**({"query": body["query"]} if "query" in body else {}), "size": 0,
                                    "track_total_hits": track},
            params={"filter_path": "hits.total,_shards.failed,_shards.failures,timed_out"},
        ))  # fmt: skip
        problem = _shard_problem(response, what)
        if problem:
            raise problem
        total = (response.get("hits") or {}).get("total")
        found = total.get("value", 0) if isinstance(total, dict) else int(total or 0)
        exact = not isinstance(total, dict) or total.get("relation", "eq") == "eq"
        self._counted[_query_key(body)] = (found, exact)
        return min([found, *limits])

    async def counted(self, query: Query, rows: int) -> None:
        """Take ``rows`` as the count of ``query`` (the caller's, from when the export was
        requested): the read is planned by it (point in time or scroll, helpers or not) without
        counting again."""
        body, _ = _compile(query, await self._mapping())
        self._counted[_query_key(body)] = (rows, True)

    async def batches(self, query: Query, batch_rows: int) -> AsyncGenerator[list[Row], None]:
        width = len(query.columns)
        async with aclosing(self._columns(query, batch_rows)) as pages:
            async for columns, count in pages:
                yield list(zip(*columns, strict=True)) if width else [()] * count

    async def csv_batches(
        self, query: Query, batch_rows: int, *, formula_guard: bool
    ) -> AsyncGenerator[tuple[bytes, int], None]:
        """The query as CSV bytes, exactly as ``CsvWriter.write`` writes ``batches``: ``(header, 0)``
        first, then ``(chunk, rows in chunk)``. The cells go to the writer by column, as they are
        read, instead of being made into row tuples and taken apart again."""
        writer = csv_format.CsvWriter(query.columns, formula_guard=formula_guard)
        yield writer.begin(), 0
        plan = body, pit, rows = await self._plan(query, batch_rows)
        if HELPERS and csv_format.FAST and rows * len(query.columns) >= self.helpers_after_cells:
            rendered = RenderedPages(query.columns, formula_guard)
            helpers = rendered.helpers
            helpers.begin()  # they start while the cluster answers the first request
            try:
                async with aclosing(self._pages(body, pit, query.limit, rendered)) as pages:
                    async for _ in pages:  # each page handed to a helper: take what is done
                        async for chunk in helpers.results():
                            yield chunk
                async for chunk in helpers.results(every=True):
                    yield chunk
            finally:
                helpers.stop()
            return
        async with aclosing(self._columns(query, batch_rows, plan)) as pages:
            async for columns, count in pages:
                yield csv_of(writer, columns, count), count

    async def close(self) -> None:
        for cursor in list(self._cursors):
            await self._release(cursor)
        await self.client.close()

    # -- reading

    async def _columns(self, query: Query, batch_rows: int, plan: tuple[dict[str, Any], bool, int] | None = None,
                       ) -> AsyncGenerator[tuple[list[Sequence[Any]], int], None]:  # fmt: skip
        """The rows as (one sequence of cells per column, rows), at most ``batch_rows`` at a time."""
        body, pit, _ = plan or await self._plan(query, batch_rows)
        batch_rows = max(1, batch_rows)
        async with aclosing(self._pages(body, pit, query.limit, PageReader(query.columns))) as pages:
            async for columns, count in pages:
                assert columns is not None  # (None only from RenderedPages)
                for start in range(0, count, batch_rows):
                    yield [cells[start : start + batch_rows] for cells in columns], min(batch_rows, count - start)
