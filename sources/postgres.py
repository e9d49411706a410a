"""PostgreSQL source: psycopg 3 (async), server-side cursors, JSONB documents as columns.

Reading
    One connection per read. ``batches`` runs in ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY``
    (one snapshot: rows committed by others during the export are not seen) and reads through a
    named server-side cursor, ``FETCH``-ing one batch at a time; the next batch is already asked
    for while the current one is converted and written, so PostgreSQL and Python work at once.
    Memory holds about two batches, and batches of wide rows are made smaller (``_CELLS_PER_BATCH``).
    Closing the generator early, or ``close()``, cancels a statement in flight and closes the
    connection, so the server drops the cursor and the snapshot at once. A large table read in
    key order uses two connections (below), both in one snapshot and both released the same
    way. Session settings are
    ``SET LOCAL`` in that transaction (UTC time zone, ISO dates, shortest exact float text,
    standard-conforming strings), so they also hold behind a transaction-pooling proxy.

Queries
    ``sources.sql.compile_query`` with ``POSTGRES`` and ``column_sql``: identifiers come only from
    the registry and are quoted, every value is bound (the semantics of sources/sql.py: NE and
    NOT_IN keep NULLs, CONTAINS and PREFIX are case-sensitive, NULLs last ascending, the dataset key
    ends every ORDER BY). A dataset without a key is ordered by its sort alone: give PostgreSQL
    datasets a key, or reruns may order ties differently. Text compares and sorts in code-point
    order (``COLLATE "C"``), as in SQLite and OpenSearch, whatever the column's collation; an
    index on a text column helps those filters only if it is built ``COLLATE "C"`` as well.

JSONB documents
    A column ``data.a.b`` whose first segment is a JSONB column of the table is the expression
    ``(("data" #>> ARRAY['a','b'])::<type>)`` (``->>`` for one level), cast to the column's type
    (``double precision``, ``bigint``, ``boolean``, ``date``, ``timestamptz``) so that filters and
    sorts compare typed values: sorting on a JSONB time stamp sorts time stamps, not text. Key names
    come only from the registry and are written as SQL string literals with quotes doubled.
    A value that does not cast (``"abc"`` in a float field) fails the read with a ``SourceError``
    that names the column and, when it can be found, the row. Which top-level columns are JSONB is
    read from ``pg_attribute`` once per source (one cheap query on the first connection).

    PostgreSQL de-TOASTs (decompresses) a large document once per expression that reads it: a
    field costs ~0.1 ms per row on a 2,897-key document, against ~1 µs on a small one. So the
    average stored size of each JSONB column is read with the table's columns (``pg_column_size``
    of 100 rows, nothing decompressed): fields of small documents (< ``SMALL_DOCUMENT_BYTES``) are
    always read in SQL; of a large document, up to ``INLINE_FIELDS``; beyond that the document is
    fetched once as text, parsed with orjson and flattened in Python (``_Extract``, the same typing
    rules as the casts, errors naming row and column); filters and sorts stay in SQL. That is also
    how a dataset wider than a SELECT list (1,664 entries) is read.

CSV fast path (``csv_batches``)
    ``COPY (SELECT …) TO STDOUT WITH (FORMAT csv)``, each cell rendered in SQL the way
    formats/csv.py writes it, so the bytes stay in C from the server to the file:

    - booleans ``true``/``false`` (the cast to text); dates ``YYYY-MM-DD``; date-times as
      ``iso_datetime`` writes them (UTC, ``T``, fractions only when present, ``Z``: for years 1
      to 9999 ``format('%sT%sZ', ts::date, ts::time)`` in a UTC session, otherwise PostgreSQL's
      own ISO text reshaped); NULL an empty field (``batches`` reads dates and date-times this way
      too);
    - floats as ``repr`` writes them: shortest exact text (``extra_float_digits = 1``), integral
      values below 1e16 as ``3.0``; text cells by COPY's RFC 4180 quoting;
    - the formula guard in SQL on text columns, with the writer's exact rule (``'*`` then one of
      ``= + - @ tab CR`` at the start gets one more leading ``'``, so imports can undo it), tested
      only on text that sorts before ``A`` (every trigger does, in byte order); header
      names are guarded too. The header is the Python writer's own (``CsvWriter.begin()``), as
      aliases longer than 63 bytes would be cut by PostgreSQL;
    - PostgreSQL ends a row with ``\\n``; each row arrives as one CopyData message, so its ending is
      replaced by ``\\r\\n`` as the Python writer has it, and rows are counted exactly per message.
      The messages are taken from libpq many at a time (``_copy_rows``), not one ``Copy.read()``
      (an event-loop wait) per row.

    An empty text cell is written as nothing, as the Python writer does (``nullif``: COPY would
    quote it to tell it from NULL). Known differences from the Python writer (the cells parse back
    to the same values): non-integral floats between 1e15 and 1e16, and integral ones in JSONB fields from
    1e15 up, print in exponent form (``1.2345678901234565e+15``); ``NaN``/``Infinity`` against
    ``nan``/``inf``. COPY takes no server-side parameters: psycopg binds the filter values
    client-side as escaped, typed literals (never raw text).

    Two connections (``_key_ranges``, ``_in_turn``): a table of ``SPLIT_BYTES`` or more with a
    single integer key that is never NULL, read in key order without a limit, is read by key
    ranges of about ``RANGE_BYTES`` of table each (a COPY, or a server-side cursor for
    ``batches`` and flattened documents, per range). The first connection exports its snapshot
    (``pg_export_snapshot()``), the second imports it (``SET TRANSACTION SNAPSHOT``), so the file
    is still one snapshot. The connections take the ranges in turn: while one range is handed on
    as it arrives, the next is read on the other connection and held in memory (one range ahead
    at most), so the server renders on both cores. Other reads use one connection. The two
    connections ask for no parallel workers (``max_parallel_workers_per_gather = 0``): PostgreSQL
    planned each range's rendered COPY as a Gather Merge, which on 2 cores cost ~0.9 s more
    server CPU for 1,000,000 rows and made the read ~15 % slower (median of 8 alternating runs,
    4.36 s against 5.12 s on a loaded machine). A read on one connection keeps the planner's choice.
    Documents flattened in Python are read by ranges on the helpers' connections instead (below).

    Measured (2 cores shared with other engineers' test runs, load average 3.5-5; PostgreSQL 15
    on the same machine; 1,000,000 rows × 20 columns, see bench/postgres_export.py): the SQL
    rendering cost 2.0-2.5 s of server time against 1.1-1.2 s for ``psql``'s plain COPY; the
    guard's ``regexp_replace`` on every cell was ~0.45 s of that, reshaping date-time text
    ~0.35 s, the float ``CASE`` and booleans little; now ~1.5 s. Taking the rows from libpq in
    bulk cut this process's CPU from 1.5 s to 0.7 s. ``csv_batches`` alone: 3.4-4.3 s before, 2.3-2.5 s
    with one connection. ``batches`` + ``CsvWriter`` (formats/csv.py) is slower here: 4.9-7.5 s
    (3.3 s of Python CPU, against 0.7 s), as ``FETCH``-ing typed rows leaves the server idle
    while psycopg converts each batch.

    A plan that flattens documents in Python (see above) uses the Python writer inside
    ``csv_batches`` instead: same signature, exact Python output. Its cells go to the writer by
    column (``CsvWriter.render``) rather than as row tuples: a run of float fields of a document
    is handed over as each row's looked-up values, already type-checked, and written by one
    orjson call per batch. 40,000 documents × 2,897 float fields (2 GB of JSON text) took 31-38 s
    (was 117-150 s), CPU-bound in Python: ~20 s of CPU flattening, about half of it orjson
    parsing the documents (~0.1 µs a field, dict building included; an array of the same numbers
    parses in a third of that, but no cheap SQL gives the values in a known key order: listing
    a document's keys costs PostgreSQL more than rendering it), a fifth looking the fields up
    (``list(doc.values())`` sliced, when the keys repeat, costs as much: memory-bound), the rest
    type checks and writing; PostgreSQL spends ~12 s rendering the documents as text (its
    ``psql \\copy`` floor), on the other core. So a large read of flattened documents hands its
    batches to helper processes (``sources.helpers``), in order, and only fetches and writes itself.

    Read by key ranges, such a read gives the ranges themselves to the helpers (``_RangeReader``):
    each helper reads a range on a connection of its own, in the snapshot that the worker's
    connection exports and holds until the end, and flattens it; the worker takes the ranges' CSV
    in order. The documents (2 GB of JSON text for 40,000 wide ones) then never pass through the
    worker: pickling them into pipes and out again cost ~1.6 s of its CPU and ~2.1 s of the
    helpers'. Measured on the wide bench (4 rounds each, alternating pairs, against the ``psql
    \\copy`` floor of each round): 27.0-31.1 s, median ratio 1.03x, against 29.7-37.8 s, 1.11x,
    with the worker's CPU down from 7.5-9 s to ~1.4 s. Fields in the document's key order are taken
    as one slice of the decoded values (8x cheaper than picking 2,890 of them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import multiprocessing.util
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any

import msgspec
import orjson
import psycopg
import psycopg.errors as pge
from psycopg import generators as psycopg_generators
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.types.json import set_json_loads
from psycopg.waiting import Wait

import formats.csv as csv_format
from dataport.processes import new_event_loop
from sources.base import (
    DECODED_CELL_TYPES,
    Column,
    Dataset,
    Row,
    SourceError,
    TransientSourceError,
    iso_datetime,
)
from sources.helpers import HELPERS, HelperPool
from sources.query import Filter, Query
from sources.sql import Dialect, compile_query

log = logging.getLogger("dataport.postgres")

CONNECT_TIMEOUT_SECONDS = 10
# More fields than this from one document: fetch the document once and flatten it in Python.
INLINE_FIELDS = 8
# Documents stored in fewer bytes than this (on average) are not TOASTed: reading a field is cheap,
# so any number of their fields is read in SQL (up to what a SELECT list holds).
SMALL_DOCUMENT_BYTES = 2000
_MAX_SELECT = 1600
# A batch holds at most about this many cells (wide rows make smaller batches).
_CELLS_PER_BATCH = 250_000
# COPY rows are gathered into chunks of about this many bytes.
_CSV_CHUNK_BYTES = 256 * 1024
# Large tables read by key ranges on this many connections at once (in one snapshot), each
# range about RANGE_BYTES of the table, at most MAX_RANGES of them.
PARALLEL_CONNECTIONS = 2 if (os.cpu_count() or 1) > 1 else 1
SPLIT_BYTES = 64 * 1024 * 1024
RANGE_BYTES = 8 * 1024 * 1024
MAX_RANGES = 256
# Documents flattened in Python: past this many cells in one read, helper processes flatten them.
HELPERS_AFTER_CELLS = 5_000_000
# Depth of nested JSONB objects that discovery flattens.
_MAX_DEPTH = 8
_DISCOVERY_SAMPLE = 1000
_DISCOVERY_VALUES = 300_000

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


# --------------------------------------------------------------------------------------------
# SQL text


def quote_ident(name: str) -> str:
    """A quoted identifier, with ``%`` doubled for psycopg's placeholder parsing."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def quote_literal(text: str) -> str:
    """A SQL string literal (standard-conforming strings are on in every session), ``%`` doubled."""
    if "\0" in text:
        raise SourceError(f"a name may not contain a NUL character: {text!r}")
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


@dataclass(frozen=True)
class TableInfo:
    """The table's columns as PostgreSQL has them: base type name per column, in table order."""

    types: dict[str, str]
    not_null: frozenset[str] = frozenset()
    document_bytes: dict[str, float] = field(default_factory=dict)  # average stored size per JSONB column

    @property
    def documents(self) -> frozenset[str]:
        return frozenset(n for n, t in self.types.items() if t == "jsonb")


_TABLE_INFO_SQL = """
SELECT a.attname, COALESCE(bt.typname, t.typname), a.attnotnull
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def _regclass_arg(table: str) -> str:
    return '"' + table.replace('"', '""') + '"'


@dataclass(frozen=True)
class Field:
    """Where a dataset column lives: a table column, or a path inside a JSONB column."""

    column: Column
    source: str  # the table column
    path: tuple[str, ...] = ()  # keys inside the document; () for a plain column
    pg_type: str = "text"

    @property
    def raw_sql(self) -> str:
        """The value as PostgreSQL holds it (JSONB fields: their text)."""
        col = quote_ident(self.source)
        if not self.path:
            return col
        if len(self.path) == 1:
            return f"({col}->>{quote_literal(self.path[0])})"
        return f"({col}#>>ARRAY[{', '.join(quote_literal(k) for k in self.path)}])"

    @property
    def needs_cast(self) -> bool:
        kind = self.column.type
        if self.path:
            return kind != "string"
        if kind == "string":
            return self.pg_type not in _TEXT_TYPES
        if kind == "float":
            return self.pg_type not in ("float4", "float8", "numeric", "int2", "int4", "int8")
        return _PG_TYPES.get(self.pg_type) != kind

    @property
    def value_sql(self) -> str:
        """The typed expression filters and sorts compare. Text compares in code-point order
        (``COLLATE "C"``, as SQLite and OpenSearch compare), whatever the column's collation."""
        if self.column.type == "string":
            text = f"({self.raw_sql})::text" if self.needs_cast else self.raw_sql
            return f'({text} COLLATE "C")'
        if not self.needs_cast:
            return self.raw_sql
        return f"({self.raw_sql})::{_CASTS[self.column.type]}"

    @property
    def plain(self) -> bool:
        """A table column read as it is: repeating it in an expression costs nothing (a JSONB field
        would be de-TOASTed and cast again)."""
        return not self.path and not self.needs_cast

    @property
    def out_sql(self) -> str:
        """The expression read by ``batches``: already in the writers' cell types. Dates and
        date-times are rendered as text here (DateStyle ISO, time zone UTC): the same text as
        ``isoformat``/``iso_datetime``, and cheaper than ``to_char`` or parsing them in Python."""
        v, kind = self.value_sql, self.column.type
        if kind == "float" and not (self.needs_cast or self.pg_type == "float8"):
            return f"({v})::double precision"
        if kind == "date":
            return f"({v})::text"
        if kind == "datetime":
            if self.plain and self.pg_type == "timestamp":  # no offset: the value is taken as UTC
                text = f"(replace(({v})::text, ' ', 'T') || 'Z')"
            else:  # timestamptz in a UTC session ends in "+00"
                text = f"(replace(left(({v})::text, -3), ' ', 'T') || 'Z')"
            if not self.plain:  # a JSONB field: evaluate it once
                return text
            # A date-time of years 1 to 9999 as its date and time of day (in UTC: the session's time
            # zone), joined by ||: 0.21 s of server time per 1,000,000 cells more than its plain text,
            # against 0.35 s with format('%sT%sZ', …) and more for reshaping that text; others (BC,
            # infinite) keep the reshaped text.
            low, high = ("'0001-01-01'", "'10000-01-01'") if self.pg_type == "timestamp" else (
                "'0001-01-01 00:00:00+00'", "'10000-01-01 00:00:00+00'")
            return (f"(CASE WHEN {v} >= {low} AND {v} < {high} THEN ({v})::date || 'T' || ({v})::time || 'Z' "
                    f"WHEN isfinite({v}) THEN {text} ELSE ({v})::text END)")
        return v

    def csv_sql(self, formula_guard: bool) -> str:
        """The cell's CSV text, as formats/csv.py writes it (COPY adds the quoting)."""
        kind, v = self.column.type, self.value_sql
        if kind == "string":
            # COPY quotes an empty text ("") to tell it from NULL; the Python writer writes both as
            # nothing, and so must this path, or a CSV round trip would not give the same bytes.
            if not formula_guard:
                return f"nullif({v}, '')"
            # formats.csv.guard: quotes then a trigger at the start get one more leading quote. The
            # triggers and the quote all sort before "A" (v is COLLATE "C": byte order), so one
            # comparison settles most cells: a regexp_replace on every cell cost more than the rest
            # of the row's rendering together (left() too, which counts characters). Such a cell is
            # not empty either: the empty text is tested after it (nullif first cost 0.03 s more per
            # 1,000,000 cells).
            return (f"(CASE WHEN {v} >= 'A' THEN {v} WHEN {v} = '' THEN NULL "
                    f"WHEN left({v}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') "
                    f"THEN '''' || {v} WHEN left({v}, 1) = '''' THEN regexp_replace({v}, '^(''*[=+@\\t\\r-])', "
                    f"'''\\1') ELSE {v} END)")
        if kind == "float":
            if not self.plain:  # a JSONB field: evaluate it once
                return f"regexp_replace((({v})::double precision)::text, '^(-?[0-9]+)$', '\\1.0')"
            # repr(float): integral values below 1e16 end in ".0" (and -0.0 keeps its sign)
            x = v if self.pg_type == "float8" else f"({v})::double precision"
            return (f"(CASE WHEN {x} = trunc({x}) AND abs({x}) < 1e16 THEN (CASE WHEN {x} = 0 THEN {x}::text "
                    f"ELSE trunc({x})::bigint::text END) || '.0' ELSE {x}::text END)")
        if kind == "boolean":
            return f"({v})::text"  # the cast's text is "true"/"false" (COPY's own is "t"/"f")
        return self.out_sql


def resolve(column: Column, info: TableInfo) -> Field:
    """Where ``column`` lives in the table; a ``SourceError`` if nowhere."""
    if column.name in info.types:
        return Field(column, column.name, (), info.types[column.name])
    head, _, rest = column.name.partition(".")
    if rest and info.types.get(head) == "jsonb":
        return Field(column, head, tuple(rest.split(".")), "jsonb")
    raise SourceError(f"column '{column.name}' is neither a column of the table nor a field of one of its "
                      f"JSONB columns ({', '.join(sorted(info.documents)) or 'it has none'})")


def column_sql_for(info: TableInfo) -> Callable[[Column], str]:
    """``column_sql`` for ``compile_query``: a column's typed SQL expression in this table."""
    cache: dict[Column, str] = {}

    def column_sql(column: Column) -> str:
        if column not in cache:
            cache[column] = resolve(column, info).value_sql
        return cache[column]

    return column_sql


# --------------------------------------------------------------------------------------------
# Read plans: which SQL expressions are read, and how rows are made from them


class _Extract:
    """Typing a JSON value the way the SQL casts do; a SourceError (row and column) otherwise."""

    _TRUE = frozenset(("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"))
    _FALSE = frozenset(("f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"))

    def __init__(self, field: Field):
        self.name = field.column.name
        self.kind = field.column.type
        self.path = field.path
        self.native = {"string": str, "integer": int, "float": float, "boolean": bool}.get(self.kind)
        self.convert: Callable[[Any], Any] = getattr(self, "_" + self.kind)

    def get(self, doc: Any) -> Any:
        for key in self.path:
            if doc.__class__ is dict:
                doc = doc.get(key)
            elif doc.__class__ is list and key.lstrip("-").isdigit():
                i = int(key)
                doc = doc[i] if -len(doc) <= i < len(doc) else None
            else:
                return None
        return doc

    @staticmethod
    def _string(v: Any) -> Any:
        if v is None or v.__class__ is str:
            return v
        if v is True or v is False:
            return "true" if v else "false"
        return json.dumps(v, ensure_ascii=False)  # jsonb's text of numbers, objects, arrays

    def _float(self, v: Any) -> Any:
        if v is None or v.__class__ is float:
            return v
        if v.__class__ is int:
            return float(v)
        if v.__class__ is str and "_" not in v:
            with contextlib.suppress(ValueError):
                return float(v)
        raise self._refuse(v)

    def _integer(self, v: Any) -> Any:
        if v is None or v.__class__ is int:
            return v
        if v.__class__ is float and v.is_integer():
            return int(v)
        if v.__class__ is str and "_" not in v:
            with contextlib.suppress(ValueError):
                return int(v.strip())
        raise self._refuse(v)

    def _boolean(self, v: Any) -> Any:
        if v is None or v is True or v is False:
            return v
        text = str(v).strip().lower() if v.__class__ in (str, int) else None
        if text in self._TRUE:
            return True
        if text in self._FALSE:
            return False
        raise self._refuse(v)

    def _date(self, v: Any) -> Any:
        if v is None:
            return None
        if v.__class__ is str:
            with contextlib.suppress(ValueError):
                return dt.date.fromisoformat(v).isoformat()
            with contextlib.suppress(ValueError):
                return dt.datetime.fromisoformat(v).date().isoformat()
        raise self._refuse(v)

    def _datetime(self, v: Any) -> Any:
        if v is None:
            return None
        if v.__class__ is str:
            try:
                parsed = dt.datetime.fromisoformat(v)
            except ValueError:
                pass
            else:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                return iso_datetime(parsed)
        raise self._refuse(v)

    def _refuse(self, v: Any) -> SourceError:
        return _CellError(self.name, self.kind, v)


# Python types a document's value may already have for each column type (no conversion needed).
_NONE = type(None)
_FAST_TYPES = {
    "string": frozenset((str, _NONE)), "float": frozenset((float, _NONE)), "integer": frozenset((int, _NONE)),
    "boolean": frozenset((bool, _NONE)),
}  # fmt: skip


_INT_FLOAT = frozenset((int, float, _NONE))


def _getter(keys: list[str]) -> Callable[[dict], tuple]:
    """The values of ``keys`` in a document, as a tuple; ``KeyError`` if one is missing."""
    if len(keys) == 1:
        key = keys[0]
        return lambda doc: (doc[key],)
    return itemgetter(*keys)


# A document decoded: each group's values, and whether they are typed already.
_Decoded = tuple[list[tuple], bool]


def _decoder(groups: list[list[str]], kinds: list[str]) -> Callable[[str | bytes], _Decoded | None] | None:
    """A document's text → the values of each group's keys (None where a key is missing), and
    whether they are typed already: then every group of a kind in ``DECODED_CELL_TYPES`` holds
    values of its type. None when the text is not a JSON object, or when this decoder does not pay
    (then the caller parses the document into a dict). No decoder at all when the keys cannot be
    one msgspec Struct.

    Decoding into a Struct of just these keys skips building a dict per document, looking every
    key up in it again and checking the type of every value: 2,897 keys, about 2.5x less CPU than
    ``orjson.loads``, an ``itemgetter`` and the type check. A document with a value of another
    type (text in a float field) is decoded again with every field ``Any``, so that its values
    come out as ``orjson.loads`` makes them and the groups type them as before.

    msgspec looks a key up among the fields starting after the one it found last, so the fields
    are in jsonb's order of keys (shorter first, then by their bytes): a document's keys then each
    take one comparison. A key that is not a field takes a comparison with every field, so
    documents with many keys beyond the read's are left to dicts (decided on the first document)."""
    keys = [key for group in groups for key in group]
    kind_of = {key: kind for group, kind in zip(groups, kinds, strict=True) for key in group}
    in_document_order = sorted(keys, key=lambda k: (len(k.encode()), k.encode()))

    def struct(name: str, type_of: Callable[[str], Any]) -> type[msgspec.Struct]:
        return msgspec.defstruct(name, [(f"f{i}", type_of(key), msgspec.field(name=key, default=None))
                                        for i, key in enumerate(in_document_order)], gc=False)

    try:
        typed = struct("Typed", lambda key: DECODED_CELL_TYPES.get(kind_of[key], Any))
        loose = struct("Loose", lambda key: Any)
    except (TypeError, ValueError):  # e.g. the same key twice
        return None
    decode_typed, decode_loose = msgspec.json.Decoder(typed).decode, msgspec.json.Decoder(loose).decode
    as_tuple = msgspec.structs.astuple
    position = {key: i for i, key in enumerate(in_document_order)}

    def span(group: list[str]) -> Callable[[tuple], tuple]:
        at = [position[k] for k in group]
        if len(at) == 1:
            return lambda cells, i=at[0]: (cells[i],)
        if at == list(range(at[0], at[0] + len(at))):
            # Keys in the document's order (f0001…f2890): a slice, 8x cheaper than picking 2,890 items.
            return itemgetter(slice(at[0], at[0] + len(at)))
        return itemgetter(*at)

    spans = [span(group) for group in groups]
    most_other_keys = 16 + len(keys) // 64
    pays: list[bool] = []  # decided on the first object

    def values(text: str | bytes) -> _Decoded | None:
        if not pays:
            doc = orjson.loads(text)
            if doc.__class__ is not dict:
                return None
            pays.append(len(doc.keys() - position.keys()) <= most_other_keys)
        if not pays[0]:
            return None
        try:
            cells, checked = as_tuple(decode_typed(text)), True
        except msgspec.ValidationError:
            try:
                cells, checked = as_tuple(decode_loose(text)), False
            except msgspec.ValidationError:  # not an object: read as before
                return None
        except msgspec.DecodeError:  # not JSON msgspec reads: parsed (or refused) as before
            return None
        return [span(cells) for span in spans], checked

    return values


class _CellError(SourceError):
    def __init__(self, name: str, kind: str, value: Any):
        super().__init__(name)
        self.name, self.kind, self.value = name, kind, value


class _RowError(SourceError):
    """A document's field that does not convert, by the row's number: in the read, or in its key
    range when a helper process read the range (the worker adds the rows before it)."""

    def __init__(self, row: int, detail: str):
        super().__init__(row, detail)  # both in args, so that it is pickled whole
        self.row, self.detail = row, detail

    def __str__(self) -> str:
        return f"Row {self.row}: {self.detail}"


@dataclass
class _Plan:
    """What one read selects and how its rows become the query's rows."""

    exprs: list[str]  # the SELECT list (without documents' fields read in Python)
    csv_exprs: list[str] | None  # the same, rendered as CSV text; None: no SQL fast path
    build: Callable[[list[Row], int], list[Row]] | None  # None: rows are already right
    # The fetched rows as CSV through the given writer (documents flattened in Python), by column.
    csv_build: Callable[[csv_format.CsvWriter, list[Row], int], bytes] | None = None


def _plan(fields: Sequence[Field], formula_guard: bool, info: TableInfo) -> _Plan:
    per_document: dict[str, int] = {}
    for f in fields:
        if f.path:
            per_document[f.source] = per_document.get(f.source, 0) + 1
    flattened = {doc for doc, n in per_document.items()
                 if n > INLINE_FIELDS and info.document_bytes.get(doc, 0) > SMALL_DOCUMENT_BYTES}
    if len(fields) - sum(per_document[d] for d in flattened) > _MAX_SELECT:
        flattened = set(per_document)
    if not flattened:
        return _Plan([f.out_sql for f in fields], [f.csv_sql(formula_guard) for f in fields], None)

    exprs: list[str] = []
    doc_slot: dict[str, int] = {}
    for f in fields:
        if f.path and f.source in flattened and f.source not in doc_slot:
            doc_slot[f.source] = len(exprs)
            exprs.append(quote_ident(f.source))  # read as its JSON text's bytes (see _fetched)
    # Each output cell comes from one place in a "combined" list per row: the SQL cells first,
    # then per (document, kind) group of one-key fields the values looked up with one C-level
    # map(dict.get, keys), then the nested fields one by one. A group whose values all have the
    # kind's Python type (the common case: floats are floats) needs no per-cell work at all.
    sql_cells: list[int] = []  # SELECT slots of the SQL-read columns
    groups: dict[tuple[int, str], list[_Extract]] = {}
    nested: list[tuple[int, _Extract]] = []
    where: list[tuple[str, Any, int]] = []  # per output column: ("sql", i) / ("group", key, i) / ("nested", i)
    for f in fields:
        if f.path and f.source in flattened:
            ex = _Extract(f)
            if len(f.path) == 1:
                members = groups.setdefault((doc_slot[f.source], f.column.type), [])
                where.append(("group", (doc_slot[f.source], f.column.type), len(members)))
                members.append(ex)
            else:
                where.append(("nested", None, len(nested)))
                nested.append((doc_slot[f.source], ex))
        else:
            where.append(("sql", None, len(sql_cells)))
            sql_cells.append(len(exprs))
            exprs.append(f.out_sql)
    group_list = [(slot, _getter(keys), keys, members, _FAST_TYPES.get(kind, frozenset()), kind == "float")
                  for (slot, kind), members in groups.items() for keys in [[ex.path[0] for ex in members]]]
    group_kind = [kind for _, kind in groups]
    starts, at = {}, len(sql_cells)
    for key, members in groups.items():
        starts[key] = at
        at += len(members)
    nested_start = at
    order = [i if kind == "sql" else starts[key] + i if kind == "group" else nested_start + i
             for kind, key, i in where]
    pick = itemgetter(*order) if len(order) > 1 else (lambda combined: (combined[order[0]],))
    doc_slots = sorted(doc_slot.values())
    take_sql = itemgetter(*sql_cells) if len(sql_cells) > 1 else (
        (lambda row: (row[sql_cells[0]],)) if sql_cells else (lambda row: ()))
    loads = orjson.loads
    empty: dict = {}
    slot_groups = {slot: [g for g, group in enumerate(group_list) if group[0] == slot] for slot in doc_slots}
    decoders = {slot: _decoder([group_list[g][2] for g in mine], [group_kind[g] for g in mine])
                for slot, mine in slot_groups.items() if not any(s == slot for s, _ in nested)}

    def raw_values(doc: Any, get: Callable, keys: list[str]) -> Sequence:
        if doc.__class__ is dict:
            try:  # every key there (the common case): one C-level lookup per key
                return get(doc)
            except KeyError:
                return tuple(map(doc.get, keys))
        return (None,) * len(keys)

    # per document: the groups that a typed decoding of it leaves with nothing to check
    slot_typed = {slot: [g for g in mine if group_kind[g] in DECODED_CELL_TYPES] for slot, mine in slot_groups.items()}

    def documents(row: Row) -> tuple[list[Sequence], list[bool], dict[int, Any]]:
        """The row's documents: each group's values as they are in the JSON, whether they are
        typed already, and the parsed documents that nested fields are read from."""
        raws: list[Sequence] = [()] * len(group_list)
        typed = [False] * len(group_list)
        docs: dict[int, Any] = {}
        for slot in doc_slots:
            text = row[slot]
            decode = decoders.get(slot)
            if decode is not None and text is not None:
                decoded = decode(text)
                if decoded is not None:
                    values, checked = decoded
                    for g, cells in zip(slot_groups[slot], values, strict=True):
                        raws[g] = cells
                    if checked:
                        for g in slot_typed[slot]:
                            typed[g] = True
                    continue
            doc = docs[slot] = loads(text) if text is not None else empty
            for g in slot_groups[slot]:
                raws[g] = raw_values(doc, *group_list[g][1:3])
        return raws, typed, docs

    def group_values(values: Sequence, typed: bool, members: list[_Extract], fast: frozenset,
                     to_float: bool) -> tuple[Sequence, bool]:
        """A group's values typed, and whether some were converted from text (a float from text
        may be NaN or infinite, one from a JSON number never is)."""
        if typed:
            return values, False
        types = set(map(type, values))
        if types <= fast:
            return values, False
        if to_float and types <= _INT_FLOAT:  # integral numbers in a float field
            return [float(v) if v.__class__ is int else v for v in values], False
        return [ex.convert(v) for ex, v in zip(members, values, strict=True)], True

    def refuse(e: _CellError, row_number: int) -> SourceError:
        return _RowError(row_number, f"column '{e.name}' holds {e.value!r}, which is not "
                                     f"{'an' if e.kind == 'integer' else 'a'} {e.kind}. Correct the document in "
                                     f"the source table, or declare the column as string.")

    def build(rows: list[Row], offset: int) -> list[Row]:
        out = []
        for n, row in enumerate(rows):
            raws, typed, docs = documents(row)
            combined = list(take_sql(row))
            try:
                for values, known, group in zip(raws, typed, group_list, strict=True):
                    combined += group_values(values, known, *group[3:])[0]
                for slot, ex in nested:
                    v = ex.get(docs[slot])
                    combined.append(v if v.__class__ is ex.native else ex.convert(v))
            except _CellError as e:
                raise refuse(e, offset + n + 1) from None
            out.append(pick(combined))
        return out

    # CSV: the same cells, kept by group rather than gathered into row tuples, so that a run of
    # number columns goes to the writer as the groups' values (or slices of them) as they are.
    group_index = {key: g for g, key in enumerate(groups)}
    group_size = [len(members) for members in groups.values()]
    run_pieces: dict[tuple[int, int], list[tuple[int, int, int]]] = {}

    def pieces_of(start: int, stop: int) -> list[tuple[int, int, int]]:
        """Columns start..stop as pieces: (group, first member, members) for consecutive members
        of one group, (-1, column, 1) for any other column."""
        if (start, stop) not in run_pieces:
            pieces, i = [], start
            while i < stop:
                kind, key, first = where[i]
                j = i + 1
                if kind == "group":
                    while j < stop and where[j] == ("group", key, first + j - i):
                        j += 1
                    pieces.append((group_index[key], first, j - i))
                else:
                    pieces.append((-1, i, 1))
                i = j
            run_pieces[start, stop] = pieces
        return run_pieces[start, stop]

    def csv_build(writer: csv_format.CsvWriter, rows: list[Row], offset: int) -> bytes:
        by_group: list[list[Sequence]] = [[] for _ in group_list]
        by_nested: list[list[Any]] = [[] for _ in nested]
        converted = [False] * len(group_list)
        for n, row in enumerate(rows):
            raws, typed, docs = documents(row)
            try:
                for g, group in enumerate(group_list):
                    values, text = group_values(raws[g], typed[g], *group[3:])
                    by_group[g].append(values)
                    converted[g] = converted[g] or text
                for values, (slot, ex) in zip(by_nested, nested, strict=True):
                    v = ex.get(docs[slot])
                    values.append(v if v.__class__ is ex.native else ex.convert(v))
            except _CellError as e:
                raise refuse(e, offset + n + 1) from None

        def column(i: int) -> Sequence:
            kind, key, j = where[i]
            if kind == "sql":
                return list(map(itemgetter(sql_cells[j]), rows))
            if kind == "group":
                return list(map(itemgetter(j), by_group[group_index[key]]))
            return by_nested[j]

        def run(start: int, stop: int) -> tuple[Sequence[Sequence], int]:
            # The cells of number columns are ints, floats and None: the SQL casts, the groups'
            # type checks and the conversions see to that. A document's numbers are finite unless
            # converted from text ("nan"); SQL cells may be NaN.
            parts, known = [], csv_format.FINITE
            for g, first, size in pieces_of(start, stop):
                if g < 0:
                    parts.append([(v,) for v in column(first)])
                    known = csv_format.NUMBERS
                    continue
                if converted[g]:
                    known = csv_format.NUMBERS
                if first == 0 and size == group_size[g]:
                    parts.append(by_group[g])
                else:
                    parts.append([values[first : first + size] for values in by_group[g]])
            if len(parts) == 1:
                return parts[0], known
            return [tuple(chain.from_iterable(cells)) for cells in zip(*parts, strict=True)], known

        return writer.render(len(rows), column, run)

    return _Plan(exprs, None, build, csv_build)


def _output_query(query: Query, exprs: list[str]) -> tuple[Query, Callable[[Column], str]]:
    """``query`` with its SELECT list replaced by ``exprs``; filters, sort and limit unchanged.

    compile_query takes one expression per column for both the SELECT list and the conditions;
    here the SELECT list differs (text for dates, CSV renderings, whole documents), so stand-in
    columns carry the output expressions and every other column compiles to its typed value."""
    stand_ins = tuple(Column(f"\0{i}") for i in range(len(exprs)))
    return replace(query, columns=stand_ins), lambda c: exprs[int(c.name[1:])] if c.name[:1] == "\0" else ""


# --------------------------------------------------------------------------------------------
# Flattening documents in helper processes


def _flattened_csv(plan: _Plan, writer: csv_format.CsvWriter, rows: list[Row], offset: int) -> bytes:
    if csv_format.FAST and plan.csv_build is not None:
        return plan.csv_build(writer, rows, offset)
    return writer.write(plan.build(rows, offset) if plan.build else rows)


# In a helper process: the read plan and the writer, made once by _helper_start; for a read by
# key ranges, the reader of its ranges.
_helper: tuple[_Plan, csv_format.CsvWriter] | None = None
_range_reader: _RangeReader | None = None


def _helper_start(columns: tuple[Column, ...], fields: list[Field], formula_guard: bool, info: TableInfo,
                  limits: tuple[int, int], ranges_of: tuple[Dataset, Query, str] | None = None) -> None:
    global _helper, _range_reader, INLINE_FIELDS, SMALL_DOCUMENT_BYTES
    INLINE_FIELDS, SMALL_DOCUMENT_BYTES = limits  # the parent's, so that the plan is the parent's
    _helper = (_plan(fields, formula_guard, info), csv_format.CsvWriter(columns, formula_guard=formula_guard))
    _range_reader = _RangeReader(*ranges_of, info) if ranges_of else None


def _helper_csv(rows: list[Row], offset: int) -> bytes:
    assert _helper is not None
    return _flattened_csv(*_helper, rows, offset)


def _helper_range_csv(select: str, params: tuple, size: int) -> tuple[bytes, int]:
    assert _helper is not None and _range_reader is not None
    return _range_reader.csv(select, params, size, *_helper)


class _RangeReader:
    """In a helper process: key ranges of one read, each read on this process's own connection, in
    the read's exported snapshot, and flattened to CSV here.

    So the documents never pass through the worker: 40,000 wide documents are 2 GB of JSON text,
    which cost ~1.6 s of the worker's CPU to pickle into pipes and ~2.1 s of the helpers' to take
    out, on top of what libpq needs to receive them once. The connection opens with the first
    range and is closed when the process ends (the read is over, or abandoned: the pool stops it).
    On uvloop where it is installed, as in the worker: less CPU per wait on the socket."""

    def __init__(self, dataset: Dataset, query: Query, snapshot_id: str, info: TableInfo):
        self.loop = new_event_loop()
        self.source = PostgresSource(dataset)
        self.source._info = info
        self.query = query
        self.snapshot_id = snapshot_id
        self.conn: psycopg.AsyncConnection | None = None

    def csv(self, select: str, params: tuple, size: int, plan: _Plan, writer: csv_format.CsvWriter,
            ) -> tuple[bytes, int]:  # fmt: skip
        """The range's rows (``select``, ``size`` at a time) as CSV, and how many there are."""
        return self.loop.run_until_complete(self._csv(select, params, size, plan, writer))

    async def _csv(self, select: str, params: tuple, size: int, plan: _Plan, writer: csv_format.CsvWriter,
                   ) -> tuple[bytes, int]:  # fmt: skip
        if self.conn is None:
            self.conn = await self.source._connect(snapshot=True, snapshot_id=self.snapshot_id)
            set_json_loads(bytes, self.conn)  # the documents' JSON text as bytes, as in _fetched
            # Run as the process ends, so that the server sees the client leave rather than lose it.
            multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        parts, rows = [], 0
        try:
            async with contextlib.aclosing(_cursor_batches(self.conn, select, params, size)) as batches:
                async for batch in batches:  # the next batch is rendered by the server meanwhile
                    parts.append(_flattened_csv(plan, writer, batch, rows))
                    rows += len(batch)
        except psycopg.Error as e:
            raise await self.source._explain(self.conn, self.query, e) from e
        return b"".join(parts), rows

    def close(self) -> None:
        if self.conn is not None:
            self.loop.run_until_complete(self.source._release(self.conn))


# --------------------------------------------------------------------------------------------
# COPY TO STDOUT, in bulk


def _copy_rows(conn: psycopg.AsyncConnection, max_bytes: int, max_rows: int) -> PQGen[tuple[list, int | None]]:
    """A psycopg generator (run it with ``conn.wait``) reading a COPY's rows: every CopyData message
    libpq already holds, waiting only when it holds none, up to ``max_bytes`` or ``max_rows``; each
    row without its final "\\n". Returns (rows, None), or at the end (rows, rows the server reported,
    -1 if it did not say). Raises the server's error if the COPY failed.

    Like psycopg's own ``copy_from`` generator, but many rows per call: ``Copy.read()`` (a wait per
    row) took 1.3 s of CPU for 1,000,000 rows, this 0.5 s."""
    pgconn = conn.pgconn
    rows: list = []
    size = 0
    while size < max_bytes and len(rows) < max_rows:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            rows.append(data[:-1])
            size += nbytes
        elif nbytes == 0:  # nothing buffered: hand over what there is, or wait for more
            if rows:
                break
            while not (yield Wait.R):
                pass
            pgconn.consume_input()
        else:  # the COPY is over: its result says how it ended
            results = yield from psycopg_generators.fetch_many(pgconn)
            for result in results:
                if result.status != ExecStatus.COMMAND_OK:
                    raise pge.error_from_result(result, encoding=conn.info.encoding)
            tuples = results[-1].command_tuples if results else None
            return rows, -1 if tuples is None else tuples
    return rows, None


async def _copy_chunks(
    conn: psycopg.AsyncConnection, statement: str, params: tuple | None, batch_rows: int
) -> AsyncIterator[tuple[bytes, int]]:
    """``statement`` (a COPY TO STDOUT in CSV) as chunks of whole rows ending in "\\r\\n", with
    their row counts."""
    cur = conn.cursor(binary=False)
    total, reported = 0, None
    async with cur.copy(statement, params):
        # PostgreSQL sends one CopyData message per row, ending in "\n"; the Python writer ends
        # rows with "\r\n".
        while reported is None:
            rows, reported = await conn.wait(_copy_rows(conn, _CSV_CHUNK_BYTES, batch_rows))
            if rows:
                total += len(rows)
                rows.append(b"")  # so that the last row ends in "\r\n" too
                yield b"\r\n".join(rows), len(rows) - 1
    if reported >= 0 and reported != total:  # "COPY n": one message per row, always
        log.error("COPY reported %s rows, %s were counted: %s", reported, total, statement[:200])


def _batch_size(query: Query, batch_rows: int) -> int:
    """Rows per batch of a read through a cursor: fewer when the rows are wide."""
    return max(1, min(batch_rows, _CELLS_PER_BATCH // max(1, len(query.columns))))


# Key ranges in output order, and the exported snapshot they are read in (see _split).
_Split = tuple[list[tuple[int | None, int | None]], str | None]


def _in_range(query: Query, low: int | None, high: int | None) -> Query:
    """``query`` limited to the key range [low, high) (an open end where None)."""
    column = query.dataset.by_name[query.dataset.key[0]]
    return replace(query, filters=(*query.filters, *((Filter(column, "GTE", (low,)),) if low is not None else ()),
                                   *((Filter(column, "LT", (high,)),) if high is not None else ())))


async def _cursor_batches(
    conn: psycopg.AsyncConnection, select: str, params: tuple, size: int
) -> AsyncIterator[list[Row]]:
    """``select`` through a named server-side cursor, ``size`` rows at a time; the next batch is
    already asked for while the current one is handed on, so PostgreSQL and Python work at once."""
    cur = conn.cursor(name=f"dataport_{uuid.uuid4().hex[:12]}", binary=True)
    await cur.execute(select, params)
    pending: asyncio.Future | None = asyncio.ensure_future(cur.fetchmany(size))
    try:
        while pending is not None:
            rows = await pending
            pending = None
            if not rows:
                break
            if len(rows) == size:  # ask for the next batch before converting this one
                pending = asyncio.ensure_future(cur.fetchmany(size))
                await asyncio.sleep(0)
            yield rows
        await cur.close()  # a connection reading range after range keeps no spent cursors
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def _in_turn(
    conns: list[psycopg.AsyncConnection], reads: list[Callable[[psycopg.AsyncConnection], AsyncIterator[Any]]]
) -> AsyncIterator[Any]:
    """What the ``reads`` (one key range each, in output order) give, in order, the connections
    taking the reads in turn.

    While one range is handed on as it arrives, the next one is read on the other connection and
    held in memory, so that PostgreSQL renders two ranges at once (on two cores): a range is read
    only once the one before the previous has been handed on (one range ahead at most). Closing
    this generator cancels the readers; the caller closes the connections."""
    n = len(reads)
    buffers: list[collections.deque] = [collections.deque() for _ in range(n)]
    may_start = [asyncio.Event() for _ in range(n)]
    changed = asyncio.Event()
    failed: list[BaseException] = []
    end = object()

    async def read(c: int) -> None:
        try:
            for i in range(c, n, len(conns)):
                await may_start[i].wait()
                items = reads[i](conns[c])
                async with contextlib.aclosing(items):  # type: ignore[type-var]
                    async for item in items:
                        buffers[i].append(item)
                        changed.set()
                buffers[i].append(end)
                changed.set()
        except Exception as e:  # handed to the consumer, which raises it
            failed.append(e)
            changed.set()

    readers = [asyncio.create_task(read(c)) for c in range(len(conns))]
    try:
        for i in range(n):
            for j in range(i, min(n, i + len(conns))):
                may_start[j].set()
            while True:
                while not buffers[i] and not failed:
                    changed.clear()
                    await changed.wait()
                if failed:
                    raise failed[0]
                item = buffers[i].popleft()
                if item is end:
                    break
                yield item
    finally:
        for task in readers:
            task.cancel()
        await asyncio.wait(readers, timeout=CONNECT_TIMEOUT_SECONDS)


# --------------------------------------------------------------------------------------------
# Errors

_TRANSIENT_CLASSES = ("08", "53", "57P", "40", "55P03", "58")


def _translate(e: BaseException, dataset: Dataset) -> SourceError:
    """psycopg's error as a source error that says whether a retry can help."""
    name = dataset.name
    if isinstance(e, SourceError):
        return e
    state = getattr(e, "sqlstate", None) or ""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, pge.QueryCanceled):
        return SourceError(f"dataset '{name}': the server cancelled the read ({text}); ask your database "
                           f"administrator about statement_timeout")
    # A connection lost mid-read can also surface as a client-side error without an SQL state
    # (psycopg's InternalError "received 2 results" when a FETCH's answer is cut off): no server
    # refused anything, so a fresh attempt on a fresh connection can succeed.
    lost = not state and isinstance(e, psycopg.InternalError)
    if (state.startswith(_TRANSIENT_CLASSES) or lost
            or isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)):
        if "password authentication failed" in text or "does not exist" in text or "no pg_hba.conf" in text:
            return SourceError(f"dataset '{name}': cannot connect: {text}")
        return TransientSourceError(f"dataset '{name}' is unavailable: {text}")
    if isinstance(e, pge.UndefinedTable):
        return SourceError(f"dataset '{name}': table '{dataset.table}' does not exist ({text})")
    if isinstance(e, pge.UndefinedColumn):
        return SourceError(f"dataset '{name}': a column is missing from table '{dataset.table}' ({text}); "
                           f"correct the dataset's columns")
    if isinstance(e, pge.InsufficientPrivilege):
        return SourceError(f"dataset '{name}': the database user may not read table '{dataset.table}' ({text})")
    return SourceError(f"dataset '{name}' could not be read: {text}")


def _bad_value(message: str) -> str | None:
    """The value quoted in a PostgreSQL data error (``…: "abc"``, ``value "1e999" is out of…``)."""
    first, last = message.find('"'), message.rfind('"')
    return message[first + 1 : last] if 0 <= first < last else None


# --------------------------------------------------------------------------------------------
# The source


class PostgresSource:
    def __init__(self, dataset: Dataset, settings: Any = None):
        self.dataset = dataset
        self.settings = settings
        self._info: TableInfo | None = None
        self._connections: set[psycopg.AsyncConnection] = set()
        self._table = dataset.table.replace("%", "%%")  # compile_query quotes it; psycopg reads %%

    # connections ----------------------------------------------------------------------------

    async def _connect(self, *, snapshot: bool, snapshot_id: str | None = None) -> psycopg.AsyncConnection:
        """A connection in a read-only transaction: REPEATABLE READ with ``snapshot`` (one snapshot
        for the whole read), the exported snapshot ``snapshot_id`` of another connection if given."""
        params = conninfo_to_dict(self.dataset.url)
        params.setdefault("application_name", "dataport")
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        try:
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
        except psycopg.Error as e:
            raise _translate(e, self.dataset) from e
        except OSError as e:
            raise TransientSourceError(f"dataset '{self.dataset.name}' is unavailable: {e}") from e
        self._connections.add(conn)
        try:
            begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if snapshot else "BEGIN READ ONLY"
            if snapshot_id is not None:  # before any query of the transaction, as PostgreSQL requires
                begin += f"; SET TRANSACTION SNAPSHOT {quote_literal(snapshot_id)}"
            await conn.execute(f"{begin}; {_SESSION}")
            if self._info is None:
                self._info = await self._read_info(conn)
        except BaseException as e:
            await self._release(conn)
            if isinstance(e, psycopg.Error):
                raise _translate(e, self.dataset) from e
            raise
        return conn

    async def _read_info(self, conn: psycopg.AsyncConnection) -> TableInfo:
        cur = await conn.execute(_TABLE_INFO_SQL, (_regclass_arg(self.dataset.table),))
        rows = await cur.fetchall()
        if not rows:
            raise SourceError(f"dataset '{self.dataset.name}': table '{self.dataset.table}' does not exist")
        types = {name: kind for name, kind, _ in rows}
        documents = [n for n, kind in types.items() if kind == "jsonb"]
        sizes: dict[str, float] = {}
        if documents:  # pg_column_size reads the stored size: nothing is de-TOASTed
            averages = ", ".join(f"avg(pg_column_size({quote_ident(d)}))" for d in documents)
            cur = await conn.execute(
                f"SELECT {averages} FROM (SELECT * FROM {quote_ident(self.dataset.table)} LIMIT 100) AS s", ())
            row = await cur.fetchone()
            sizes = {d: float(v) for d, v in zip(documents, row or (), strict=False) if v is not None}
        return TableInfo(types, frozenset(n for n, _, nn in rows if nn), sizes)

    async def _release(self, conn: psycopg.AsyncConnection) -> None:
        """Stop whatever runs on ``conn`` and close it: the server drops cursor and snapshot."""
        self._connections.discard(conn)
        if conn.closed:
            return
        with contextlib.suppress(Exception):
            if conn.pgconn.transaction_status == TransactionStatus.ACTIVE:
                await conn.cancel_safe(timeout=1.0)
        with contextlib.suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        for conn in list(self._connections):
            await self._release(conn)

    async def table_info(self) -> TableInfo:
        if self._info is None:
            conn = await self._connect(snapshot=False)
            await self._release(conn)
        assert self._info is not None
        return self._info

    def _fields(self, columns: Sequence[Column]) -> list[Field]:
        assert self._info is not None
        return [resolve(c, self._info) for c in columns]

    # reading ---------------------------------------------------------------------------------

    async def count(self, query: Query, cap: int | None = None) -> int:
        conn = await self._connect(snapshot=False)
        try:
            compiled = compile_query(query, self._table, POSTGRES, count_cap=cap,
                                     column_sql=column_sql_for(self._info))
            cur = await conn.execute(compiled.count, compiled.params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0
        except psycopg.Error as e:
            raise await self._explain(conn, query, e) from e
        finally:
            await self._release(conn)

    async def counted(self, query: Query, rows: int) -> None:
        """Nothing to do: reads do not depend on the count."""

    async def batches(self, query: Query, batch_rows: int) -> AsyncIterator[list[Row]]:
        async with contextlib.aclosing(self._fetched(query, batch_rows, False)) as fetched:
            async for plan, rows, offset in fetched:
                yield plan.build(rows, offset) if plan.build else rows

    async def _fetched(
        self, query: Query, batch_rows: int, formula_guard: bool,
        conns: list[psycopg.AsyncConnection] | None = None, split: _Split | None = None,
    ) -> AsyncIterator[tuple[_Plan, list[Row], int]]:
        """The read plan's SELECT list as fetched, in batches, each with the plan and the number of
        rows before it. On the caller's connection and ``_split`` of the query, if it has them."""
        conns = conns or [await self._connect(snapshot=True)]
        try:
            plan = _plan(self._fields(query.columns), formula_guard, self._info)
            size = _batch_size(query, batch_rows)
            ranges = await self._second_connection(conns, *(split or await self._split(conns, query)))
            for conn in conns:
                # Documents come as the bytes of their JSON text, parsed in _plan (in a helper
                # process, perhaps): no UTF-8 decoding into str here, nor encoding for the helper.
                set_json_loads(bytes, conn)
            try:
                offset = 0
                if not ranges:
                    batches = _cursor_batches(conns[0], *self._select(query, plan), size)
                else:
                    selects = [self._select(_in_range(query, *r), plan) for r in ranges]
                    batches = _in_turn(conns, [partial(_cursor_batches, select=select, params=params, size=size)
                                               for select, params in selects])
                async with contextlib.aclosing(batches):
                    async for rows in batches:
                        yield plan, rows, offset
                        offset += len(rows)
            except psycopg.Error as e:
                raise await self._explain(conns[0], query, e) from e
        finally:
            for conn in conns:
                await self._release(conn)

    def _select(self, query: Query, plan: _Plan) -> tuple[str, tuple]:
        """The SELECT of ``query`` reading ``plan``'s expressions, and its parameters."""
        out_query, out_sql = _output_query(query, plan.exprs)
        column_sql = column_sql_for(self._info)
        compiled = compile_query(out_query, self._table, POSTGRES, column_sql=lambda c: out_sql(c) or column_sql(c))
        return compiled.select, compiled.params

    async def _split(self, conns: list[psycopg.AsyncConnection], query: Query) -> _Split:
        """The key ranges to read ``query`` by, and the snapshot of ``conns[0]`` exported for the
        connections that read them; no ranges to read it in one go on ``conns[0]``."""
        ranges = await self._key_ranges(conns[0], query)
        if not ranges:
            return [], None
        try:
            cur = await conns[0].execute("SELECT pg_export_snapshot()")
            return ranges, (await cur.fetchone())[0]
        except psycopg.Error as e:  # a standby, say: one connection is enough
            log.warning("dataset %s: reading on one connection (%s)", self.dataset.name, e)
            # The failed statement ended the transaction: the read takes a new one.
            await self._release(conns[0])
            conns[0] = await self._connect(snapshot=True)
            return [], None

    async def _second_connection(
        self, conns: list[psycopg.AsyncConnection], ranges: list[tuple[int | None, int | None]],
        snapshot_id: str | None,
    ) -> list[tuple[int | None, int | None]]:
        """The ``ranges`` to read on two connections, a second one (in the snapshot ``snapshot_id``
        of the first, ``conns[0]``) appended to ``conns``; none to read in one go on the first."""
        if not ranges or snapshot_id is None:
            return []
        try:
            conns.append(await self._connect(snapshot=True, snapshot_id=snapshot_id))
        except SourceError as e:  # a pooler that cannot import it, say
            log.warning("dataset %s: reading on one connection (%s)", self.dataset.name, e)
            return []
        # The two connections already keep the cores busy. PostgreSQL would otherwise plan a range's
        # rendered COPY as a Gather Merge over parallel workers: more CPU for the same rows (the
        # workers' tuples pass through shared memory and are merged again), and slower here.
        for conn in conns:
            await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        return ranges

    async def csv_batches(
        self, query: Query, batch_rows: int, *, formula_guard: bool
    ) -> AsyncIterator[tuple[bytes, int]]:
        """The query as CSV bytes, like ``CsvWriter`` writes them: ``(header, 0)`` first, then
        ``(chunk, rows in chunk)``. Through COPY when every cell can be rendered in SQL."""
        writer = csv_format.CsvWriter(query.columns, formula_guard=formula_guard)
        await self.table_info()
        plan = _plan(self._fields(query.columns), formula_guard, self._info)
        if plan.csv_exprs is None:  # documents flattened in Python: the Python writer
            yield writer.begin(), 0
            # Flattening wide documents is CPU-bound Python (40,000 x 2,897 fields: ~18 s of CPU in
            # one process, while PostgreSQL needs ~23 s to hand them over): a read by key ranges gives
            # its ranges to helper processes, which read and flatten them; another read hands its
            # batches to helpers past HELPERS_AFTER_CELLS cells, and this one only fetches and writes.
            start = (query.columns, self._fields(query.columns), formula_guard, self._info,
                     (INLINE_FIELDS, SMALL_DOCUMENT_BYTES))
            conns = [await self._connect(snapshot=True)]
            try:
                ranges, snapshot_id = split = await self._split(conns, query)
            except BaseException:
                await self._release(conns[0])
                raise
            if HELPERS and ranges and snapshot_id is not None:
                helpers = HelperPool(_helper_start, (*start, (self.dataset, query, snapshot_id)))
                try:
                    async with contextlib.aclosing(self._ranges_by_helpers(helpers, query, plan, ranges,
                                                                           batch_rows)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                finally:
                    helpers.stop()
                    await self._release(conns[0])  # the snapshot's owner: kept until the helpers are done
                return
            helpers = HelperPool(_helper_start, start)
            try:
                async with contextlib.aclosing(self._fetched(query, batch_rows, formula_guard, conns,
                                                             split)) as fetched:
                    async for read, rows, offset in fetched:
                        if not helpers.started and HELPERS and offset * len(query.columns) >= HELPERS_AFTER_CELLS:
                            await helpers.start()
                        if not helpers.started:
                            yield _flattened_csv(read, writer, rows, offset), len(rows)
                            continue
                        helpers.submit(len(rows), _helper_csv, rows, offset)
                        async for chunk in helpers.results():
                            yield chunk
                async for chunk in helpers.results(every=True):
                    yield chunk
            finally:
                helpers.stop()
            return

        conns = [await self._connect(snapshot=True)]
        try:
            ranges = await self._second_connection(conns, *await self._split(conns, query))
            yield writer.begin(), 0
            try:
                if not ranges:
                    chunks = _copy_chunks(conns[0], *self._copy(query, plan), batch_rows)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            yield chunk
                    return
                statements = [self._copy(_in_range(query, *r), plan) for r in ranges]
                chunks = _in_turn(conns, [partial(_copy_chunks, statement=statement, params=params,
                                                  batch_rows=batch_rows) for statement, params in statements])
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield chunk
            except psycopg.Error as e:
                raise await self._explain(conns[0], query, e) from e
        finally:
            for conn in conns:
                await self._release(conn)

    async def _ranges_by_helpers(self, helpers: HelperPool, query: Query, plan: _Plan,
                                 ranges: list[tuple[int | None, int | None]], batch_rows: int,
                                 ) -> AsyncIterator[tuple[bytes, int]]:  # fmt: skip
        """Each key range read and flattened by a helper process on its own connection (in the
        snapshot that ``helpers`` were started with), its CSV taken here in the ranges' order.
        A bad cell's row number is made the read's, from the rows of the ranges before it."""
        size = _batch_size(query, batch_rows)
        offset = 0
        await helpers.start()
        try:
            for i in range(len(ranges) + 1):
                last = i == len(ranges)  # then no more ranges: take every result left
                if not last:
                    select, params = self._select(_in_range(query, *ranges[i]), plan)
                    helpers.submit(0, _helper_range_csv, select, params, size)  # its rows come with its CSV
                async for (chunk, rows), _ in helpers.results(every=last):
                    if rows:
                        yield chunk, rows
                        offset += rows
        except _RowError as e:
            raise _RowError(offset + e.row, e.detail) from None

    def _copy(self, query: Query, plan: _Plan) -> tuple[str, tuple | None]:
        """The COPY statement of ``query`` with its cells rendered in SQL, and its parameters."""
        assert plan.csv_exprs is not None
        out_query, out_sql = _output_query(query, plan.csv_exprs)
        column_sql = column_sql_for(self._info)
        compiled = compile_query(out_query, self._table, POSTGRES,
                                 column_sql=lambda c: out_sql(c) or column_sql(c))
        statement = f"COPY ({compiled.select}) TO STDOUT WITH (FORMAT csv)"
        if not compiled.params:  # psycopg reads no placeholders (nor %%) in a COPY without parameters
            return statement.replace("%%", "%"), None
        return statement, compiled.params

    async def _key_ranges(self, conn: psycopg.AsyncConnection, query: Query) -> list[tuple[int | None, int | None]]:
        """Ranges of the key, in the order of the output, for reading the query on two connections
        at once; none to read it in one go.

        A large table (``SPLIT_BYTES`` or more), a single integer key that is never NULL, ordered
        by that key alone, no limit. The ranges split the key's span evenly: ``RANGE_BYTES`` of
        table each, so that the range read ahead, held in memory, stays small. Read in the
        transaction's snapshot (min and max come from the key's index when it has one)."""
        assert self._info is not None
        key = self.dataset.key
        if PARALLEL_CONNECTIONS < 2 or len(key) != 1 or query.limit is not None:
            return []
        column = self.dataset.by_name[key[0]]
        if any(s.column.name != column.name for s in query.sort):
            return []
        field = resolve(column, self._info)
        if (not field.plain or column.type != "integer" or field.pg_type not in ("int2", "int4", "int8")
                or column.name not in self._info.not_null):
            return []
        cur = await conn.execute("SELECT pg_total_relation_size(to_regclass(%s))", (_regclass_arg(self.dataset.table),))
        size = (await cur.fetchone())[0]
        if size is None or size < SPLIT_BYTES:  # a view or a partitioned table has no size of its own
            return []
        k = quote_ident(column.name)
        cur = await conn.execute(f"SELECT min({k}), max({k}) FROM {quote_ident(self.dataset.table)}", ())
        low, high = await cur.fetchone()
        if low is None:
            return []
        n = int(min(high - low + 1, max(2, size // RANGE_BYTES), MAX_RANGES))
        if n < 2:
            return []
        bounds = [low + (high - low + 1) * i // n for i in range(1, n)]
        ranges: list[tuple[int | None, int | None]] = list(zip([None, *bounds], [*bounds, None], strict=True))
        return ranges[::-1] if query.sort and query.sort[0].descending else ranges

    # errors ----------------------------------------------------------------------------------

    async def _explain(self, conn: psycopg.AsyncConnection, query: Query, e: psycopg.Error) -> SourceError:
        """A data error (a value that does not cast) names the column and the row if it can."""
        error = _translate(e, self.dataset)
        state = getattr(e, "sqlstate", None) or ""
        if not state.startswith("22") or self._info is None:
            return error
        value = _bad_value(str(e).splitlines()[0])
        seen: dict[str, Field] = {}
        used = [*query.columns, *(f.column for f in query.filters), *(s.column for s in query.sort)]
        for column in used:
            with contextlib.suppress(SourceError):
                field = resolve(column, self._info)
                if field.needs_cast and field.column.type != "string":
                    seen.setdefault(column.name, field)
        candidates = list(seen.values())
        if not candidates:
            return error
        where = ""
        if value is not None and len(candidates) <= 200:
            found = await self._find_value(conn, candidates, value)
            if found is not None:
                field, key = found
                where = f" in the row with {key}" if key else ""
                return SourceError(
                    f"dataset '{self.dataset.name}': column '{field.column.name}' holds {value!r}{where}, which is "
                    f"not {'an' if field.column.type == 'integer' else 'a'} {field.column.type}. Correct the "
                    f"value in the source table, or declare the column as string. ({str(e).splitlines()[0]})"
                )
        if len(candidates) == 1:
            c = candidates[0].column
            return SourceError(f"dataset '{self.dataset.name}': column '{c.name}' holds a value that is not "
                               f"{'an' if c.type == 'integer' else 'a'} {c.type}: {str(e).splitlines()[0]}")
        names = ", ".join(f"'{f.column.name}'" for f in candidates[:20])
        return SourceError(f"dataset '{self.dataset.name}': one of the columns {names} holds a value that does "
                           f"not fit its type: {str(e).splitlines()[0]}")

    async def _find_value(
        self, conn: psycopg.AsyncConnection, candidates: list[Field], value: str
    ) -> tuple[Field, str] | None:
        """Which of ``candidates`` holds ``value`` as text, and the key of one such row."""
        with contextlib.suppress(Exception):
            if conn.pgconn.transaction_status == TransactionStatus.INERROR:
                await conn.execute("ROLLBACK")
            await conn.execute(f"BEGIN READ ONLY; {_SESSION}; SET LOCAL statement_timeout = '10s'")
            key = [resolve(self.dataset.by_name[k], self._info) for k in self.dataset.key]
            hit = " ".join(f"WHEN {f.raw_sql} = %s THEN {i}" for i, f in enumerate(candidates))
            match = " OR ".join(f"{f.raw_sql} = %s" for f in candidates)
            select = ", ".join([f"CASE {hit} END", *(f"({k.raw_sql})::text" for k in key)])
            cur = await conn.execute(
                f"SELECT {select} FROM {quote_ident(self.dataset.table)} WHERE {match} LIMIT 1",
                (value,) * (2 * len(candidates)),
            )
            row = await cur.fetchone()
            await conn.execute("ROLLBACK")
            if row is not None and row[0] is not None:
                described = ", ".join(f"{k.column.name} = {v}" for k, v in zip(key, row[1:], strict=True))
                return candidates[row[0]], described
        return None


# --------------------------------------------------------------------------------------------
# Discovery

_DISCOVER_SQL = """
WITH RECURSIVE sample AS (
    SELECT {doc} AS doc FROM {table} WHERE jsonb_typeof({doc}) = 'object' LIMIT {limit}
), fields(path, value) AS (
    SELECT ARRAY[e.key], e.value FROM sample, jsonb_each(sample.doc) AS e
    UNION ALL
    SELECT f.path || e.key, e.value FROM fields AS f, jsonb_each(f.value) AS e
    WHERE jsonb_typeof(f.value) = 'object' AND cardinality(f.path) < {depth}
)
SELECT path, kind,
       bool_and(strpos(text, '.') = 0) FILTER (WHERE kind = 'number') AS integral,
       bool_and(text ~ '^\\d{{4}}-\\d{{2}}-\\d{{2}}$') FILTER (WHERE kind = 'string') AS dates,
       bool_and(text ~ {datetime_pattern}) FILTER (WHERE kind = 'string') AS datetimes
FROM (SELECT path, jsonb_typeof(value) AS kind, value #>> '{{}}' AS text FROM fields) AS typed
GROUP BY path, kind
"""
_DATETIME_PATTERN = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|z|[+-]\d{2}(:?\d{2})?)?)?$"


def discover_columns(url: str, table: str) -> tuple[Column, ...]:
    """The table's columns, typed; each JSONB column replaced by its fields (``data.a.b``), typed
    from a sample of ``_DISCOVERY_SAMPLE`` documents. Blocking: called once at start-up."""
    params = conninfo_to_dict(url)
    params.setdefault("application_name", "dataport-discovery")
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    try:
        with psycopg.connect(autocommit=True, **params) as conn:
            conn.execute(f"BEGIN READ ONLY; {_SESSION}")
            rows = conn.execute(_TABLE_INFO_SQL, (_regclass_arg(table),)).fetchall()
            if not rows:
                raise SourceError(f"table '{table}' not found")
            plain = {name for name, _, _ in rows}
            columns: list[Column] = []
            for name, kind, not_null in rows:
                if kind != "jsonb":
                    columns.append(Column(name, _PG_TYPES.get(kind, "string"), required=bool(not_null)))
                    continue
                fields = _discover_document(conn, table, name, plain)
                columns.extend(fields or [Column(name, "string")])
            return tuple(columns)
    except SourceError:
        raise
    except psycopg.Error as e:
        raise SourceError(f"{table}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def _discover_document(conn: psycopg.Connection, table: str, doc: str, taken: set[str]) -> list[Column]:
    # Up to _DISCOVERY_SAMPLE documents, fewer when they are wide: about _DISCOVERY_VALUES values
    # in all (at least 100 documents), which keeps 2,897-key documents to about a second.
    keys = conn.execute(
        f"SELECT avg((SELECT count(*) FROM jsonb_object_keys(d))) FROM (SELECT {quote_ident(doc)} AS d "
        f"FROM {quote_ident(table)} WHERE jsonb_typeof({quote_ident(doc)}) = 'object' LIMIT 20) AS s", ()
    ).fetchone()[0]
    limit = max(100, min(_DISCOVERY_SAMPLE, int(_DISCOVERY_VALUES // max(1.0, float(keys or 1)))))
    statement = _DISCOVER_SQL.format(
        doc=quote_ident(doc), table=quote_ident(table), limit=limit, depth=_MAX_DEPTH,
        datetime_pattern=quote_literal(_DATETIME_PATTERN),
    )
    seen: dict[tuple[str, ...], dict[str, tuple[bool, bool, bool]]] = {}
    for path, kind, integral, dates, datetimes in conn.execute(statement, ()).fetchall():
        seen.setdefault(tuple(path), {})[kind] = (bool(integral), bool(dates), bool(datetimes))
    objects = {p for p, kinds in seen.items() if "object" in kinds}
    columns = []
    for path in sorted(seen):
        kinds = {k: v for k, v in seen[path].items() if k != "null"}
        if path in objects and set(kinds) == {"object"}:
            continue  # its fields are columns of their own
        if any(not key or "." in key for key in path):
            log.warning("table %s, JSONB column %s: key path %r has an empty key or a dot; not a column",
                        table, doc, path)
            continue
        name = ".".join((doc, *path))
        if name in taken:
            continue
        columns.append(Column(name, _json_type(kinds)))
    return columns


def _json_type(kinds: dict[str, tuple[bool, bool, bool]]) -> str:
    if set(kinds) == {"number"}:
        return "integer" if kinds["number"][0] else "float"
    if set(kinds) == {"boolean"}:
        return "boolean"
    if set(kinds) == {"string"}:
        _, dates, datetimes = kinds["string"]
        if dates:
            return "date"
        if datetimes:
            return "datetime"
    return "string"

