"""psycopg's errors as source errors that say whether a retry can help (``_translate``), and a data
error (a value that does not cast) explained: the column, and when it can be found, the row
(``_explain``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors as pge
from psycopg.pq import TransactionStatus

from sources.base import Dataset, SourceError, TransientSourceError
from sources.postgres.dialect import _SESSION, POSTGRES, quote_ident
from sources.postgres.fields import Field, column_sql_for, resolve
from sources.query import Query
from sources.sql import scope_condition

if TYPE_CHECKING:
    from sources.postgres.source import PostgresSource

_TRANSIENT_CLASSES = ("08", "53", "57P", "40", "55P03", "58")


def _translate(e: BaseException, dataset: Dataset) -> SourceError:
    """psycopg's error as a source error that says whether a retry can help."""
    name = dataset.name
    if isinstance(e, SourceError):
        return e
    state = getattr(e, "sqlstate", None) or ""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, pge.QueryCanceled):
        return SourceError(
            f"dataset '{name}': the server cancelled the read ({text}); ask your database "
            f"administrator about statement_timeout"
        )
    # A connection lost mid-read can also surface as a client-side error without an SQL state
    # (psycopg's InternalError "received 2 results" when a FETCH's answer is cut off): no server
    # refused anything, so a fresh attempt on a fresh connection can succeed.
    lost = not state and isinstance(e, psycopg.InternalError)
    if state.startswith(_TRANSIENT_CLASSES) or lost or isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        if "password authentication failed" in text or "does not exist" in text or "no pg_hba.conf" in text:
            return SourceError(f"dataset '{name}': cannot connect: {text}")
        return TransientSourceError(f"dataset '{name}' is unavailable: {text}")
    if isinstance(e, pge.UndefinedTable):
        return SourceError(f"dataset '{name}': table '{dataset.table}' does not exist ({text})")
    if isinstance(e, pge.UndefinedColumn):
        return SourceError(
            f"dataset '{name}': a column is missing from table '{dataset.table}' ({text}); "
            f"correct the dataset's columns"
        )
    if isinstance(e, pge.InsufficientPrivilege):
        return SourceError(f"dataset '{name}': the database user may not read table '{dataset.table}' ({text})")
    return SourceError(f"dataset '{name}' could not be read: {text}")


def _bad_value(message: str) -> str | None:
    """The value quoted in a PostgreSQL data error (``…: "abc"``, ``value "1e999" is out of…``)."""
    first, last = message.find('"'), message.rfind('"')
    return message[first + 1 : last] if 0 <= first < last else None


async def _explain(
    source: PostgresSource, conn: psycopg.AsyncConnection, query: Query, e: psycopg.Error
) -> SourceError:
    """A data error (a value that does not cast) names the column and the row if it can."""
    error = _translate(e, source.dataset)
    state = getattr(e, "sqlstate", None) or ""
    if not state.startswith("22") or source._info is None:
        return error
    value = _bad_value(str(e).splitlines()[0])
    seen: dict[str, Field] = {}
    grouped = (f.column for group in query.any_of for f in group)
    used = [*query.columns, *(f.column for f in query.filters), *grouped, *(s.column for s in query.sort)]
    for column in used:
        with contextlib.suppress(SourceError):
            field = resolve(column, source._info)
            if field.needs_cast and field.column.type != "string":
                seen.setdefault(column.name, field)
    candidates = list(seen.values())
    if not candidates:
        return error
    where = ""
    if value is not None and len(candidates) <= 200:
        found = await _find_value(source, conn, candidates, value, query)
        if found is not None:
            field, key = found
            where = f" in the row with {key}" if key else ""
            return SourceError(
                f"dataset '{source.dataset.name}': column '{field.column.name}' holds {value!r}{where}, which is "
                f"not {'an' if field.column.type == 'integer' else 'a'} {field.column.type}. Correct the "
                f"value in the source table, or declare the column as string. ({str(e).splitlines()[0]})"
            )
    if len(candidates) == 1:
        c = candidates[0].column
        return SourceError(
            f"dataset '{source.dataset.name}': column '{c.name}' holds a value that is not "
            f"{'an' if c.type == 'integer' else 'a'} {c.type}: {str(e).splitlines()[0]}"
        )
    names = ", ".join(f"'{f.column.name}'" for f in candidates[:20])
    return SourceError(
        f"dataset '{source.dataset.name}': one of the columns {names} holds a value that does "
        f"not fit its type: {str(e).splitlines()[0]}"
    )


async def _find_value(
    source: PostgresSource, conn: psycopg.AsyncConnection, candidates: list[Field], value: str, query: Query
) -> tuple[Field, str] | None:
    """Which of ``candidates`` holds ``value`` as text, and the key of one such row: a row of the
    query's tenant only, so that a message never names another tenant's row."""
    with contextlib.suppress(Exception):
        if conn.pgconn.transaction_status == TransactionStatus.INERROR:
            await conn.execute("ROLLBACK")
        await conn.execute(f"BEGIN READ ONLY; {_SESSION}; SET LOCAL statement_timeout = '10s'")
        key = [resolve(source.dataset.by_name[k], source.info) for k in source.dataset.key]
        hit = " ".join(f"WHEN {f.raw_sql} = %s THEN {i}" for i, f in enumerate(candidates))
        match = " OR ".join(f"{f.raw_sql} = %s" for f in candidates)
        scoped = "TRUE"
        scope_params: list[Any] = []
        if query.scope is not None:
            scoped, scope_params = scope_condition(query.scope, POSTGRES, column_sql_for(source.info))
        select = ", ".join([f"CASE {hit} END", *(f"({k.raw_sql})::text" for k in key)])
        cur = await conn.execute(
            f"SELECT {select} FROM {quote_ident(source.dataset.table)} WHERE {scoped} AND ({match}) LIMIT 1",
            (*(value,) * len(candidates), *scope_params, *(value,) * len(candidates)),
        )
        row = await cur.fetchone()
        await conn.execute("ROLLBACK")
        if row is not None and row[0] is not None:
            described = ", ".join(f"{k.column.name} = {v}" for k, v in zip(key, row[1:], strict=True))
            return candidates[row[0]], described
    return None
