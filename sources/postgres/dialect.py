"""How Dataport speaks PostgreSQL: quoted names and literals, the query dialect that
``sources.sql.compile_query`` compiles with, the session every read runs in, type names.

The sink (``sources.postgres_sink``) and the receipts use the same quoting, dialect and connect
timeout, so these live apart from the reading.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sources.base import Column, SourceError
from sources.sql import Dialect

CONNECT_TIMEOUT_SECONDS = 10

_SESSION = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'iso_8601'; "
    "SET LOCAL extra_float_digits = 1; SET LOCAL standard_conforming_strings = on"
)


def _bind(column: Column, value: Any) -> Any:
    # psycopg adapts date, datetime, bool, int, float and str itself. Date-times from build_query
    # are aware (UTC); a naive one is taken as UTC, like the stored ones (the session is in UTC).
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


POSTGRES = Dialect(
    placeholder="%s",
    contains="strpos({col}, %s) > 0",
    prefix="starts_with({col}, %s)",
    prefix_args=lambda v: (v,),
    ne="{col} IS DISTINCT FROM %s",
    bind=_bind,
    row_id=None,
)

# PostgreSQL types (base type names) → column types; anything else is read as its text.
_PG_TYPES = {
    "int2": "integer", "int4": "integer", "int8": "integer",
    "float4": "float", "float8": "float", "numeric": "float",
    "bool": "boolean", "date": "date", "timestamp": "datetime", "timestamptz": "datetime",
}  # fmt: skip
_TEXT_TYPES = {"text", "varchar", "bpchar", "name", "citext"}
_CASTS = {
    "integer": "bigint", "float": "double precision", "boolean": "boolean", "date": "date",
    "datetime": "timestamptz", "string": "text",
}  # fmt: skip


def quote_ident(name: str) -> str:
    """A quoted identifier, with ``%`` doubled for psycopg's placeholder parsing."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def quote_literal(text: str) -> str:
    """A SQL string literal (standard-conforming strings are on in every session), ``%`` doubled."""
    if "\0" in text:
        raise SourceError(f"a name may not contain a NUL character: {text!r}")
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"
