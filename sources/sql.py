"""Compile a ``Query`` to parameterised SQL.

Identifiers come only from the dataset's registry and are quoted; every value is bound. The same
compiler serves SQLite and PostgreSQL; a ``Dialect`` holds what differs between them. Semantics
are chosen to match across all sources:

- NE and NOT_IN keep NULL cells (a null is not equal to the value);
- CONTAINS and PREFIX are case-sensitive substring / prefix tests;
- ascending order puts NULLs last, descending first (PostgreSQL's default, made explicit);
- the dataset's key (or the row id) ends every ORDER BY, so reruns produce the same file.

The tenant scope (``Query.scope``) is compiled in ``_where`` with the filters, so the SELECT, the
count and every statement built from a ``Query`` (key ranges, COPY, helpers' reads) carry it: an
equality on the scope column with the value bound, or ``FALSE`` for no rows. The ``anyOf``
groups follow as one parenthesised term, ``((a AND b) OR (c))``, AND-ed with the scope and the
filters like any other: no group can widen what the scope allows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sources.base import Column
from sources.query import Filter, Query, TenantScope


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    contains: str  # SQL with {col} and one placeholder
    prefix: str  # SQL with {col} and placeholders for (value, length) as the dialect needs
    prefix_args: Callable[[str], tuple[Any, ...]]
    ne: str
    bind: Callable[[Column, Any], Any]
    row_id: str | None

    def quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'


def _sqlite_bind(column: Column, value: Any) -> Any:
    # SQLite keeps dates and date-times as ISO text, so values compare as text in the same shape.
    if isinstance(value, dt.datetime):
        # Not strftime: it does not zero-pad years before 1000, and "1-01-01" sorts after "0001-...".
        v = value.astimezone(dt.UTC)
        return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return int(value)
    return value


SQLITE = Dialect(
    placeholder="?",
    contains="instr({col}, ?) > 0",
    prefix="substr({col}, 1, ?) = ?",
    prefix_args=lambda v: (len(v), v),
    ne="{col} IS NOT ?",
    bind=_sqlite_bind,
    row_id="rowid",
)

_COMPARISONS = {"EQ": "=", "GT": ">", "GTE": ">=", "LT": "<", "LTE": "<="}


@dataclass(frozen=True)
class CompiledQuery:
    select: str
    count: str
    params: tuple[Any, ...]


ColumnSql = Callable[[Column], str]


def compile_query(
    query: Query, table: str, dialect: Dialect, count_cap: int | None = None, column_sql: ColumnSql | None = None
) -> CompiledQuery:
    """``column_sql`` gives the SQL expression of a column (default: its quoted name); a source
    whose columns live inside documents (PostgreSQL JSONB) passes its own."""
    q = dialect.quote
    expr = column_sql or (lambda c: q(c.name))
    where, params = _where(query, dialect, expr)
    select_list = ", ".join(expr(c) for c in query.columns)
    sql = f"SELECT {select_list} FROM {q(table)}{where} ORDER BY {_order_by(query, dialect, expr)}"
    if query.limit is not None:
        sql += f" LIMIT {int(query.limit)}"
    # The count stops at the cap: "more than the maximum" needs no full scan of a huge table.
    cap = count_cap if query.limit is None else min(query.limit, count_cap or query.limit)
    inner = f"SELECT 1 FROM {q(table)}{where}" + (f" LIMIT {int(cap)}" if cap is not None else "")
    return CompiledQuery(sql, f"SELECT count(*) FROM ({inner}) AS matching", tuple(params))


def _where(query: Query, dialect: Dialect, expr: ColumnSql) -> tuple[str, list[Any]]:
    """The WHERE of every statement a ``Query`` becomes: its tenant scope, then its filters."""
    clauses: list[str] = []
    params: list[Any] = []
    if query.scope is not None:
        clause, values = scope_condition(query.scope, dialect, expr)
        clauses.append(clause)
        params.extend(values)
    for f in query.filters:
        clause, values = _condition(f, dialect, expr)
        clauses.append(clause)
        params.extend(values)
    if query.any_of:
        alternatives = []
        for group in query.any_of:
            terms = []
            for f in group:
                clause, values = _condition(f, dialect, expr)
                terms.append(clause)
                params.extend(values)
            alternatives.append("(" + " AND ".join(terms) + ")")
        clauses.append("(" + " OR ".join(alternatives) + ")")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def scope_condition(scope: TenantScope, dialect: Dialect, expr: ColumnSql) -> tuple[str, list[Any]]:
    """The tenant scope as SQL and its parameters: the value is always bound, never in the text.
    The column's expression is the one filters compare (PostgreSQL: text ``COLLATE "C"``, so an
    index on a text scope column helps only when built ``COLLATE "C"``)."""
    if scope.nothing:
        return "FALSE", []
    return f"{expr(scope.column)} = {dialect.placeholder}", [dialect.bind(scope.column, scope.value)]


def _condition(f: Filter, dialect: Dialect, expr: ColumnSql) -> tuple[str, list[Any]]:
    col = expr(f.column)
    ph = dialect.placeholder
    values = [dialect.bind(f.column, v) for v in f.values]
    if f.op in _COMPARISONS:
        return f"{col} {_COMPARISONS[f.op]} {ph}", values
    if f.op == "NE":
        return dialect.ne.format(col=col), values
    if f.op == "BETWEEN":
        return f"{col} BETWEEN {ph} AND {ph}", values
    if f.op in ("IN", "NOT_IN"):
        marks = ", ".join([ph] * len(values))
        if f.op == "IN":
            return f"{col} IN ({marks})", values
        return f"({col} IS NULL OR {col} NOT IN ({marks}))", values
    if f.op == "CONTAINS":
        return dialect.contains.format(col=col), values
    if f.op == "PREFIX":
        return dialect.prefix.format(col=col), list(dialect.prefix_args(values[0]))
    if f.op == "IS_NULL":
        return (f"{col} IS NULL" if f.values[0] else f"{col} IS NOT NULL"), []
    raise ValueError(f"operator {f.op} has no SQL form")  # build_query refuses these first


def _order_by(query: Query, dialect: Dialect, expr: ColumnSql) -> str:
    parts = [f"{expr(s.column)} {'DESC NULLS FIRST' if s.descending else 'ASC NULLS LAST'}" for s in query.sort]
    sorted_on = {s.column.name for s in query.sort}
    tiebreak = [expr(query.dataset.by_name[k]) for k in query.dataset.key if k not in sorted_on]
    if not query.dataset.key and dialect.row_id:
        tiebreak = [dialect.row_id]
    return ", ".join(parts + tiebreak) or "1"
