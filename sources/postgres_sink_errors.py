"""PostgreSQL's errors as the import reports them: ``explain`` turns an error of the sink's
transaction into a ``SinkError`` naming the row, column and value where it can (and, for a key
that exists already, whether it is in the table or repeated in the file); ``plain_error`` an error
outside the rows (connecting, inspecting the table). Kept apart from ``sources.postgres_sink``,
which is about the connection, the COPY and the transaction."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

import psycopg
import psycopg.errors as pge

from sources.base import Dataset
from sources.postgres import quote_ident
from sources.sink_base import DuplicateKeyError, SinkError

if TYPE_CHECKING:
    from sources.postgres_sink import PostgresSink

log = logging.getLogger("dataport.sinks.postgres")

# Connection lost, too many connections, server shutting down, serialization failure, deadlock,
# lock not available, system errors: a later try may succeed.
TRANSIENT_STATES = ("08", "53", "57P", "40", "55P03", "58")

_KEY_DETAIL = re.compile(r"Key \((?P<cols>.*)\)=\((?P<vals>.*)\) already exists\.", re.S)
_COPY_LINE = re.compile(r"COPY [^,]*, line (\d+)(?:, column (.*?): (.*))?", re.S)


async def explain(sink: PostgresSink, e: psycopg.Error) -> SinkError:
    """The server's error as a ``SinkError`` naming the row, column and value where it can."""
    ds = sink.dataset
    state = e.sqlstate or ""
    diag = e.diag
    primary = diag.message_primary or str(e).strip().splitlines()[0]
    row = None
    where = ""
    found = _COPY_LINE.search(diag.context or "")
    if found:  # an error in a COPY: "COPY t, line 12, column x: "abc"" (line 1 = the COPY's first row)
        row = sink._copy_first + int(found.group(1)) - 1
        where = f" row {row}" + (f", column '{found.group(2)}'" if found.group(2) else "") + ":"
    which = f"row {row}" if row else "a row"
    if isinstance(e, pge.UniqueViolation):
        return await _duplicate(sink, e, row)
    if isinstance(e, pge.NotNullViolation) and diag.column_name:
        return SinkError(
            f"dataset '{ds.name}': {which} has no value for column '{diag.column_name}', which "
            f"table '{ds.table}' requires",
            row=row,
        )
    if isinstance(e, pge.QueryCanceled):
        return SinkError(
            f"dataset '{ds.name}': the server cancelled the import ({primary}); ask your database "
            f"administrator about statement_timeout",
            row=row,
        )
    if state.startswith(TRANSIENT_STATES) or isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        return SinkError(f"dataset '{ds.name}' could not be written: {primary}", transient=True, row=row)
    detail = f" ({diag.message_detail.strip()})" if diag.message_detail else ""
    return SinkError(f"dataset '{ds.name}':{where} {primary}{detail}", row=row)


async def _duplicate(sink: PostgresSink, e: psycopg.Error, row: int | None) -> SinkError:
    """A unique violation: the key of an existing row (DuplicateKeyError), a key repeated in the
    file (DuplicateKeyError too), or another unique column (SinkError)."""
    ds = sink.dataset
    found = _KEY_DETAIL.search(e.diag.message_detail or "")
    at = f" (row {row})" if row else ""
    if not found:
        return SinkError(f"dataset '{ds.name}': {e.diag.message_primary}{at}", row=row)
    cols = [c.strip().strip('"') for c in found.group("cols").split(", ")]
    values = found.group("vals")
    shown = shown_key(cols, values, {c.name: c.type for c in sink.columns})
    if set(cols) != set(ds.key):
        return SinkError(
            f"dataset '{ds.name}': another row already has {shown}, and table '{ds.table}' allows it only once{at}",
            row=row,
        )
    exists = await _exists(sink, cols, values)
    if exists is False:
        return DuplicateKeyError(
            f"the file has more than one row with {shown}{at}; dataset '{ds.name}' takes one row per key", row=row
        )
    return DuplicateKeyError(
        f"a row with {shown} already exists in dataset '{ds.name}'; import in UPSERT mode to update it{at}", row=row
    )


async def _exists(sink: PostgresSink, cols: list[str], values: str) -> bool | None:
    """Whether the table (as committed) holds the key that the error detail shows; None when
    that cannot be told (a compound key whose text values contain ", ")."""
    from sources.postgres_sink import SESSION

    parts = values.split(", ") if len(cols) > 1 else [values]
    conn = sink._conn
    if len(parts) != len(cols) or conn is None or any(c not in sink._types for c in cols):
        return None
    where = " AND ".join(f"{quote_ident(c)} = %s::{sink._types[c].replace('%', '%%')}" for c in cols)
    try:
        async with asyncio.timeout(10):
            await conn.execute("ROLLBACK")  # this import is lost anyway; look at the table as committed
            await conn.execute(f"BEGIN READ ONLY; {SESSION}")
            cur = await conn.execute(
                f"SELECT EXISTS (SELECT 1 FROM {quote_ident(sink.dataset.table)} WHERE {where})", parts
            )
            answer = await cur.fetchone()
            await conn.execute("ROLLBACK")
    except Exception as e:
        log.info("dataset %s: could not look the duplicate key up (%s)", sink.dataset.name, e)
        return None
    return bool(answer and answer[0])


def shown_key(cols: list[str], values: str, types: dict[str, str]) -> str:
    """The key from an error detail as the other sinks show it: ``id=42``, ``code='A-7'``."""
    parts = values.split(", ") if len(cols) > 1 else [values]
    if len(parts) != len(cols):  # text values with ", " in them: as the server wrote them
        return f"({', '.join(cols)})=({values})"
    shown = [v if types.get(c) in ("integer", "float") else repr(v) for c, v in zip(cols, parts, strict=True)]
    if len(cols) == 1:
        return f"{cols[0]}={shown[0]}"
    return f"({', '.join(cols)})=({', '.join(shown)})"


def plain_error(e: psycopg.Error, dataset: Dataset) -> SinkError:
    """An error outside the rows (connecting, inspecting the table)."""
    state = e.sqlstate or ""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "password authentication failed" in text or "no pg_hba.conf" in text or "does not exist" in text:
        return SinkError(f"dataset '{dataset.name}': cannot connect: {text}")
    if isinstance(e, pge.InsufficientPrivilege):
        return SinkError(
            f"dataset '{dataset.name}': the database user may not write to table '{dataset.table}' ({text})"
        )
    if state.startswith(TRANSIENT_STATES) or isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        return SinkError(f"dataset '{dataset.name}' is unavailable: {text}", transient=True)
    return SinkError(f"dataset '{dataset.name}' could not be written: {text}")
