"""Source → format: the one pipeline behind both the worker and the streaming route.

Yields the file as ``(chunk, rows_in_chunk)`` pairs. A source that can render CSV itself (the
PostgreSQL COPY fast path) does so for CSV; every other case goes through the format's writer.
Because both callers use this function, a streamed file and a worker's file for the same query are
the same bytes. It lives in ``sources/`` because it knows both sides and ``formats/`` sits below
``sources/`` (the PostgreSQL and OpenSearch sources render CSV with ``formats.csv``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from formats import writer_for
from sources.base import Source
from sources.query import Query


async def encode(
    source: Source, query: Query, file_format: str, *, batch_rows: int, formula_guard: bool
) -> AsyncGenerator[tuple[bytes, int], None]:
    # aclosing: when this generator is closed early (cancel, client gone), the source's generator is
    # closed right then, releasing its cursor or scroll, rather than whenever it is collected.
    render_csv = getattr(source, "csv_batches", None)
    if file_format.upper() == "CSV" and render_csv is not None:
        async with aclosing(render_csv(query, batch_rows, formula_guard=formula_guard)) as rendered:
            async for chunk, rows in rendered:
                yield chunk, rows
        return
    writer = writer_for(file_format, query.columns, formula_guard=formula_guard)
    yield writer.begin(), 0
    async with aclosing(source.batches(query, batch_rows)) as batches:
        async for batch in batches:
            yield writer.write(batch), len(batch)
    for chunk in writer.finish():
        yield chunk, 0
