"""A JSON value typed the way PostgreSQL's casts type it (``_Extract``), for documents flattened in
Python: the same cells as the fields read in SQL. A value that does not fit its column fails the
read with the row and the column (``_CellError``, then ``_RowError``, which crosses from a helper
process whole).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from sources.base import SourceError, iso_datetime
from sources.postgres.fields import Field


class _Extract:
    """Typing a JSON value the way the SQL casts do; a SourceError (row and column) otherwise."""

    _TRUE = frozenset(("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"))
    _FALSE = frozenset(("f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"))

    def __init__(self, field: Field):
        self.name = field.column.name
        self.kind = field.column.type
        self.path = field.path
        self.native = {"string": str, "integer": int, "float": float, "boolean": bool}.get(self.kind)
        self.convert: Callable[[Any], Any] = getattr(self, "_" + self.kind)

    def get(self, doc: Any) -> Any:
        for key in self.path:
            if doc.__class__ is dict:
                doc = doc.get(key)
            elif doc.__class__ is list and key.lstrip("-").isdigit():
                i = int(key)
                doc = doc[i] if -len(doc) <= i < len(doc) else None
            else:
                return None
        return doc

    @staticmethod
    def _string(v: Any) -> Any:
        if v is None or v.__class__ is str:
            return v
        if v is True or v is False:
            return "true" if v else "false"
        return json.dumps(v, ensure_ascii=False)  # jsonb's text of numbers, objects, arrays

    def _float(self, v: Any) -> Any:
        if v is None or v.__class__ is float:
            return v
        if v.__class__ is int:
            return float(v)
        if v.__class__ is str and "_" not in v:
            with contextlib.suppress(ValueError):
                return float(v)
        raise self._refuse(v)

    def _integer(self, v: Any) -> Any:
        if v is None or v.__class__ is int:
            return v
        if v.__class__ is float and v.is_integer():
            return int(v)
        if v.__class__ is str and "_" not in v:
            with contextlib.suppress(ValueError):
                return int(v.strip())
        raise self._refuse(v)

    def _boolean(self, v: Any) -> Any:
        if v is None or v is True or v is False:
            return v
        text = str(v).strip().lower() if v.__class__ in (str, int) else None
        if text in self._TRUE:
            return True
        if text in self._FALSE:
            return False
        raise self._refuse(v)

    def _date(self, v: Any) -> Any:
        if v is None:
            return None
        if v.__class__ is str:
            with contextlib.suppress(ValueError):
                return dt.date.fromisoformat(v).isoformat()
            with contextlib.suppress(ValueError):
                return dt.datetime.fromisoformat(v).date().isoformat()
        raise self._refuse(v)

    def _datetime(self, v: Any) -> Any:
        if v is None:
            return None
        if v.__class__ is str:
            try:
                parsed = dt.datetime.fromisoformat(v)
            except ValueError:
                pass
            else:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                return iso_datetime(parsed)
        raise self._refuse(v)

    def _refuse(self, v: Any) -> SourceError:
        return _CellError(self.name, self.kind, v)


class _CellError(SourceError):
    def __init__(self, name: str, kind: str, value: Any):
        super().__init__(name)
        self.name, self.kind, self.value = name, kind, value


class _RowError(SourceError):
    """A document's field that does not convert, by the row's number: in the read, or in its key
    range when a helper process read the range (the worker adds the rows before it)."""

    def __init__(self, row: int, detail: str):
        super().__init__(row, detail)  # both in args, so that it is pickled whole
        self.row, self.detail = row, detail

    def __str__(self) -> str:
        return f"Row {self.row}: {self.detail}"
