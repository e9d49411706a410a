"""The PostgreSQL sink's reads of stored rows, on its look-up connection (autocommit; the import's
own connection may be in a COPY), so both see the table as committed:

- ``foreign_rows``: which rows of a batch are keyed like another tenant's stored row (scoped
  imports, ``sources.sink_base``);
- ``stored_rows``: the stored row of each key of a batch, each cell as the PostgreSQL source reads
  it (``Field.out_sql``, in a UTC, ISO-dates session), so it compares with the worker's typed
  cells; the worker tells new, updated and unchanged rows apart with it.

A batch's keys go as arrays (``unnest``), one parameter per key column, whatever the batch size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from sources.base import Row
from sources.postgres import POSTGRES
from sources.postgres.columns import read_table_info
from sources.postgres.fields import resolve
from sources.postgres_sink_errors import plain_error

if TYPE_CHECKING:
    from sources.postgres_sink import PostgresSink

_q = POSTGRES.quote


def _keys_sql(sink: PostgresSink) -> tuple[str, str]:
    """The ``unnest`` of the batch's row numbers and keys as ``f(dataport_n, dataport_k0, …)``, and
    how ``f`` joins the table ``t``."""
    key = sink.dataset.key
    arrays = ", ".join(["%s::bigint[]", *(f"%s::{sink._array_type(k)}" for k in key)])
    names = ", ".join(f"dataport_k{j}" for j in range(len(key)))
    on = " AND ".join(f"t.{_q(k)} = f.dataport_k{j}" for j, k in enumerate(key))
    return f"unnest({arrays}) AS f(dataport_n, {names})", on


def _key_params(sink: PostgresSink, rows: list[Row]) -> list[Any]:
    return [list(range(len(rows))), *([row[i] for row in rows] for i in sink._keys)]


async def foreign_rows(sink: PostgresSink, rows: list[Row]) -> list[int]:
    """``RowSink.foreign_rows`` (the sink checked that the import is guarded)."""
    scope = sink.scope
    assert scope is not None
    lookup = await sink._lookup_connection()
    keys, on = _keys_sql(sink)
    scope_type = sink._types[scope.column].replace("%", "%%")
    sql = (
        f"SELECT DISTINCT f.dataport_n FROM {keys} JOIN {_q(sink.dataset.table)} AS t ON {on} "
        f"WHERE t.{_q(scope.column)} IS DISTINCT FROM %s::{scope_type} ORDER BY f.dataport_n"
    )
    try:
        found = await (await lookup.execute(sql, [*_key_params(sink, rows), scope.value])).fetchall()
    except psycopg.Error as e:
        await sink._drop_lookup()
        raise plain_error(e, sink.dataset) from e
    return [n for (n,) in found]


async def stored_rows(sink: PostgresSink, rows: list[Row]) -> list[Row | None]:
    """``RowSink.stored``: of a scoped import, the tenant's rows only."""
    from sources.postgres_sink import SESSION

    lookup = await sink._lookup_connection()
    keys, on = _keys_sql(sink)
    params = _key_params(sink, rows)
    scoped = ""
    if sink.scope is not None:
        scoped = f" WHERE t.{_q(sink.scope.column)} = %s::{sink._types[sink.scope.column].replace('%', '%%')}"
        params.append(sink.scope.value)
    try:
        await lookup.execute(f"BEGIN READ ONLY; {SESSION}")
        if sink._out_sql is None:
            info = await read_table_info(lookup, sink.dataset)
            sink._out_sql = [resolve(c, info).out_sql.replace("%", "%%") for c in sink.columns]
        cells = ", ".join(sink._out_sql)  # the table's columns, unqualified: f's are named apart
        cursor = await lookup.execute(
            f"SELECT f.dataport_n, {cells} FROM {keys} JOIN {_q(sink.dataset.table)} AS t ON {on}{scoped}", params
        )
        found = await cursor.fetchall()
        await lookup.execute("ROLLBACK")
    except psycopg.Error as e:
        await sink._drop_lookup()
        raise plain_error(e, sink.dataset) from e
    out: list[Row | None] = [None] * len(rows)
    for n, *values in found:
        out[n] = tuple(values)
    return out
