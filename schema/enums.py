"""GraphQL enums, exactly as the contract names them (DESIGN.md)."""

from __future__ import annotations

import enum

import strawberry

from tasks.models import TaskStatus as _TaskStatus

TaskStatus = strawberry.enum(_TaskStatus, name="TaskStatus")


@strawberry.enum
class FileFormat(enum.Enum):
    CSV = "CSV"
    JSON = "JSON"
    NDJSON = "NDJSON"
    XLSX = "XLSX"
    PARQUET = "PARQUET"


@strawberry.enum(description="How an export's file is compressed: its name then ends in .gz or .zst.")
class Compression(enum.Enum):
    NONE = "NONE"
    GZIP = "GZIP"
    ZSTD = "ZSTD"


@strawberry.enum
class FilterOp(enum.Enum):
    EQ = "EQ"
    NE = "NE"
    GT = "GT"
    GTE = "GTE"
    LT = "LT"
    LTE = "LTE"
    IN = "IN"
    NOT_IN = "NOT_IN"
    CONTAINS = "CONTAINS"
    PREFIX = "PREFIX"
    IS_NULL = "IS_NULL"
    BETWEEN = "BETWEEN"


@strawberry.enum
class SortDirection(enum.Enum):
    ASC = "ASC"
    DESC = "DESC"


@strawberry.enum
class ImportMode(enum.Enum):
    INSERT = "INSERT"
    UPSERT = "UPSERT"
    UPDATE = "UPDATE"


@strawberry.enum(
    description="How a finished import went: every row written (or, for a dry run, would be), some "
    "written and some refused, or every row refused."
)
class ImportOutcome(enum.Enum):
    COMPLETE = "COMPLETE"
    PARTIAL = "PARTIAL"
    NOTHING_WRITTEN = "NOTHING_WRITTEN"
