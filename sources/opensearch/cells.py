"""What a value in an OpenSearch document's ``_source`` becomes: a cell of its column's type, one
document at a time (``cell_converter``, which the OpenSearch sink uses too), or the error that
names the document and the column (``BadCell`` inside, a ``SourceError`` out).

This is the reference: ``decoding.PageReader`` gives the same cells a page at a time, by column,
mostly in C (its docstring says how).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from sources.base import Column, Row, SourceError, iso_datetime


class BadCell(Exception):
    pass


def _one(value: Any) -> Any:
    """A list holds one value (or none) for a column; OpenSearch indexes [x] exactly as x."""
    if value.__class__ is list:
        if not value:
            return None
        if len(value) == 1:
            return value[0]
    raise BadCell


def _string(value: Any) -> Any:
    if value is None or value.__class__ is str:
        return value
    if value.__class__ is list:
        return _string(_one(value))
    if value.__class__ is bool:
        return "true" if value else "false"
    if value.__class__ in (int, float):  # a keyword field indexes a number as its text
        return json.dumps(value)
    raise BadCell


def _integer(value: Any) -> Any:
    if value is None or value.__class__ is int:
        return value
    if value.__class__ is float and value.is_integer():
        return int(value)
    if value.__class__ is list:
        return _integer(_one(value))
    raise BadCell


def _float(value: Any) -> Any:
    if value is None or value.__class__ is float:
        return value
    if value.__class__ is int:
        return float(value)
    if value.__class__ is list:
        return _float(_one(value))
    raise BadCell


def _boolean(value: Any) -> Any:
    if value is None or value.__class__ is bool:
        return value
    if value == "true" or value == "false":  # what OpenSearch itself accepts for a boolean
        return value == "true"
    if value.__class__ is list:
        return _boolean(_one(value))
    raise BadCell


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _instant(value: Any) -> dt.datetime:
    """A date-time as OpenSearch keeps it in _source: ISO text (no offset = UTC) or epoch millis."""
    if value.__class__ is str:
        if value.lstrip("-").isdigit():
            return _EPOCH + dt.timedelta(milliseconds=int(value))
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise BadCell from None
        return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
    if value.__class__ in (int, float):
        return _EPOCH + dt.timedelta(milliseconds=value)
    raise BadCell


def _datetime(value: Any) -> Any:
    if value is None:
        return None
    if value.__class__ is str and len(value) == 20 and value[19] == "Z" and value[10] == "T":
        try:  # already the one text form (whole seconds, UTC): checked, kept
            dt.datetime.fromisoformat(value)
        except ValueError:
            raise BadCell from None
        return value
    if value.__class__ is list:
        return _datetime(_one(value))
    return iso_datetime(_instant(value))


def _date(value: Any) -> Any:
    if value is None:
        return None
    if value.__class__ is str and len(value) == 10:
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            raise BadCell from None
    if value.__class__ is list:
        return _date(_one(value))
    return _instant(value).date().isoformat()


_CELLS: dict[str, Callable[[Any], Any]] = {
    "string": _string, "integer": _integer, "float": _float, "boolean": _boolean, "date": _date,
    "datetime": _datetime,
}  # fmt: skip


def _flatten(source: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}. An array of objects gives each dotted name all its values."""
    if out is None:
        out = {}
    for key, value in source.items():
        name = prefix + key
        if value.__class__ is dict:
            _flatten(value, name + ".", out)
        elif value.__class__ is list and value and all(v.__class__ is dict for v in value):
            for item in value:
                for sub, sub_value in _flatten(item, name + ".").items():
                    out.setdefault(sub, []).append(sub_value)
        else:
            out[name] = value
    return out


_MISSING = object()


def _walker(name: str) -> Callable[[dict[str, Any]], Any]:
    """The value of a dotted column in a nested _source, or ``_MISSING`` when the path is not a
    plain walk through objects (then the document is flattened: arrays, literal dotted keys)."""
    parts = name.split(".")

    def walk(source: dict[str, Any]) -> Any:
        value: Any = source
        for part in parts:
            if value.__class__ is not dict:
                return _MISSING
            value = value.get(part, _MISSING)
            if value is _MISSING:
                return _MISSING
        return value

    return walk


def cell_converter(columns: tuple[Column, ...]) -> Callable[[list[dict[str, Any]]], list[Row]]:
    """Hits → tuples in column order, each cell of its column's type; a value of the wrong type
    is a ``SourceError`` that names the document and the column."""
    plan = [(c.name, _CELLS.get(c.type, _string)) for c in columns]
    walks = [(c.name, _walker(c.name) if "." in c.name else None, _CELLS.get(c.type, _string)) for c in columns]
    dotted = any("." in c.name for c in columns)

    def cells_of_nested(source: dict[str, Any]) -> Row:
        flat = None
        cells = []
        for name, walk, cell in walks:
            value = source.get(name) if walk is None else walk(source)
            if value is _MISSING:
                if flat is None:
                    flat = _flatten(source)
                value = flat.get(name)
            cells.append(cell(value))
        return tuple(cells)

    def convert(hits: list[dict[str, Any]]) -> list[Row]:
        rows: list[Row] = []
        append = rows.append
        for hit in hits:
            source = hit.get("_source") or {}
            try:
                if dotted:
                    append(cells_of_nested(source))
                else:
                    get = source.get
                    append(tuple([cell(get(name)) for name, cell in plan]))
            except BadCell:
                raise _bad_cell(hit, _flatten(source), columns) from None
        return rows

    return convert


def _bad_cell(hit: Mapping[str, Any], source: Mapping[str, Any], columns: tuple[Column, ...]) -> SourceError:
    for column in columns:
        value = source.get(column.name)
        try:
            _CELLS.get(column.type, _string)(value)
        except BadCell:
            where = f"Document '{hit.get('_id')}' in index '{hit.get('_index')}'"
            if isinstance(value, list) and len(value) > 1:
                return SourceError(
                    f"{where}: column '{column.name}' holds {len(value)} values {_clip(value)}; an export takes one "
                    f"value per cell. Store a single value, or leave the column out of the export."
                )
            article = "an" if column.type[0] in "aeiou" else "a"
            return SourceError(
                f"{where}: column '{column.name}' holds {_clip(value)}, which is not {article} {column.type}. "
                f"Correct the document, or declare the column as string."
            )
    return SourceError(f"Document '{hit.get('_id')}' in index '{hit.get('_index')}' could not be read.")


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
