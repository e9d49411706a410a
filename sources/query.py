"""The export query: columns, filters, sort and limit, checked against a dataset's columns.

``build_query`` turns the client's input into a ``Query`` whose columns come only from the dataset
and whose filter values are already of the column's type; every source compiles that same object
(SQL, OpenSearch DSL), so a query that passed here means the same thing everywhere.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataport import errors
from dataport.errors import UserError, UserErrors
from sources.base import NUMERIC_TYPES, Column, Dataset

MAX_IN_VALUES = 10_000

OPS = ("EQ", "NE", "GT", "GTE", "LT", "LTE", "IN", "NOT_IN", "CONTAINS", "PREFIX", "IS_NULL", "BETWEEN")
_ORDERING_OPS = ("GT", "GTE", "LT", "LTE", "BETWEEN")
_TEXT_OPS = ("CONTAINS", "PREFIX")


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


@dataclass(frozen=True)
class Query:
    dataset: Dataset
    columns: tuple[Column, ...]
    filters: tuple[Filter, ...] = ()
    sort: tuple[Sort, ...] = ()
    limit: int | None = None

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
) -> Query:
    """Check the input against ``dataset``; raise ``UserErrors`` naming every bad field."""
    problems: list[UserError] = []

    def bad(message: str, code: str, *where: str | int) -> None:
        problems.append(UserError(message, code, (*path, *map(str, where))))

    chosen: list[Column] = []
    if columns is None:
        chosen = list(dataset.columns)
    elif not columns:
        bad("Choose at least one column, or leave columns out for all of them.", errors.NO_COLUMNS, "columns")
    else:
        seen: set[str] = set()
        for i, name in enumerate(columns):
            column = dataset.column(name)
            if column is None:
                bad(f"Dataset '{dataset.name}' has no column '{name}'.", errors.UNKNOWN_COLUMN, "columns", i)
            elif name in seen:
                bad(f"Column '{name}' is listed twice.", errors.DUPLICATE_COLUMN, "columns", i)
            else:
                seen.add(name)
                chosen.append(column)

    if limit is not None and limit < 1:
        bad(f"limit must be a positive number of rows, not {limit}.", errors.INVALID_LIMIT, "limit")

    compiled_filters = []
    for i, raw in enumerate(filters or ()):
        try:
            compiled_filters.append(_build_filter(dataset, raw))
        except _FilterProblem as p:
            bad(p.message, p.code, "filters", i, p.field)

    compiled_sort = []
    for i, raw in enumerate(sort or ()):
        name = raw.get("field")
        column = dataset.column(name) if isinstance(name, str) else None
        if column is None:
            bad(f"Dataset '{dataset.name}' has no column '{name}'.", errors.UNKNOWN_COLUMN, "sort", i, "field")
        elif not column.sortable:
            bad(f"Column '{name}' cannot be sorted on.", errors.NOT_SORTABLE, "sort", i, "field")
        else:
            direction = str(raw.get("direction") or "ASC").upper()
            compiled_sort.append(Sort(column, descending=direction == "DESC"))

    if problems:
        raise UserErrors(problems)
    return Query(dataset, tuple(chosen), tuple(compiled_filters), tuple(compiled_sort), limit)


class _FilterProblem(Exception):
    def __init__(self, message: str, code: str, field: str):
        self.message, self.code, self.field = message, code, field


def _build_filter(dataset: Dataset, raw: Mapping[str, Any]) -> Filter:
    name = raw.get("field")
    column = dataset.column(name) if isinstance(name, str) else None
    if column is None:
        raise _FilterProblem(f"Dataset '{dataset.name}' has no column '{name}'.", errors.UNKNOWN_COLUMN, "field")
    if not column.filterable:
        raise _FilterProblem(f"Column '{name}' cannot be filtered on.", errors.NOT_FILTERABLE, "field")
    op = str(raw.get("op") or "").upper()
    if op not in OPS:
        raise _FilterProblem(f"Unknown operator '{op}'.", errors.UNSUPPORTED_OPERATOR, "op")
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
    """The filter value as the column's Python type, or a problem naming what was wrong."""
    kind = column.type

    def refuse(expected: str) -> _FilterProblem:
        return _FilterProblem(
            f"'{value}' is not {expected} (column '{column.name}' is {kind}).", errors.INVALID_FILTER_VALUE, where
        )

    if value is None:
        raise _FilterProblem("Values may not be null; use IS_NULL.", errors.INVALID_FILTER_VALUE, where)
    if kind == "string":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise refuse("text")
        return str(value)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise refuse("true or false")
    if kind in NUMERIC_TYPES:
        if isinstance(value, bool):
            raise refuse("a number")
        if isinstance(value, str):
            try:
                value = float(value) if kind == "float" or not value.lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise refuse("a number") from None
        if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
            raise refuse("a number")
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise refuse("a whole number")
            return int(value)
        return float(value)
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
                return parsed.astimezone(dt.UTC)
        raise refuse("a date-time (ISO 8601)")
    raise refuse(kind)


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


def parse_sort_text(text: str) -> list[dict[str, str]]:
    """``-collected_on,site``: comma-separated fields, a leading ``-`` for descending."""
    return [
        {"field": part.lstrip("-"), "direction": "DESC" if part.startswith("-") else "ASC"}
        for part in (p.strip() for p in text.split(","))
        if part
    ]
