"""GraphQL inputs of the contract, and their conversion to plain data for the task service."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.scalars import JSON

from schema.enums import Compression, FileFormat, FilterOp, ImportMode, SortDirection


@strawberry.input
class FilterInput:
    field: str
    op: FilterOp
    value: JSON | None = None
    values: list[JSON] | None = None


@strawberry.input
class SortInput:
    field: str
    direction: SortDirection = SortDirection.ASC


@strawberry.input(description="Filters that must all match: one alternative of ExportInput.anyOf.")
class FilterGroupInput:
    filters: list[FilterInput]


def _filters(filters: list[FilterInput] | None) -> list[dict[str, Any]]:
    return [{"field": f.field, "op": f.op.value, "value": f.value, "values": f.values} for f in filters or []]


@strawberry.input
class ExportInput:
    dataset: str
    format: FileFormat = FileFormat.CSV
    columns: list[str] | None = None
    filters: list[FilterInput] | None = None
    sort: list[SortInput] | None = None
    limit: int | None = None
    notify: bool = False
    label: str | None = strawberry.field(
        default=None, description="Shown in the history and part of the file name; at most 100 characters."
    )
    compression: Compression = Compression.NONE
    any_of: list[FilterGroupInput] | None = strawberry.field(
        default=None, description="Rows match all of `filters` AND every filter of at least one group."
    )

    def to_request(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "format": self.format.value,
            "columns": self.columns,
            "filters": _filters(self.filters),
            "sort": [{"field": s.field, "direction": s.direction.value} for s in self.sort or []],
            "limit": self.limit,
            "notify": self.notify,
            "label": self.label,
            "compression": self.compression.value,
            "anyOf": [{"filters": _filters(g.filters)} for g in self.any_of] if self.any_of else None,
        }


@strawberry.input
class ImportInput:
    dataset: str
    file_name: str
    format: FileFormat = FileFormat.CSV
    mode: ImportMode = ImportMode.INSERT
    file_size: int | None = None
    dry_run: bool = False
    max_errors: int | None = None
    notify: bool = False
    column_map: JSON | None = strawberry.field(
        default=None, description="File header -> column; other headers match columns ignoring case and spaces."
    )
    results: bool = strawberry.field(
        default=False, description="Also write a results file: one line per input row with its outcome."
    )

    def to_request(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "format": self.format.value,
            "mode": self.mode.value,
            "columnMap": self.column_map,
            "results": self.results,
            "fileName": self.file_name,
            "fileSize": self.file_size,
            "dryRun": self.dry_run,
            "maxErrors": self.max_errors,
            "notify": self.notify,
        }
