"""``GET /exports/stream``: small exports straight from the source to the response.

The same auth, the same compiled query and the same pipeline as the worker, so a streamed file
equals the worker's file for the same query. Everything that can be refused is refused before the
first byte: a bad token (401), too many requests (429), bad input (400), more rows than the
dataset's ``stream_max_rows`` (413, pointing to ``requestExport``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Gauge

from api.auth import AuthError, owner_from_header
from api.ratelimit import retry_after
from dataport import errors
from dataport.errors import UserError, UserErrors
from dataport.services import Services
from formats import WRITERS
from formats.pipeline import encode
from sources.base import Source, SourceError
from sources.query import build_query, parse_filter_text, parse_sort_text
from storage import content_disposition

STREAM_FORMATS = ("CSV", "JSON", "NDJSON")

READS_IN_PROGRESS = Gauge("dataport_stream_reads_in_progress", "Streaming-route reads holding a source open")

router = APIRouter()


def _error(status: int, code: str, message: str, field: list[str] | None = None, **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"code": code, "message": message, "field": field, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


def _user_errors(problems: list[UserError]) -> JSONResponse:
    first = problems[0]
    return JSONResponse(
        {"error": {"code": first.code, "message": first.message, "field": list(first.field or ())},
         "errors": [{"code": p.code, "message": p.message, "field": list(p.field or ())} for p in problems]},
        status_code=400,
    )


async def _read_apart(chunks: AsyncIterator[tuple[bytes, int]], source: Source) -> AsyncIterator[bytes]:
    """The file's chunks, read from the source in a task of their own.

    Starlette stops a response whose client went away by cancelling an anyio scope, and that
    cancellation holds for every later ``await`` in the scope: a source cut off in the middle of a
    request could not then release its cursor, point in time or scroll, which takes a request too.
    Read apart, the source is stopped by one plain task cancellation (as an arq abort stops the
    worker's read) and its clean-up runs to the end."""
    handoff: asyncio.Queue = asyncio.Queue(maxsize=1)
    done = object()

    async def read() -> None:
        try:
            async with aclosing(chunks):
                async for chunk, _ in chunks:
                    await handoff.put(chunk)
            await handoff.put(done)
        except Exception as e:  # handed to the response, which fails the stream
            await handoff.put(e)

    reader = asyncio.create_task(read())
    READS_IN_PROGRESS.inc()
    try:
        while (item := await handoff.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await source.close()
            READS_IN_PROGRESS.dec()


@router.get("/exports/stream")
async def stream_export(
    request: Request,
    dataset: str,
    format: str = "csv",
    columns: str | None = None,
    filter: list[str] = Query(default=[]),
    sort: str | None = None,
    limit: int | None = None,
):
    services: Services = request.app.state.services
    settings = services.settings
    try:
        owner = owner_from_header(settings, request.headers.get("authorization"))
    except AuthError as e:
        return _error(401, "UNAUTHENTICATED", str(e))
    client = request.client.host if request.client else "unknown"
    for scope, identity, per_minute in (("user", owner.id, settings.stream_rate_per_user),
                                        ("ip", client, settings.stream_rate_per_ip)):
        wait = await retry_after(services.redis, f"stream:{scope}", identity, per_minute)
        if wait is not None:
            response = _error(429, "RATE_LIMITED", f"Too many streaming requests; try again in {wait} s.")
            response.headers["Retry-After"] = str(wait)
            return response

    file_format = format.upper()
    if file_format not in STREAM_FORMATS:
        return _error(400, errors.UNSUPPORTED_FORMAT,
                      f"format must be csv, json or ndjson, not '{format}'; XLSX needs requestExport.", ["format"])
    ds = services.registry.get(dataset)
    if ds is None:
        return _error(404, errors.DATASET_NOT_FOUND, f"There is no dataset '{dataset}'.", ["dataset"])
    try:
        filters = [parse_filter_text(f) for f in filter]
    except ValueError as e:
        return _error(400, errors.INVALID_FILTER_VALUE, str(e), ["filter"])
    try:
        query = build_query(ds, columns.split(",") if columns else None, filters,
                            parse_sort_text(sort) if sort else None, limit, path=("query",))
    except UserErrors as e:
        return _user_errors(e.errors)

    source = services.registry.open(ds)
    try:
        matching = await source.count(query, cap=ds.stream_max_rows + 1)
    except SourceError as e:
        await source.close()
        return _error(503, errors.SOURCE_UNAVAILABLE, f"The dataset cannot be read right now: {e}")
    if matching > ds.stream_max_rows:
        await source.close()
        return _error(
            413, errors.TOO_MANY_ROWS,
            f"More than {ds.stream_max_rows:,} rows match, the most this route streams. Narrow the filters, set "
            f"a limit, or ask for a background export with the requestExport mutation.",
            maxRows=ds.stream_max_rows, use="requestExport",
        )

    chunks = encode(source, query, file_format, batch_rows=settings.batch_rows,
                    formula_guard=settings.csv_formula_guard)

    writer = WRITERS[file_format]
    return StreamingResponse(
        _read_apart(chunks, source), media_type=writer.content_type,
        headers={"Content-Disposition": content_disposition(f"{ds.name}.{writer.extension}")},
    )
