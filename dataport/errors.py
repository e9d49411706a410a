"""Expected failures, reported to clients as ``userErrors`` with a stable code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UserError:
    message: str
    code: str
    field: tuple[str, ...] | None = None


class UserErrors(Exception):
    """One or more user errors; nothing was changed."""

    def __init__(self, errors: Sequence[UserError]):
        super().__init__("; ".join(e.message for e in errors))
        self.errors = list(errors)

    @classmethod
    def one(cls, message: str, code: str, *field: str) -> UserErrors:
        return cls([UserError(message, code, tuple(field) or None)])


# Stable codes, so that clients can translate and branch on them.
DATASET_NOT_FOUND = "DATASET_NOT_FOUND"
UNKNOWN_COLUMN = "UNKNOWN_COLUMN"
DUPLICATE_COLUMN = "DUPLICATE_COLUMN"
NO_COLUMNS = "NO_COLUMNS"
INVALID_LIMIT = "INVALID_LIMIT"
NOT_FILTERABLE = "NOT_FILTERABLE"
NOT_SORTABLE = "NOT_SORTABLE"
UNSUPPORTED_OPERATOR = "UNSUPPORTED_OPERATOR"
INVALID_FILTER_VALUE = "INVALID_FILTER_VALUE"
TOO_MANY_VALUES = "TOO_MANY_VALUES"
TOO_MANY_ROWS = "TOO_MANY_ROWS"
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
NOT_FOUND = "NOT_FOUND"
INVALID_STATUS = "INVALID_STATUS"
SOURCE_UNAVAILABLE = "SOURCE_UNAVAILABLE"
NOT_IMPORTABLE = "NOT_IMPORTABLE"
INVALID_FILE_NAME = "INVALID_FILE_NAME"
FILE_TOO_LARGE = "FILE_TOO_LARGE"
INVALID_MAX_ERRORS = "INVALID_MAX_ERRORS"
NO_KEY = "NO_KEY"
UPLOAD_MISSING = "UPLOAD_MISSING"
UPLOAD_EXPIRED = "UPLOAD_EXPIRED"
# Imports (issue 20): an ImportInput.columnMap naming unknown columns, or a header or column twice.
INVALID_COLUMN_MAP = "INVALID_COLUMN_MAP"
# Exports (issue 20): an ExportInput.label that is too long or holds control characters.
INVALID_LABEL = "INVALID_LABEL"

# Hostile input (issue 15): user errors.
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"

# Top-level GraphQL errors (``extensions.code``) and HTTP error bodies.
UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
RATE_LIMITED = "RATE_LIMITED"
QUERY_TOO_COMPLEX = "QUERY_TOO_COMPLEX"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"

# Import files (issue 15): a task error, the file exceeds a parser's bound (depth, size, inflation).
FILE_LIMIT_EXCEEDED = "FILE_LIMIT_EXCEEDED"
# A request the api cannot read as GraphQL-over-HTTP at all (HTTP 400).
BAD_REQUEST = "BAD_REQUEST"
# Uploads (issue 15): the stored file's size differs from the fileSize the import declared.
FILE_SIZE_MISMATCH = "FILE_SIZE_MISMATCH"
