"""Imports into tenant-scoped datasets: which tenant a task writes for, and the row checks for it.

A scoped dataset (``scope = { column = "org_id", claim = "org" }``) keeps each tenant's rows apart.
The api keeps the caller's claim in the import's request (``tasks.access.scope_for_request``); the
worker has no token, so that is what it writes for. ``tenant_for`` reads it back and converts it to
the column's type once (claim ``"42"`` is the integer 42 of an integer column); a task without a
usable value (the token lacked the claim, the request predates the scope, the claim is not a value
of the column) fails before anything is read: no row of the dataset is the caller's.

Every row of the file is then held to that value, in the worker, as a row error:

- a cell of the scope column that converts to another value: the row belongs to another tenant
  (the report names the column and the caller's own value, never anything stored);
- an empty cell, or a file without the column: the caller's value is filled in (a row for no
  tenant would be nobody's; the header check does not ask for the column even when it is
  ``required``);
- a row whose key matches a stored row of another tenant (when the key leaves the scope column
  out): refused after the sink's ``foreign_rows`` look-up, in dry runs too. The sinks' own guards
  (``sources.sink_base``) make sure that such a row can never change that stored row even when it
  was written after the look-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from formats.column_checker import text_form
from formats.converters import Refused, converter, show
from sources.base import Column, Dataset, Row
from sources.sink_base import RowScope, guards_keys, same_value
from tasks.access import NO_ROWS, scope_from_request
from workers.attempts import Failure

# The code of a task that may write no row of its scoped dataset.
NO_TENANT = "FORBIDDEN"


@dataclass(frozen=True)
class Tenant:
    """The tenant a scoped import writes for: ``value`` in ``column`` (typed as its cells are)."""

    column: Column
    value: Any
    guards_keys: bool  # a row's key may match a stored row of another tenant (ask the sink)

    @property
    def sink_scope(self) -> RowScope:
        return RowScope(self.column.name, self.value)

    @property
    def refusal(self) -> str:
        """The row error of a row of another tenant."""
        return (
            f"the row belongs to another tenant: this import writes only rows whose {self.column.name} "
            f"is {show(self.value)} (yours)"
        )

    def owns(self, row: Row, at: int) -> bool:
        return same_value(row[at], self.value)

    def filled(self, values: dict[str, Any], fill: Any) -> dict[str, Any]:
        """A record's cells with ``fill`` (``fill_cell``) where the scope column is absent or empty."""
        name = self.column.name
        cell = values.get(name)
        if cell is None or cell == "":
            return {**values, name: fill}
        return values

    def column_cells(self, cells: Sequence[Any], unguard_text: bool) -> tuple[list[Any], list[int]]:
        """The scope column's raw cells of a batch with empty ones filled, and the indexes of the
        cells that convert to another tenant's value (cells that do not convert are left to the
        column checks, which name them)."""
        fill = self.fill_cell(unguard_text)
        convert = converter(self.column, unguard_text=unguard_text)
        out = list(cells)
        foreign = []
        for i, cell in enumerate(cells):
            if cell is None or cell == "":
                out[i] = fill
            elif cell != fill:
                try:
                    value = convert(cell)
                except Refused:
                    continue
                if value is None:
                    out[i] = fill
                elif not same_value(value, self.value):
                    foreign.append(i)
                    out[i] = fill  # the row fails on this cell alone
        return out, foreign

    def fill_cell(self, unguard_text: bool) -> Any:
        """A raw cell that the column's converter makes the tenant's value: its text (what the
        column checks take quickest), else the value itself."""
        convert = converter(self.column, unguard_text=unguard_text)
        text = text_form(self.value)
        for candidate in (text, f"'{text}"):
            try:
                if same_value(convert(candidate), self.value):
                    return candidate
            except Refused:
                pass
        return self.value


def tenant_for(dataset: Dataset, request: Mapping[str, Any]) -> Tenant | None:
    """The tenant an import of ``dataset`` writes for (None: the dataset is not scoped). Raises
    ``Failure`` when no row can be the caller's."""
    scope = dataset.scope
    if scope is None:
        return None
    column = dataset.column(scope.column)
    assert column is not None  # the registry checks that the scope names a column
    claimed = scope_from_request(request) if "scope" in request else NO_ROWS
    nothing = "Nothing was written."
    if claimed is NO_ROWS:
        raise Failure(
            NO_TENANT,
            f"Dataset '{dataset.name}' keeps each tenant's rows apart by the '{scope.claim}' claim, and this "
            f"import was requested without one, so no row is yours to import. {nothing}",
        )
    raw = claimed
    if column.type == "string" and isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = str(raw)  # claim 42 for a text column: the text "42"
    value: Any = None
    try:
        value = converter(column, unguard_text=False)(raw)
    except Refused:
        pass
    if value is None:
        raise Failure(
            NO_TENANT,
            f"Your '{scope.claim}' claim ({show(claimed)}) cannot be a value of column '{column.name}' "
            f"({column.type}) of dataset '{dataset.name}', so no row is yours to import. {nothing}",
        )
    return Tenant(column, value, guards_keys(dataset, RowScope(column.name, value)))


def header_columns(dataset: Dataset, tenant: Tenant | None) -> tuple[Column, ...]:
    """The columns a header is checked against: the scope column is never required (it is filled)."""
    if tenant is None:
        return dataset.columns
    return tuple(replace(c, required=False) if c.name == tenant.column.name else c for c in dataset.columns)


def foreign_key_failures(
    dataset: Dataset,
    tenant: Tenant,
    refused: list[int],
    origin: Callable[[int], tuple[int, str]],
) -> list[tuple[int, str, str, str]]:
    """Report lines for the rows (indexes into a batch's rows) whose key another tenant's row holds.
    The line names the key's columns; nothing of the stored row is shown."""
    key = ", ".join(dataset.key)
    reason = (
        f"a row with this key ({key}) belongs to another tenant and was left as it is; "
        f"this import may change only rows whose {tenant.column.name} is {show(tenant.value)}"
    )
    return [(number, key, reason, original) for number, original in map(origin, refused)]
