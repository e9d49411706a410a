"""The export query as OpenSearch query DSL: ``compile_query`` (``_compile`` also says whether the
sort is a total order, which decides how the read pages).

Semantics match ``sources.sql`` (read its docstring) so that one ``Query`` gives the same rows from
every store:

- EQ is a ``term``; NE and NOT_IN are ``must_not`` clauses, so documents without the field (SQL's
  NULL) are kept, like ``IS DISTINCT FROM``;
- GT/GTE/LT/LTE/BETWEEN are ``range`` queries (BETWEEN inclusive); dates and date-times carry an
  explicit ``format`` and compare as instants in UTC (fractions finer than the field keeps are
  rounded the way the comparison needs, so ``LT 09:00:00.1234`` still finds ``09:00:00.123``);
- CONTAINS is a case-sensitive ``wildcard`` ``*value*`` with ``*``, ``?`` and ``\\`` escaped;
  PREFIX a ``prefix`` query; IS_NULL ``must_not exists`` (false: ``exists``);
- a ``text`` field is filtered and sorted through its ``keyword`` subfield; one without such a
  subfield is refused with a user error instead of matching analysed tokens;
- ascending sorts put missing values last, descending first; the dataset key (ascending) ends
  every sort, so the order is total and a rerun writes the same file.

The tenant scope (``Query.scope``) is compiled in ``_compile`` with the filters: an EQ on the scope
column in the ``bool`` filter (the value a ``term`` query's value, never part of a query string),
or ``match_none`` for no rows. Counts, point-in-time and scroll pages and the helpers' pages all
take the body ``_compile`` makes, so all of them are scoped.

The ``anyOf`` groups are one more clause of that ``bool`` filter: ``bool.should`` with
``minimum_should_match: 1``, one ``bool`` (filter / must_not) per group. Being in the filter beside
the scope, it can only narrow the rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from dataport import errors
from dataport.errors import UserError, UserErrors
from sources.base import Column, SourceError
from sources.opensearch.mapping import Field, _default_field
from sources.query import Filter, Query


def compile_query(query: Query, fields: Mapping[str, Field] | None = None) -> dict[str, Any]:
    """The search body for ``query``: ``query`` (bool filter / must_not), ``sort`` and ``_source``.

    ``fields`` says where each column lives (from the index mapping); without it every column is
    taken to be a field of its own name and of the usual type for its column type.
    Raises ``UserErrors`` for a filter or sort on a text field that has no keyword subfield."""
    return _compile(query, fields or {})[0]


def _compile(query: Query, fields: Mapping[str, Field]) -> tuple[dict[str, Any], bool]:
    """The body, and whether its sort is a total order (the dataset key ends it)."""

    def field(column: Column) -> Field:
        return fields.get(column.name) or _default_field(column)

    problems: list[UserError] = []
    must: list[dict[str, Any]] = []
    must_not: list[dict[str, Any]] = []
    if query.scope is not None:
        must.append(_scope_condition(query, field(query.scope.column)))

    def compiled(f: Filter, at: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        where = field(f.column)
        if not where.searchable and f.op != "IS_NULL":
            problems.append(
                UserError(
                    f"Column '{f.column.name}' is full text in the index (no keyword subfield) and cannot be "
                    f"filtered with {f.op}.",
                    errors.NOT_FILTERABLE,
                    ("input", *at, "field"),
                )
            )
            return [], []
        return _condition(f, where)

    for i, f in enumerate(query.filters):
        positive, negative = compiled(f, ("filters", str(i)))
        must.extend(positive)
        must_not.extend(negative)
    if query.any_of:
        should: list[dict[str, Any]] = []
        for g, group in enumerate(query.any_of):
            inner: dict[str, Any] = {}
            for i, f in enumerate(group):
                positive, negative = compiled(f, ("anyOf", str(g), "filters", str(i)))
                inner.setdefault("filter", []).extend(positive)
                inner.setdefault("must_not", []).extend(negative)
            should.append({"bool": {k: v for k, v in inner.items() if v} or {"filter": [{"match_all": {}}]}})
        must.append({"bool": {"should": should, "minimum_should_match": 1}})

    sort: list[Any] = []
    for i, s in enumerate(query.sort):
        where = field(s.column)
        if not where.searchable:
            problems.append(
                UserError(
                    f"Column '{s.column.name}' is full text in the index (no keyword subfield) "
                    "and cannot be sorted on.",
                    errors.NOT_SORTABLE,
                    ("input", "sort", str(i), "field"),
                )
            )
            continue
        sort.append(_sort_clause(s.column, where, s.descending))
    if problems:
        raise UserErrors(problems)

    sorted_on = {s.column.name for s in query.sort}
    total = bool(query.dataset.key)
    for name in query.dataset.key:
        column = query.dataset.by_name.get(name)
        if name in sorted_on:
            continue
        key_field = field(column) if column is not None else None
        if column is None or key_field is None or not key_field.searchable:
            total = False
            continue
        sort.append(_sort_clause(column, key_field, False))
    if not query.dataset.key:
        sort.append("_doc")  # index order: cheapest, and the order of a table without a key

    body: dict[str, Any] = {}
    if must or must_not:  # without filters, no query: match_all is the default (and costs some servers)
        body["query"] = {"bool": {}}
        if must:
            body["query"]["bool"]["filter"] = must
        if must_not:
            body["query"]["bool"]["must_not"] = must_not
    body["sort"] = sort
    body["_source"] = {"includes": [c.name for c in query.columns]}
    return body, total


def _scope_condition(query: Query, where: Field) -> dict[str, Any]:
    """The tenant scope as one filter clause (EQ's semantics, dates included), or ``match_none``.
    A scope column that cannot be matched exactly (full text without a keyword subfield) fails the
    read: reading it unscoped is not an option, and the message names neither column nor value."""
    scope = query.scope
    assert scope is not None
    if scope.nothing:
        return _MATCH_NONE
    if not where.searchable:
        raise SourceError(
            f"dataset '{query.dataset.name}': its tenant scope cannot be applied to this index (the scope "
            f"column is full text without a keyword subfield); correct the index mapping or the dataset"
        )
    clauses, _ = _condition(Filter(scope.column, "EQ", (scope.value,)), where)  # EQ: filter clauses only
    return clauses[0] if len(clauses) == 1 else {"bool": {"filter": clauses}}


def _sort_clause(column: Column, where: Field, descending: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"order": "desc" if descending else "asc", "missing": "_first" if descending else "_last"}
    if not where.mapped:
        spec["unmapped_type"] = where.kind
    return {where.path: spec}


_MATCH_NONE: dict[str, Any] = {"match_none": {}}
_RANGE_OPS = {"GT": "gt", "GTE": "gte", "LT": "lt", "LTE": "lte"}


def _condition(f: Filter, where: Field) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(filter clauses, must_not clauses) for one filter."""
    path, op = where.path, f.op
    if op == "IS_NULL":
        exists = {"exists": {"field": path}}
        return ([], [exists]) if f.values[0] else ([exists], [])
    if op == "CONTAINS":
        return [{"wildcard": {path: {"value": f"*{_escape_wildcard(f.values[0])}*"}}}], []
    if op == "PREFIX":
        return [{"prefix": {path: {"value": f.values[0]}}}], []
    if f.column.type in ("date", "datetime"):
        return _date_condition(f, where)
    if op == "EQ":
        return [{"term": {path: f.values[0]}}], []
    if op == "NE":
        return [], [{"term": {path: f.values[0]}}]
    if op == "IN":
        return [{"terms": {path: list(f.values)}}], []
    if op == "NOT_IN":
        return [], [{"terms": {path: list(f.values)}}]
    if "" in f.values and op in ("GT", "GTE", "LT", "LTE", "BETWEEN"):
        return _empty_text_bound(f, path)
    if op in _RANGE_OPS:
        return [{"range": {path: {_RANGE_OPS[op]: f.values[0]}}}], []
    if op == "BETWEEN":
        return [{"range": {path: {"gte": f.values[0], "lte": f.values[1]}}}], []
    raise ValueError(f"operator {op} has no OpenSearch form")  # build_query refuses these first


def _empty_text_bound(f: Filter, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A range bounded by the empty text, written without it: "" is the least text, and some
    servers take an empty bound for no bound at all."""
    empty = {"term": {path: ""}}
    exists = {"exists": {"field": path}}
    if f.op == "LT":
        return [_MATCH_NONE], []
    if f.op == "LTE":
        return [empty], []
    if f.op == "GT":
        return [exists], [empty]
    if f.op == "GTE":
        return [exists], []
    low, high = f.values  # BETWEEN
    if high == "":
        return ([empty], []) if low == "" else ([_MATCH_NONE], [])
    return [{"range": {path: {"lte": high}}}], []


def _escape_wildcard(value: str) -> str:
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def _date_condition(f: Filter, where: Field) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dates and date-times. Comparisons are ranges with an explicit format, so they hold whatever
    format the mapping declares. A ``date`` field keeps milliseconds: a filter value with finer
    digits is rounded the way each comparison needs, so that the answer is the exact one."""
    path, op, values = where.path, f.op, f.values
    encode: Callable[[Any], str]  # of the column's values: dates, or date-times
    if f.column.type == "date":
        fmt, encode = "strict_date", _encode_date
        exact: Callable[[Any], bool] = lambda v: True  # noqa: E731
    else:
        fmt, encode = "strict_date_optional_time", _encode_datetime
        exact = (lambda v: True) if where.kind == "date_nanos" else (lambda v: v.microsecond % 1000 == 0)

    def rng(**bounds: Any) -> dict[str, Any]:
        return {"range": {path: {**{k: encode(v) for k, v in bounds.items()}, "format": fmt}}}

    if op in ("EQ", "NE"):
        v = values[0]
        if not exact(v):  # no stored value equals it
            return ([_MATCH_NONE], []) if op == "EQ" else ([], [])
        clause = rng(gte=v, lte=v)
        return ([clause], []) if op == "EQ" else ([], [clause])
    if op in ("IN", "NOT_IN"):
        kept = [encode(v) for v in values if exact(v)]
        if not kept:
            return ([_MATCH_NONE], []) if op == "IN" else ([], [])
        clause = {"terms": {path: kept}}
        return ([clause], []) if op == "IN" else ([], [clause])
    if op in _RANGE_OPS:
        v = values[0]
        if exact(v):
            return [rng(**{_RANGE_OPS[op]: v})], []
        # stored values are whole milliseconds: x > 9.1234 ⟺ x > 9.123, x < 9.1234 ⟺ x <= 9.123
        return [rng(**{"gt" if op in ("GT", "GTE") else "lte": _floor_ms(v)})], []
    if op == "BETWEEN":
        low, high = values
        lower = {"gte": low} if exact(low) else {"gt": _floor_ms(low)}
        return [rng(**lower, lte=_floor_ms(high))], []
    raise ValueError(f"operator {op} has no OpenSearch form for dates")


def _floor_ms(value: Any) -> Any:
    if not isinstance(value, dt.datetime):
        return value
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _encode_date(value: dt.date) -> str:
    return value.isoformat()


def _encode_datetime(value: dt.datetime) -> str:
    v = value.astimezone(dt.UTC)  # not strftime, which does not zero-pad years before 1000
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}Z"
