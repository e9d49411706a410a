"""The pages of a read of an OpenSearch index, through a point in time with ``search_after`` or
through a scroll (``Cursors``, a part of ``OpenSearchSource``).

Reading: with a total order (the dataset has a key) a short read (at most ``PIT_MAX_PAGES`` pages,
as the caller's count says) opens a point in time and pages with ``search_after``; a longer one is
one scroll sorted the same way (some clusters sort every match again for each ``search_after``
page). A cluster without point-in-time support, or a dataset without a key (whose sort values
need not be unique), is read with one scroll, sorted by ``_doc`` unless a sort is asked for. The
point in time or scroll is released when the read ends, fails or is abandoned (the generator is
closed, the task cancelled), and ``close()`` releases whatever is still open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from opensearchpy.exceptions import SerializationError, TransportError

from sources.base import SourceError, TransientSourceError
from sources.opensearch.cells import BadCell
from sources.opensearch.decoding import PageReader
from sources.opensearch.errors import _error_type, _shard_problem
from sources.opensearch.rendering import RenderedPages
from sources.opensearch.retries import Requests

log = logging.getLogger("dataport.sources.opensearch")

RELEASE_TIMEOUT_SECONDS = 1.0  # a point in time or scroll is given up within this
KEEP_ALIVE = "5m"  # between two pages; renewed by every page


# A page as _digest makes it: the cells by column (None from RenderedPages, whose chunks the
# helpers hand on), the rows, the last hit's sort values.
_Page = tuple[list[Sequence[Any]] | None, int, list[Any] | None]


@dataclass(eq=False)
class _Cursor:
    kind: str  # "pit" | "scroll"
    id: str


class Cursors(Requests):
    """Pages through a point in time or a scroll: ``_pages``, and the cursors it opens and releases."""

    # Set by ``OpenSearchSource``.
    _cursors: list[_Cursor]
    _pit_supported: bool | None

    async def _pages(self, body: dict[str, Any], pit: bool, limit: int | None,
                     read: PageReader | RenderedPages,
                     ) -> AsyncGenerator[tuple[list[Sequence[Any]] | None, int], None]:  # fmt: skip
        """The pages as (what ``read`` made of the hits, rows), in one pass: cells by column from a
        ``PageReader``, None from ``RenderedPages`` (whose helpers hold the pages' CSV). Through a
        point in time (``pit``, where the cluster has one) or a scroll; released when the read
        ends, fails or is abandoned.

        The request for the next page is sent before a page is handed out, so that the cluster
        prepares it while this process writes the current one; each page is converted as soon as
        it is parsed, so that its documents are freed before the next one arrives."""
        size = body["size"]
        remaining = limit
        cursor = await self._open_pit() if pit else None
        if cursor is not None:
            body = {**body, "track_total_hits": False}  # (a scroll refuses this)
        what = f"reading index '{self.index}'"
        pending: asyncio.Future[_Page] | None = None
        try:
            if cursor is not None:
                page = await self._call(
                    what,
                    partial(self._pit_page, cursor, body, None),
                    digest=partial(self._digest, what, cursor, remaining, read),
                    decode=read.decode,
                )
            else:
                # The scroll's id is taken before the hits are read (a bad cell fails the read), so
                # that the scroll is released all the same.
                scroll: list[_Cursor] = []

                def opened(response: Any) -> Any:  # parsed, or decoded by the reader
                    scroll_id = response.get("_scroll_id") if response.__class__ is dict else response.scroll_id
                    if scroll_id:
                        scroll.append(_Cursor("scroll", scroll_id))
                        self._cursors.append(scroll[0])
                    return self._digest(what, scroll[0] if scroll else None, remaining, read, response)

                try:
                    page = await self._call(
                        what,
                        lambda: self.client.search(index=self.index, body=body, scroll=KEEP_ALIVE),
                        digest=opened,
                        decode=read.decode,
                    )
                finally:
                    cursor = scroll[0] if scroll else None
            while True:
                columns, count, after = page
                if remaining is not None:
                    remaining -= count
                # search_after answers full pages until the end; a scroll, an empty one at the end
                more = count > 0 and remaining != 0 and cursor is not None and (cursor.kind != "pit" or count == size)
                if more:
                    assert cursor is not None
                    pending = asyncio.ensure_future(self._next_page(what, cursor, body, after, remaining, read))
                if count:
                    yield columns, count
                if not more:
                    return
                assert pending is not None
                page = columns = None  # not kept alive while the next page is read
                page = await pending
                pending = None
        finally:
            if pending is not None:  # abandoned (closed, cancelled, failed) with a page asked for
                pending.cancel()
                with suppress(BaseException):
                    await pending
            if cursor is not None:
                await self._release(cursor)

    async def _next_page(self, what: str, cursor: _Cursor, body: dict[str, Any], after: list[Any] | None,
                         remaining: int | None, read: PageReader | RenderedPages,
                         ) -> _Page:  # fmt: skip
        digest = partial(self._digest, what, cursor, remaining, read)
        page: _Page  # what digest makes of the answer (_call reads it again as dicts rather than give None)
        if cursor.kind == "pit":
            page = await self._call(
                what, lambda: self._pit_page(cursor, body, after), digest=digest, decode=read.decode
            )
            return page
        page = await self._call(
            what,
            lambda: self.client.scroll(body={"scroll_id": cursor.id, "scroll": KEEP_ALIVE}),
            replay_safe=False,
            digest=digest,
            decode=read.decode,
        )
        return page

    @staticmethod
    def _digest(what: str, cursor: _Cursor | None, remaining: int | None,
                read: PageReader | RenderedPages, response: Any,
                ) -> _Page | None:  # fmt: skip
        """A page's answer (parsed, or a typed page from ``read.decode``) as (cells by column, rows,
        the last hit's sort values); the cursor takes the id it carries. At most ``remaining`` hits
        are read. None when a typed page holds a cell that does not convert: then the answer is
        read again as dicts, whose error names the document."""
        if response.__class__ is not dict:  # a typed page
            head: Mapping[str, Any] = {
                "_shards": response.shards,
                "timed_out": response.timed_out,
                "pit_id": response.pit_id,
                "_scroll_id": response.scroll_id,
            }
            hits = response.hits.hits if response.hits is not None else []
        else:
            head = response
            hits = (response.get("hits") or {}).get("hits") or []
        problem = _shard_problem(head, what)
        if problem:
            raise problem
        if cursor is not None:
            cursor.id = head.get("pit_id" if cursor.kind == "pit" else "_scroll_id") or cursor.id
        if remaining is not None:
            hits = hits[:remaining]
        after = None
        if hits and cursor is not None and cursor.kind == "pit":
            after = hits[-1]["sort"] if response.__class__ is dict else hits[-1].sort
        try:
            return read.take(response, hits), len(hits), after
        except BadCell:
            return None

    async def _open_pit(self) -> _Cursor | None:
        """A point in time over the index, or None where the cluster has none (it is then read
        with a scroll)."""
        if self._pit_supported is False:
            return None
        try:
            response = await self._call(
                f"opening a point in time on index '{self.index}'",
                lambda: self.client.create_pit(index=self.index, keep_alive=KEEP_ALIVE),
            )
        except TransientSourceError:
            raise
        except SourceError as e:
            cause = e.__cause__
            if isinstance(cause, TransportError) and "index_not_found" in _error_type(cause):
                raise
            log.info("index '%s': no point in time (%s); reading with a scroll", self.index, e)
            self._pit_supported = False
            return None
        self._pit_supported = True
        cursor = _Cursor("pit", response["pit_id"])
        self._cursors.append(cursor)
        return cursor

    def _pit_page(self, cursor: _Cursor, body: dict[str, Any], after: list[Any] | None) -> Awaitable[Any]:
        page = {**body, "pit": {"id": cursor.id, "keep_alive": KEEP_ALIVE}}
        if after is not None:
            page["search_after"] = after
        search: Awaitable[Any] = self.client.search(body=page)  # (opensearch-py's methods return Any)
        return search

    async def _release(self, cursor: _Cursor) -> None:
        """Give the point in time or scroll back to the cluster, within a second; a failure is
        logged (the cluster drops it when its keep-alive ends)."""
        if cursor not in self._cursors:
            return
        self._cursors.remove(cursor)
        if cursor.kind == "pit":
            call = self.client.delete_pit(body={"pit_id": [cursor.id]})
        else:
            call = self.client.clear_scroll(body={"scroll_id": [cursor.id]}, ignore=(404,))
        try:
            await asyncio.wait_for(call, RELEASE_TIMEOUT_SECONDS)
        except (TransportError, SerializationError, TimeoutError, aiohttp.ClientError, RuntimeError) as e:
            log.warning(
                "index '%s': could not release the %s (%s); it expires after %s",
                self.index,
                "point in time" if cursor.kind == "pit" else "scroll",
                e,
                KEEP_ALIVE,
            )
