"""``GET /exports/stream``: small exports straight from the source to the response.

The same auth, the same compiled query and the same pipeline as the worker, so a streamed file
equals the worker's file for the same query. Everything that can be refused is refused before the
first byte: a bad token (401), too many requests (429), bad input (400), more rows than the
dataset's ``stream_max_rows`` (413, pointing to ``requestExport``), more open streams than the
user's share (429) or the api's (503), each 429/503 with ``Retry-After``.

``anyOf=N:field:op:value`` (repeatable) adds filter groups: the filters of one number N form a
group, and rows match every ``filter`` and at least one whole group (``sources.query``).
``compression=gzip|zstd`` sends the file compressed, named ``….csv.gz`` / ``….csv.zst`` and typed
``application/gzip`` / ``application/zstd``, without a ``Content-Encoding``: the client saves the
compressed file. The download's name follows ``tasks.file_names`` (the time is the request's).

Once it runs, a stream holds a slot (``api.stream_slots``) and a source read; a client that reads
nothing for ``stream_idle_timeout_seconds`` is dropped and both are freed
(``api.stream_response``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import Gauge
from redis.exceptions import RedisError

from api.auth import AuthError
from api.ratelimit import retry_after
from api.stream_response import IdleTimeoutStreamingResponse
from api.stream_slots import RETRY_AFTER_SECONDS, NoSlot, take_slot
from audit.records import ACCESS_DENIED, EXPORT_STREAMED, RATE_LIMITED
from dataport import errors
from dataport.errors import UserError, UserErrors
from formats import WRITERS
from formats.compression import compressed, compression_for
from sources.base import SourceError
from sources.pipeline import encode
from sources.query import (
    MAX_FILTERS,
    QueryTooComplex,
    build_query,
    parse_any_of_text,
    parse_filter_text,
    parse_limit_text,
    parse_sort_text,
    shown,
)
from storage import content_disposition
from tasks.access import readable, scope_value
from tasks.exports import denied_dataset
from tasks.file_names import checked_label, make_file_name
from tasks.models import now
from tasks.services import Services

STREAM_FORMATS = ("CSV", "JSON", "NDJSON")
# Rows per read: what a stream holds while its client is slow is a few batches, so they are small.
STREAM_BATCH_ROWS = 200

READS_IN_PROGRESS = Gauge("dataport_stream_reads_in_progress", "Streaming-route reads holding a source open")

router = APIRouter()


def _error(
    status: int, code: str, message: str, field: list[str] | None = None, retry: int | None = None, **extra
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry is not None:
        headers["Retry-After"] = str(retry)
        extra["retryAfterSeconds"] = retry
    body = {"error": {"code": code, "message": message, "field": field, **extra}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _user_errors(problems: list[UserError]) -> JSONResponse:
    first = problems[0]
    return JSONResponse(
        {
            "error": {"code": first.code, "message": first.message, "field": list(first.field or ())},
            "errors": [{"code": p.code, "message": p.message, "field": list(p.field or ())} for p in problems],
        },
        status_code=400,
    )


async def _read_apart(chunks: AsyncGenerator[tuple[bytes, int], None]) -> AsyncIterator[bytes]:
    """The file's chunks, read from the source in a task of their own.

    Starlette stops a response whose client went away by cancelling an anyio scope, and that
    cancellation holds for every later ``await`` in the scope: a source cut off in the middle of a
    request could not then release its cursor, point in time or scroll, which takes a request too.
    Read apart, the source is stopped by one plain task cancellation (as an arq abort stops the
    worker's read) and its clean-up runs to the end. The response closes the source afterwards."""
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


@router.get("/exports/stream")
async def stream_export(
    request: Request,
    dataset: str,
    format: str = "csv",
    columns: str | None = None,
    filter: list[str] = Query(default=[]),
    sort: str | None = None,
    limit: str | None = None,
    any_of: list[str] = Query(default=[], alias="anyOf"),
    compression: str | None = None,
    label: str | None = None,
):
    services: Services = request.app.state.services
    settings = services.settings
    try:
        credentials = await request.app.state.authenticator.authenticate(request.headers.get("authorization"))
    except AuthError as e:
        await services.audit.record(ACCESS_DENIED, reason="UNAUTHENTICATED", route="/exports/stream")
        return _error(401, "UNAUTHENTICATED", str(e))
    owner = credentials.owner
    client = request.client.host if request.client else "unknown"
    for limited, who, per_minute in (
        ("user", owner.id, settings.stream_rate_per_user),
        ("ip", client, settings.stream_rate_per_ip),
    ):
        wait = await retry_after(services.redis, f"stream:{limited}", who, per_minute)
        if wait is not None:
            await services.audit.record(RATE_LIMITED, credentials.identity, limit=f"stream:{limited}", dataset=dataset)
            return _error(429, errors.RATE_LIMITED, f"Too many streaming requests; try again in {wait} s.", retry=wait)

    file_format = format.upper()
    if file_format not in STREAM_FORMATS:
        return _error(
            400,
            errors.UNSUPPORTED_FORMAT,
            f"format must be csv, json or ndjson, not '{shown(format)}'; XLSX and PARQUET need requestExport.",
            ["format"],
        )
    try:
        packing = compression_for(compression)
    except KeyError:
        return _error(
            400,
            errors.UNSUPPORTED_FORMAT,
            f"compression must be gzip, zstd or none, not '{shown(compression)}'.",
            ["compression"],
        )
    try:
        name_label = checked_label(label)
    except UserErrors as e:
        return _error(400, errors.INVALID_LABEL, e.errors[0].message, ["label"])
    ds = readable(services.registry.get(dataset), credentials.identity)  # unreadable: as if missing
    if ds is None:
        await denied_dataset(services, credentials.identity, dataset, "stream")
        return _error(404, errors.DATASET_NOT_FOUND, f"There is no dataset '{shown(dataset)}'.", ["dataset"])
    if len(filter) > MAX_FILTERS:
        return _error(
            400,
            errors.TOO_MANY_VALUES,
            f"At most {MAX_FILTERS} filters can be given, not {len(filter):,}; use in: for a list of values.",
            ["filter"],
        )
    try:
        filters = [parse_filter_text(f) for f in filter]
    except ValueError as e:
        return _error(400, errors.INVALID_FILTER_VALUE, str(e), ["filter"])
    if len(any_of) > MAX_FILTERS:
        return _error(
            400,
            errors.TOO_MANY_VALUES,
            f"At most {MAX_FILTERS} anyOf filters can be given, not {len(any_of):,}.",
            ["anyOf"],
        )
    try:
        groups = parse_any_of_text(any_of)
    except ValueError as e:
        return _error(400, errors.INVALID_FILTER_VALUE, str(e), ["anyOf"])
    try:
        rows = parse_limit_text(limit) if limit is not None else None
    except ValueError as e:
        return _error(400, errors.INVALID_LIMIT, str(e), ["limit"])
    try:
        query = build_query(
            ds,
            columns.split(",") if columns else None,
            filters,
            parse_sort_text(sort) if sort else None,
            rows,
            path=("query",),
            scope=scope_value(credentials.identity, ds),
            any_of=groups,
        )
    except UserErrors as e:
        return _user_errors(e.errors)

    try:
        slot = await take_slot(
            services.redis,
            settings.queue_name,
            owner.id,
            settings.stream_concurrency_per_user,
            settings.stream_concurrency,
        )
    except NoSlot as e:
        if e.scope == "user":
            return _error(
                429,
                errors.RATE_LIMITED,
                f"You have {settings.stream_concurrency_per_user} streams open, the most at once; "
                f"finish one, or try again in {RETRY_AFTER_SECONDS} s.",
                retry=RETRY_AFTER_SECONDS,
            )
        return _error(
            503,
            errors.SERVICE_UNAVAILABLE,
            f"The api is streaming as much as it can; try again in {RETRY_AFTER_SECONDS} s.",
            retry=RETRY_AFTER_SECONDS,
        )
    except RedisError:
        return _error(
            503,
            errors.SERVICE_UNAVAILABLE,
            "Streams cannot be counted right now; try again soon.",
            retry=RETRY_AFTER_SECONDS,
        )

    source = services.registry.open(ds)
    READS_IN_PROGRESS.inc()

    async def close() -> None:
        try:
            await source.close()
        finally:
            READS_IN_PROGRESS.dec()
            await slot.release()

    try:
        matching = await source.count(query, cap=ds.stream_max_rows + 1)
    except QueryTooComplex as e:
        await close()
        return _error(400, errors.TOO_MANY_VALUES, f"The filters are too complex for this dataset: {e}", ["filter"])
    except SourceError as e:
        await close()
        return _error(503, errors.SOURCE_UNAVAILABLE, f"The dataset cannot be read right now: {e}")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await close()
        raise
    if matching > ds.stream_max_rows:
        await close()
        return _error(
            413,
            errors.TOO_MANY_ROWS,
            f"More than {ds.stream_max_rows:,} rows match, the most this route streams. Narrow the filters, set "
            f"a limit, or ask for a background export with the requestExport mutation.",
            maxRows=ds.stream_max_rows,
            use="requestExport",
        )

    chunks = compressed(
        encode(
            source,
            query,
            file_format,
            batch_rows=min(settings.batch_rows, STREAM_BATCH_ROWS),
            formula_guard=settings.csv_formula_guard,
        ),
        packing,
    )

    writer = WRITERS[file_format]
    await services.audit.record(
        EXPORT_STREAMED,
        credentials.identity,
        dataset=ds.name,
        format=file_format,
        rows=matching,
        query=dict(request.query_params),
    )
    return IdleTimeoutStreamingResponse(
        _read_apart(chunks),
        idle_timeout=settings.stream_idle_timeout_seconds,
        on_close=close,
        # A compressed file is sent as the file it is (application/gzip, .gz), never with a
        # Content-Encoding a client would undo on the way (docs/api.md, "Compression").
        media_type=packing.content_type or writer.content_type,
        headers={
            "Content-Disposition": content_disposition(
                make_file_name(ds.name, now(), file_format, packing.name, name_label)
            )
        },
    )
