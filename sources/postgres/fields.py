"""Where a dataset column lives in the table (``Field``) and its SQL: the typed value filters and
sorts compare, the cell ``batches`` reads, the cell the CSV fast path renders.

JSONB documents
    A column ``data.a.b`` whose first segment is a JSONB column of the table is the expression
    ``(("data" #>> ARRAY['a','b'])::<type>)`` (``->>`` for one level), cast to the column's type
    (``double precision``, ``bigint``, ``boolean``, ``date``, ``timestamptz``) so that filters and
    sorts compare typed values: sorting on a JSONB time stamp sorts time stamps, not text. Key names
    come only from the registry and are written as SQL string literals with quotes doubled.
    A value that does not cast (``"abc"`` in a float field) fails the read with a ``SourceError``
    that names the column and, when it can be found, the row. Which top-level columns are JSONB is
    read from ``pg_attribute`` once per source (one cheap query on the first connection).

CSV cells rendered in SQL (``Field.csv_sql``, for ``csv_batches``)
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
      aliases longer than 63 bytes would be cut by PostgreSQL.

    An empty text cell is written as nothing, as the Python writer does (``nullif``: COPY would
    quote it to tell it from NULL). Known differences from the Python writer (the cells parse back
    to the same values): non-integral floats between 1e15 and 1e16, and integral ones in JSONB fields from
    1e15 up, print in exponent form (``1.2345678901234565e+15``); ``NaN``/``Infinity`` against
    ``nan``/``inf``. COPY takes no server-side parameters: psycopg binds the filter values
    client-side as escaped, typed literals (never raw text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sources.base import Column, SourceError
from sources.postgres.columns import TableInfo
from sources.postgres.dialect import _CASTS, _PG_TYPES, _TEXT_TYPES, quote_ident, quote_literal


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
            low, high = (
                ("'0001-01-01'", "'10000-01-01'")
                if self.pg_type == "timestamp"
                else ("'0001-01-01 00:00:00+00'", "'10000-01-01 00:00:00+00'")
            )
            return (
                f"(CASE WHEN {v} >= {low} AND {v} < {high} THEN ({v})::date || 'T' || ({v})::time || 'Z' "
                f"WHEN isfinite({v}) THEN {text} ELSE ({v})::text END)"
            )
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
            return (
                f"(CASE WHEN {v} >= 'A' THEN {v} WHEN {v} = '' THEN NULL "
                f"WHEN left({v}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') "
                f"THEN '''' || {v} WHEN left({v}, 1) = '''' THEN regexp_replace({v}, '^(''*[=+@\\t\\r-])', "
                f"'''\\1') ELSE {v} END)"
            )
        if kind == "float":
            if not self.plain:  # a JSONB field: evaluate it once
                return f"regexp_replace((({v})::double precision)::text, '^(-?[0-9]+)$', '\\1.0')"
            # repr(float): integral values below 1e16 end in ".0" (and -0.0 keeps its sign)
            x = v if self.pg_type == "float8" else f"({v})::double precision"
            return (
                f"(CASE WHEN {x} = trunc({x}) AND abs({x}) < 1e16 THEN (CASE WHEN {x} = 0 THEN {x}::text "
                f"ELSE trunc({x})::bigint::text END) || '.0' ELSE {x}::text END)"
            )
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
    raise SourceError(
        f"column '{column.name}' is neither a column of the table nor a field of one of its "
        f"JSONB columns ({', '.join(sorted(info.documents)) or 'it has none'})"
    )


def column_sql_for(info: TableInfo) -> Callable[[Column], str]:
    """``column_sql`` for ``compile_query``: a column's typed SQL expression in this table."""
    cache: dict[Column, str] = {}

    def column_sql(column: Column) -> str:
        if column not in cache:
            cache[column] = resolve(column, info).value_sql
        return cache[column]

    return column_sql
