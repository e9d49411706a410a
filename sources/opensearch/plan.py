"""How a read of an OpenSearch index is planned (``Planning``, a part of ``OpenSearchSource``):
the search body compiled against the index mapping (fetched once per source), the documents per
page, and whether the pages come through a point in time or a scroll.

A read in key order of at most ``PIT_MAX_PAGES`` pages (as the caller's count says) pages through a
point in time, whose pages can be retried; a longer one is one sorted scroll. An export of every
field a document can hold asks for whole documents.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from opensearchpy.exceptions import TransportError

from sources.base import SourceError
from sources.opensearch.dsl import _compile
from sources.opensearch.mapping import Field, _describe_mapping, _source_fields
from sources.opensearch.retries import Requests
from sources.query import Query

MAX_PAGE = 10_000  # index.max_result_window's default
PAGE_CELLS = 200_000  # documents per page x columns: bounds the memory one page takes
# A read in key order of more pages than this is one sorted scroll rather than a point in time with
# search_after: some clusters (osmem) sort every match again for each search_after page, which
# makes a long read quadratic (200,000 documents in pages of 10,000: 21 sorts, ~14 s, against one
# sort and ~1.5 s for a scroll); on a cluster that does not, both cost about the same. A short read
# keeps the point in time, whose pages can be retried.
PIT_MAX_PAGES = 4


def _query_key(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body.get("query"), option=orjson.OPT_SORT_KEYS)


class Planning(Requests):
    """What a read asks for: ``_plan``, and the mapping it compiles the query against."""

    # Set by ``OpenSearchSource``.
    page_rows: int | None
    pit_max_pages: int
    _fields: dict[str, Field] | None
    _source_fields: frozenset[str] | None
    _counted: dict[bytes, tuple[int, bool]]
    count: Callable[..., Awaitable[int]]

    async def _plan(self, query: Query, batch_rows: int) -> tuple[dict[str, Any], bool, int]:
        """How to read ``query``: the search body, whether through a point in time, and how many
        rows the read gives (from the caller's count; at least that many when it was capped)."""
        fields = await self._mapping()
        body, total_order = _compile(query, fields)
        if self._source_fields is not None and self._source_fields <= {c.name for c in query.columns}:
            # The export takes every field a document can hold: a _source filter would drop nothing,
            # and costs the cluster a parse and rewrite of every document (osmem: 3 of 4 seconds
            # for 200,000 narrow documents). Unfiltered, the same cells are looked up by name.
            del body["_source"]
        # Pages larger than a batch save round trips (and, for search_after, the cluster's work per
        # page); the cell budget keeps pages of wide documents as small as a batch.
        size = min(
            MAX_PAGE,
            query.limit or MAX_PAGE,
            self.page_rows or max(batch_rows, PAGE_CELLS // max(1, len(query.columns))),
        )
        body = {**body, "size": size}
        rows = await self._rows_to_read(query, body, size)
        return body, total_order and math.ceil(rows / size) <= self.pit_max_pages, rows

    async def _rows_to_read(self, query: Query, body: dict[str, Any], size: int) -> int:
        """How many rows a read of ``query`` gives, from the caller's count of it (counting now,
        only as far as the answer matters, if there was none)."""
        limit = query.limit
        found, exact = self._counted.get(_query_key(body), (0, False))
        if not exact and (limit is None or found < limit) and found <= self.pit_max_pages * size:
            await self.count(query, cap=self.pit_max_pages * size + 1)
            found, exact = self._counted[_query_key(body)]
        return found if limit is None else min(found, limit)

    async def _mapping(self) -> dict[str, Field]:
        """Where each column lives (a text column's keyword subfield), from the index mapping;
        fetched once per source. Without the right to read mappings, columns are taken as named."""
        if self._fields is None:
            try:
                response = await self._call(
                    f"reading the mapping of index '{self.index}'",
                    lambda: self.client.indices.get_mapping(index=self.index),
                )
            except SourceError as e:
                if not isinstance(e.__cause__, TransportError) or e.__cause__.status_code != 403:
                    raise
                response = {}
            self._fields = {name: where for name, (_, where) in _describe_mapping(response).items()}
            self._source_fields = _source_fields(response) if response else None
        return self._fields
