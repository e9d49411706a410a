"""The export query: columns, filters, sort and limit, checked against a dataset's columns.

``build_query`` turns the client's input into a ``Query`` whose columns come only from the dataset
and whose filter values are already of the column's type; every source compiles that same object
(SQL, OpenSearch DSL), so a query that passed here means the same thing everywhere.

Tenant scope: a dataset with a ``scope`` is read only where its scope column equals the caller's
claim. The caller (``tasks.access.scope_value``) gives ``build_query`` that value, or ``NO_ROWS``;
the query carries it as ``Query.scope`` (a ``TenantScope``), which each source compiles in the one
function that also compiles the filters (``sources.sql._where``, ``sources.opensearch.dsl._compile``),
so no read, count or split of a read can leave it out. It is not a user filter: the column need
not be filterable, nothing about it appears in a user error, and a value that does not convert to
the column's type matches no rows rather than being refused.

Filter groups (``anyOf``): a row matches when it matches every filter of ``filters`` AND every
filter of at least one group (``Query.any_of``: an OR of AND-groups). Each source compiles the
groups beside the filters and the scope, as one more AND-ed term, so a group can narrow the rows
but never reach past the scope. Groups count against the same caps as filters: ``MAX_FILTERS``
filters and ``MAX_IN_VALUES`` values in the whole request, at most ``MAX_GROUPS`` groups.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataport import errors
from dataport.errors import UserError, UserErrors
from sources.base import NUMERIC_TYPES, Column, Dataset, SourceError

# Bounds on one request, so that no source meets a query too large for it (SQLite's expression
# depth of 1,000 and its 32,766 bound values, PostgreSQL's 65,535, OpenSearch's 1,024 clauses):
# more is refused here, as TOO_MANY_VALUES, before any source sees it.
MAX_FILTERS = 100  # in ``filters`` and all the ``anyOf`` groups together
MAX_IN_VALUES = 10_000  # in one filter, and in all the filters of a request together (groups too)
MAX_GROUPS = 20  # ``anyOf`` groups in one request
# Integers are 64-bit in every source; a limit is a GraphQL Int (32-bit) on every entry point.
MIN_INTEGER, MAX_INTEGER = -(2**63), 2**63 - 1
MAX_LIMIT = 2**31 - 1
# No more than this many problems are reported for one request (each repeats what was sent).
MAX_PROBLEMS = 50

OPS = ("EQ", "NE", "GT", "GTE", "LT", "LTE", "IN", "NOT_IN", "CONTAINS", "PREFIX", "IS_NULL", "BETWEEN")
_ORDERING_OPS = ("GT", "GTE", "LT", "LTE", "BETWEEN")
_TEXT_OPS = ("CONTAINS", "PREFIX")


class QueryTooComplex(SourceError):
    """A source refused a query as too large or too complex for it (an expression tree too deep, too
    many bound values or clauses): the request's fault, not the source's, and not retried. The caps
    of ``build_query`` are meant to keep every source clear of this."""


@dataclass(frozen=True)
class Filter:
    column: Column
    op: str
    # Typed values: one for comparisons, two for BETWEEN, many for IN / NOT_IN, one bool for IS_NULL.
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Sort:
    column: Column
    descending: bool = False


class _NoRows:
    """The scope of a caller whose token lacks the dataset's claim: no rows at all."""

    def __repr__(self) -> str:
        return "NO_ROWS"


# ``build_query(scope=NO_ROWS)``. Any other value that is not text or a number (``tasks.access``'s
# own sentinel among them) means no rows too.
NO_ROWS: Any = _NoRows()


class ScopeMissing(ValueError):
    """``build_query`` was given no scope value for a scoped dataset: a programming error (a call
    site that does not pass the caller's scope). Raised rather than reading every tenant's rows."""


@dataclass(frozen=True)
class TenantScope:
    """Rows limited to those whose ``column`` equals ``value`` (of the column's type, bound as a
    parameter by every source); ``nothing``: no rows at all (then ``value`` is None)."""

    column: Column
    value: Any
    nothing: bool = False

    def __repr__(self) -> str:  # the value stays out of logs and tracebacks
        return f"TenantScope({self.column.name!r}, {'nothing' if self.nothing else '…'})"


@dataclass(frozen=True)
class Query:
    dataset: Dataset
    columns: tuple[Column, ...]
    filters: tuple[Filter, ...] = ()
    sort: tuple[Sort, ...] = ()
    limit: int | None = None
    # Set exactly when the dataset has a scope (``build_query``): every source adds it to the
    # filters, in the function that compiles them.
    scope: TenantScope | None = None
    # ``anyOf``: rows match at least one group (every filter of it); empty: no such condition.
    any_of: tuple[tuple[Filter, ...], ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def build_query(
    dataset: Dataset,
    columns: Sequence[str] | None = None,
    filters: Sequence[Mapping[str, Any]] | None = None,
    sort: Sequence[Mapping[str, Any]] | None = None,
    limit: int | None = None,
    path: tuple[str, ...] = ("input",),
    *,
    scope: Any = None,
    any_of: Sequence[Mapping[str, Any]] | None = None,
) -> Query:
    """Check the input against ``dataset``; raise ``UserErrors`` naming every bad field.

    ``any_of``: the ``anyOf`` groups, each ``{"filters": [...]}``; None or empty for none.

    ``scope``: the caller's scope value (``tasks.access.scope_value``): None for an unscoped
    dataset (ignored when the dataset has no scope), ``NO_ROWS``, or the claim's value. A scoped
    dataset given None raises ``ScopeMissing``: a forgotten scope fails loudly instead of reading
    every tenant's rows."""
    problems: list[UserError] = []

    def bad(message: str, code: str, *where: str | int) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(UserError(message, code, (*path, *map(str, where))))

    chosen: list[Column] = []
    if columns is None:
        chosen = list(dataset.columns)
    elif not columns:
        bad("Choose at least one column, or leave columns out for all of them.", errors.NO_COLUMNS, "columns")
    else:
        seen: set[str] = set()
        for i, name in enumerate(columns):
            column = dataset.column(name) if isinstance(name, str) else None
            if column is None:
                bad(f"Dataset '{dataset.name}' has no column '{shown(name)}'.", errors.UNKNOWN_COLUMN, "columns", i)
            elif name in seen:
                bad(f"Column '{name}' is listed twice.", errors.DUPLICATE_COLUMN, "columns", i)
            else:
                seen.add(name)
                chosen.append(column)

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT):
        bad(
            f"limit must be a whole number of rows from 1 to {MAX_LIMIT:,}, not {shown(limit)}.",
            errors.INVALID_LIMIT,
            "limit",
        )

    compiled_filters, compiled_groups = _build_filters(dataset, filters, any_of, bad)

    compiled_sort = []
    sorted_on: set[str] = set()
    for i, raw in enumerate(sort or ()):
        field = raw.get("field")
        column = dataset.column(field) if isinstance(field, str) else None
        if column is None:
            bad(f"Dataset '{dataset.name}' has no column '{shown(field)}'.", errors.UNKNOWN_COLUMN, "sort", i, "field")
        elif not column.sortable:
            bad(f"Column '{column.name}' cannot be sorted on.", errors.NOT_SORTABLE, "sort", i, "field")
        elif column.name in sorted_on:
            bad(f"Column '{column.name}' is sorted on twice.", errors.DUPLICATE_COLUMN, "sort", i, "field")
        else:
            sorted_on.add(column.name)
            direction = str(raw.get("direction") or "ASC").upper()
            compiled_sort.append(Sort(column, descending=direction == "DESC"))

    if problems:
        raise UserErrors(problems)
    return Query(
        dataset,
        tuple(chosen),
        tuple(compiled_filters),
        tuple(compiled_sort),
        limit,
        tenant_scope(dataset, scope),
        tuple(compiled_groups),
    )


def _build_filters(
    dataset: Dataset,
    filters: Sequence[Mapping[str, Any]] | None,
    any_of: Sequence[Mapping[str, Any]] | None,
    bad: Callable[..., None],
) -> tuple[list[Filter], list[tuple[Filter, ...]]]:
    """``filters`` and the ``anyOf`` groups, compiled; problems go to ``bad``. The caps hold for
    the request as a whole, so a request cannot pass more filters or values by spreading them
    over groups; past a cap nothing is compiled (the values are never looked at)."""
    plain = list(filters or ())
    groups: list[list[Any]] = []
    refused = False
    if any_of is not None and not isinstance(any_of, list | tuple):
        bad("anyOf is a list of groups, each {filters: [...]}.", errors.INVALID_FILTER_VALUE, "anyOf")
        any_of, refused = None, True
    if any_of and len(any_of) > MAX_GROUPS:
        bad(f"At most {MAX_GROUPS} anyOf groups can be given, not {len(any_of):,}.", errors.TOO_MANY_VALUES, "anyOf")
        any_of, refused = None, True
    for g, group in enumerate(any_of or ()):
        members = group.get("filters") if isinstance(group, Mapping) else None
        if not isinstance(members, list | tuple) or not members:
            bad(
                "A group needs at least one filter (a group without any would match every row).",
                errors.INVALID_FILTER_VALUE,
                "anyOf",
                g,
                "filters",
            )
            refused = True
            members = []
        groups.append(list(members))
    # Every filter of the request with where it sits: ("filters", i) or ("anyOf", g, "filters", i).
    placed: list[tuple[tuple[str | int, ...], Any]] = [(("filters", i), raw) for i, raw in enumerate(plain)]
    for g, members in enumerate(groups):
        placed += [(("anyOf", g, "filters", i), raw) for i, raw in enumerate(members)]
    if len(placed) > MAX_FILTERS:
        where = "filters" if len(plain) > MAX_FILTERS or not groups else "anyOf"
        bad(
            f"At most {MAX_FILTERS} filters can be given, not {len(placed):,}; use IN for a list of values.",
            errors.TOO_MANY_VALUES,
            where,
        )
        return [], []
    counts = {
        at: len(raw["values"])
        for at, raw in placed
        if isinstance(raw, Mapping) and isinstance(raw.get("values"), list | tuple)
    }
    if sum(counts.values()) > MAX_IN_VALUES:  # refused before any value is looked at
        raw_of = dict(placed)
        for at, n in counts.items():
            if n > MAX_IN_VALUES:
                op = shown(str(raw_of[at].get("op")).upper(), 20)
                bad(f"{op} takes at most {MAX_IN_VALUES:,} values, got {n:,}.", errors.TOO_MANY_VALUES, *at, "values")
        if max(counts.values()) <= MAX_IN_VALUES:
            bad(
                f"The filters list {sum(counts.values()):,} values in all; at most {MAX_IN_VALUES:,} can be given.",
                errors.TOO_MANY_VALUES,
                "filters" if not groups else "anyOf",
            )
        return [], []
    compiled: dict[tuple[str | int, ...], Filter] = {}
    for at, raw in placed:
        try:
            compiled[at] = _build_filter(dataset, raw)
        except _FilterProblem as p:
            bad(p.message, p.code, *at, p.field)
            refused = True
    if refused:
        return [], []
    return (
        [compiled[("filters", i)] for i in range(len(plain))],
        [tuple(compiled[("anyOf", g, "filters", i)] for i in range(len(members))) for g, members in enumerate(groups)],
    )


def tenant_scope(dataset: Dataset, value: Any) -> TenantScope | None:
    """The ``Query.scope`` of a caller with scope ``value`` (see ``build_query``): None when the
    dataset has no scope; else the value converted to the scope column's type as filter values are
    (an integer column and the claim "42": 42), and no rows when it cannot be converted."""
    if dataset.scope is None:
        return None
    column = dataset.column(dataset.scope.column)
    if column is None:  # the registry refuses such a dataset; fail closed all the same
        raise ScopeMissing(f"dataset '{dataset.name}': its scope column is not one of its columns")
    if value is None:
        raise ScopeMissing(f"dataset '{dataset.name}' is scoped: build_query needs the caller's scope value")
    if value is NO_ROWS or isinstance(value, bool) or not isinstance(value, str | int | float):
        return TenantScope(column, None, nothing=True)
    try:
        return TenantScope(column, _coerce(column, value, "value"))
    except _FilterProblem:
        return TenantScope(column, None, nothing=True)


class _FilterProblem(Exception):
    def __init__(self, message: str, code: str, field: str):
        self.message, self.code, self.field = message, code, field


def shown(value: Any, most: int = 80) -> str:
    """``value`` as text for a message, cut short: a message never repeats a huge input whole (and
    never converts a huge integer to text, which Python refuses past 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a number of about {int(value.bit_length() * 0.30103):,} digits"
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode()  # a lone surrogate cannot go out in JSON
    return text if len(text) <= most else f"{text[:most]}… ({len(text):,} characters)"


def _build_filter(dataset: Dataset, raw: Mapping[str, Any]) -> Filter:
    if not isinstance(raw, Mapping):
        raise _FilterProblem(
            "A filter is an object with field, op and value or values.", errors.INVALID_FILTER_VALUE, "field"
        )
    name = raw.get("field")
    column = dataset.column(name) if isinstance(name, str) else None
    if column is None:
        raise _FilterProblem(f"Dataset '{dataset.name}' has no column '{shown(name)}'.", errors.UNKNOWN_COLUMN, "field")
    if not column.filterable:
        raise _FilterProblem(f"Column '{name}' cannot be filtered on.", errors.NOT_FILTERABLE, "field")
    op = str(raw.get("op") or "").upper()
    if op not in OPS:
        raise _FilterProblem(f"Unknown operator '{shown(op)}'.", errors.UNSUPPORTED_OPERATOR, "op")
    if op in _TEXT_OPS and column.type != "string":
        raise _FilterProblem(
            f"{op} works on text columns; '{name}' is {column.type}.", errors.UNSUPPORTED_OPERATOR, "op"
        )
    if op in _ORDERING_OPS and column.type == "boolean":
        raise _FilterProblem(f"{op} does not apply to boolean column '{name}'.", errors.UNSUPPORTED_OPERATOR, "op")

    value, values = raw.get("value"), raw.get("values")
    if op == "IS_NULL":
        flag = True if value is None else value
        if not isinstance(flag, bool):
            raise _FilterProblem("IS_NULL takes true, false or no value.", errors.INVALID_FILTER_VALUE, "value")
        return Filter(column, op, (flag,))
    if op in ("IN", "NOT_IN", "BETWEEN"):
        if values is None:
            raise _FilterProblem(f"{op} needs 'values', a list.", errors.INVALID_FILTER_VALUE, "values")
        if not isinstance(values, list | tuple):
            raise _FilterProblem(f"{op} needs 'values' to be a list.", errors.INVALID_FILTER_VALUE, "values")
        if op == "BETWEEN" and len(values) != 2:
            raise _FilterProblem(
                f"BETWEEN needs exactly two values (low, high), got {len(values)}.",
                errors.INVALID_FILTER_VALUE,
                "values",
            )
        if op != "BETWEEN" and not values:
            raise _FilterProblem(f"{op} needs at least one value.", errors.INVALID_FILTER_VALUE, "values")
        if len(values) > MAX_IN_VALUES:
            raise _FilterProblem(
                f"{op} takes at most {MAX_IN_VALUES:,} values, got {len(values):,}.", errors.TOO_MANY_VALUES, "values"
            )
        return Filter(column, op, tuple(_coerce(column, v, "values") for v in values))
    if value is None:
        raise _FilterProblem(
            f"{op} needs a value; use IS_NULL to match empty cells.", errors.INVALID_FILTER_VALUE, "value"
        )
    return Filter(column, op, (_coerce(column, value, "value"),))


def _coerce(column: Column, value: Any, where: str) -> Any:
    """The filter value as the column's Python type, or a problem naming what was wrong. Every value
    that passes here binds in every source: text is valid UTF-8 without NUL, integers are 64-bit,
    floats finite, date-times within the years 1 to 9999 once in UTC."""
    kind = column.type

    def refuse(expected: str) -> _FilterProblem:
        return _FilterProblem(
            f"'{shown(value)}' is not {expected} (column '{column.name}' is {kind}).",
            errors.INVALID_FILTER_VALUE,
            where,
        )

    if value is None:
        raise _FilterProblem("Values may not be null; use IS_NULL.", errors.INVALID_FILTER_VALUE, where)
    if kind == "string":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise refuse("text")
        if isinstance(value, float) and not math.isfinite(value):
            raise refuse("text")
        text = value if isinstance(value, str) else str(value) if isinstance(value, float) else _int_text(value)
        if text is None or "\x00" in text or not _encodes(text):
            raise refuse("text (valid Unicode, without NUL characters)")
        return text
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise refuse("true or false")
    if kind in NUMERIC_TYPES:
        number = _number(value, kind)
        if number is None:
            raise refuse("a number")
        if kind == "float":
            return number
        if isinstance(number, float):
            if not number.is_integer():
                raise refuse("a whole number")
            number = int(number)
        if not MIN_INTEGER <= number <= MAX_INTEGER:
            raise refuse(f"a whole number from {MIN_INTEGER:,} to {MAX_INTEGER:,}")
        return number
    if kind == "date":
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise refuse("a date (YYYY-MM-DD)")
    if kind == "datetime":
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value)
            except ValueError:
                pass
            else:
                if parsed.tzinfo is None:  # naive values are taken as UTC, like the stored ones
                    parsed = parsed.replace(tzinfo=dt.UTC)
                try:
                    return parsed.astimezone(dt.UTC)
                except OverflowError:  # 0001-01-01T00:00:00+01:00 is in the year 0 in UTC
                    raise refuse("a date-time between the years 1 and 9999 in UTC") from None
        raise refuse("a date-time (ISO 8601)")
    raise refuse(kind)


def _number(value: Any, kind: str) -> int | float | None:
    """A finite int or float from JSON or text; None for anything else (a huge or non-finite number,
    text that is no number). Floats for float columns, ints kept exact for integer columns."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 400:  # no finite 64-bit number is written this long
            return None
        try:
            value = float(text) if kind == "float" or not text.lstrip("+-").isdigit() else int(text)
        except ValueError:
            return None
    if isinstance(value, int):
        if kind == "float":
            try:
                return float(value)
            except OverflowError:  # more than about 1.8e308
                return None
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _int_text(value: int) -> str | None:
    try:
        return str(value)
    except ValueError:  # more than 4,300 digits
        return None


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate such as \ud800
        return False
    return True


def parse_filter_text(text: str) -> dict[str, Any]:
    """``field:op:value`` (the streaming route's and the CLI's filter syntax) as filter input.

    The value is everything after the second colon, so date-times keep theirs; IN, NOT_IN and
    BETWEEN take a comma-separated list; IS_NULL takes true (the default) or false. Raises
    ``ValueError`` with a message that says what was wrong."""
    field, sep, rest = text.partition(":")
    op, _, value = rest.partition(":")
    if not sep or not field or not op:
        raise ValueError(f"filter '{text}' is not field:op:value")
    op = op.upper()
    if op in ("IN", "NOT_IN", "BETWEEN"):
        return {"field": field, "op": op, "values": value.split(",") if value else []}
    if op == "IS_NULL":
        return {"field": field, "op": op, "value": value.lower() != "false"}
    return {"field": field, "op": op, "value": value}


def parse_any_of_text(texts: Sequence[str]) -> list[dict[str, Any]]:
    """The streaming route's (and the CLI's) ``anyOf=N:field:op:value``, repeatable, as ``anyOf``
    input: the filters that share a group number N (a whole number, 1 to ``MAX_GROUPS``) form one
    group; groups come in order of their numbers. The rest is ``field:op:value`` as for ``filter``,
    so a value may hold any character. Raises ``ValueError`` saying what was wrong."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for text in texts:
        number, sep, rest = text.partition(":")
        if not sep or not number.isascii() or not number.isdigit() or not 1 <= int(number[:4]) <= MAX_GROUPS:
            raise ValueError(f"anyOf '{shown(text)}' is not N:field:op:value, N a group from 1 to {MAX_GROUPS}")
        groups.setdefault(int(number), []).append(parse_filter_text(rest))
    return [{"filters": groups[n]} for n in sorted(groups)]


def parse_limit_text(text: str) -> int:
    """The streaming route's ``limit``: a whole number of rows from 1 to ``MAX_LIMIT``. Raises
    ``ValueError`` with a message that says what was wrong."""
    digits = text.strip()
    if not digits.isascii() or not digits.isdigit() or len(digits) > 10 or not 1 <= int(digits) <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number of rows from 1 to {MAX_LIMIT:,}, not '{shown(text)}'.")
    return int(digits)


def parse_sort_text(text: str) -> list[dict[str, str]]:
    """``-collected_on,site``: comma-separated fields, a leading ``-`` for descending."""
    return [
        {"field": part.lstrip("-"), "direction": "DESC" if part.startswith("-") else "ASC"}
        for part in (p.strip() for p in text.split(","))
        if part
    ]
