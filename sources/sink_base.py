"""What the sinks share (``sqlite_sink``, ``postgres_sink``, ``opensearch_sink``): their errors and
the checks every store makes the same way.

``SinkError`` (and ``DuplicateKeyError``) is what a sink raises; the worker reports its message and
retries the import when it is ``transient``. The checks are the ones a sink runs on each batch:
every key column has a value (``check_keys``, ``check_key_texts`` for ``write_text``'s columns),
floats the store can keep (``check_floats``), and how a key is named in an error
(``describe_key``). ``rows_from_text`` says which typed rows ``write_text``'s text stands for
(``sources.sinks`` describes both methods). The sinks import this module and ``sources.sinks``
imports the sinks to open one, so imports point one way.

Tenant-scoped datasets (``sources.base.Scope``): an import writes for one tenant, a ``RowScope``.
The worker refuses rows of another tenant and rows keyed like another tenant's stored row (asking
the sink's ``foreign_rows``) before they reach the sink, as row errors; each sink checks again
(``check_scope``) and its writes are guarded so that even a row that slipped through (another
tenant writing the same key meanwhile) can never change a row of another tenant: the sink then
fails, transient, and the retried import reports that row as a row error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sources.base import Column, Dataset, Row


class SinkError(Exception):
    """A write failed. The message names the dataset and, where known, the row, column and value.
    ``transient`` is true when a retry of the whole import may succeed (connection lost, locked,
    overloaded); ``row`` is the failing row's number among the rows handed to ``write`` (1-based),
    when the store said which row it was."""

    def __init__(self, message: str, *, transient: bool = False, row: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.row = row


class DuplicateKeyError(SinkError):
    """INSERT mode met a row whose key already exists (in the dataset, or earlier in the same import)."""


@dataclass(frozen=True)
class RowScope:
    """The tenant an import writes for: every row's ``column`` holds ``value`` (typed as the
    column's cells are), and no stored row whose ``column`` holds anything else is changed."""

    column: str
    value: Any


def scope_position(dataset: Dataset, columns: Sequence[Column], scope: RowScope | None) -> int | None:
    """Where the scope column is in a row (None when unscoped); the worker always imports it."""
    if scope is None:
        return None
    names = [c.name for c in columns]
    if scope.column not in names:
        raise SinkError(f"dataset '{dataset.name}': a scoped import must write the column '{scope.column}'")
    return names.index(scope.column)


def guards_keys(dataset: Dataset, scope: RowScope | None) -> bool:
    """Whether a row's key can match a stored row of another tenant: a scoped dataset whose key
    leaves out the scope column (with the column in the key, the tenant's value is part of it)."""
    return scope is not None and bool(dataset.key) and scope.column not in dataset.key


def same_value(stored: Any, written: Any) -> bool:
    """Equal as cells: True is not 1, None is nothing else; 3 equals 3.0."""
    if stored is None or written is None or stored.__class__ is bool or written.__class__ is bool:
        return stored is written
    same: bool = stored == written  # (cells: == is a bool)
    return same


def check_scope(
    dataset: Dataset, columns: Sequence[Column], at: int | None, scope: RowScope | None, rows: list[Row], first: int
) -> None:
    """Every row holds the tenant's value in the scope column (the worker made sure; this is the
    sink's own check, so that no bug upstream can write a row for another tenant)."""
    if scope is None or at is None:
        return
    value = scope.value
    for n, row in enumerate(rows):
        if not same_value(row[at], value):
            raise SinkError(
                f"dataset '{dataset.name}': row {first + n} belongs to another tenant (column '{columns[at].name}')",
                row=first + n,
            )


_TEXT_BOOL = {"t": True, "f": False}


def rows_from_text(columns: Sequence[Column], cells: Sequence[Sequence[str]]) -> list[Row]:
    """The typed rows that ``cells`` (``write_text``'s columns) stand for."""
    typed: list[Sequence[Any]] = []
    for column, texts in zip(columns, cells, strict=True):
        kind = column.type
        if kind == "integer":
            typed.append([int(v) if v else None for v in texts])
        elif kind == "float":
            typed.append([float(v) if v else None for v in texts])
        elif kind == "boolean":
            typed.append([_TEXT_BOOL.get(v) for v in texts])
        else:
            typed.append([v or None for v in texts])
    return list(zip(*typed, strict=True))


def key_positions(dataset: Dataset, columns: Sequence[Column]) -> list[int]:
    """Where the key's columns are in a row; [] unless every key column is imported."""
    names = [c.name for c in columns]
    if not dataset.key or any(k not in names for k in dataset.key):
        return []
    return [names.index(k) for k in dataset.key]


def check_key_texts(
    dataset: Dataset,
    columns: Sequence[Column],
    positions: Sequence[int],
    cells: Sequence[Sequence[str]],
    first_row: int,
) -> None:
    """``check_keys`` for ``write_text``'s columns (where ``""`` is no value)."""
    for i in positions:
        if not all(cells[i]):  # (quicker than `"" in`, which compares every text)
            n = list(cells[i]).index("")
            raise SinkError(
                f"dataset '{dataset.name}': row {first_row + n} has no value for the key column '{columns[i].name}'",
                row=first_row + n,
            )


def describe_key(names: Sequence[str], values: Sequence[Any]) -> str:
    """``sample_id=42``, or ``(site, no)=('Kiruna', 7)`` for a compound key."""
    if len(names) == 1:
        return f"{names[0]}={_show(values[0])}"
    return f"({', '.join(names)})=({', '.join(_show(v) for v in values)})"


def _show(value: Any) -> str:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)


def check_keys(
    dataset: Dataset, columns: Sequence[Column], positions: Sequence[int], rows: list[Row], first_row: int
) -> None:
    """Every row has a value in each key column: a row without one cannot be matched (UPSERT),
    and SQLite would even make up a row id for it."""
    for i in positions:
        for n, row in enumerate(rows):
            if row[i] is None:
                raise SinkError(
                    f"dataset '{dataset.name}': row {first_row + n} has no value for the key column "
                    f"'{columns[i].name}'",
                    row=first_row + n,
                )


def check_floats(
    dataset: Dataset, columns: Sequence[Column], rows: list[Row], first_row: int, store: str, infinite: bool = False
) -> None:
    """Refuse NaN (and, with ``infinite``, ±Infinity) in float columns for stores that would keep
    something else (SQLite stores NaN as NULL; JSON has neither). The worker's checks refuse them
    already, so this must cost little: a column is summed in C (NaN and infinities carry through
    a sum; None and 0.0 are left out) and searched cell by cell only when the sum is not finite."""
    for i, column in enumerate(columns):
        if column.type != "float":
            continue
        try:
            total = sum(filter(None, map(itemgetter(i), rows)))
            if math.isfinite(total):
                continue
        except TypeError:  # not numbers: the store's own checks will say
            continue
        for n, row in enumerate(rows):
            v = row[i]
            if v.__class__ is float and (v != v or (infinite and v in (_INF, -_INF))):
                raise SinkError(
                    f"dataset '{dataset.name}': row {first_row + n}, column '{column.name}' holds {v}, "
                    f"which {store} cannot store",
                    row=first_row + n,
                )


_INF = float("inf")
