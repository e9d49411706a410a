"""A record's cells checked against the dataset's columns and converted to a typed row.

``RowConverter`` is the path of records (JSON, NDJSON, XLSX); a CSV import goes a batch at a time,
column by column, through ``formats.column_checker``. What each cell may be is its column's
converter's call (``formats.converters``, whose docstring says what every type accepts).

Speed: ``RowConverter`` builds one converter (a closure) per column up front, and from them one
row function (``compile_row``) that settles the common cells inline and calls a converter only
for the rest. Refusals are ``Refused`` exceptions, which cost nothing when not raised; only when
one is raised does ``convert`` go back over the row, converter by converter, to name every bad
cell. Measured with ``python tests/test_readers.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dataport.columns import Column, Row
from formats.converters import BOOLEANS, INT_MAX, INT_MIN, CellError, Refused, converter


class RowConverter:
    """Converts the cells of one record to a row of ``columns``' types (see ``formats.converters``)."""

    def __init__(self, columns: Sequence[Column], *, unguard_text: bool) -> None:
        self.columns = tuple(columns)
        self.names = tuple(c.name for c in self.columns)
        self._converters = tuple(converter(c, unguard_text=unguard_text) for c in self.columns)
        self._row = compile_row(self.columns, self._converters, unguard_text=unguard_text)

    def convert(self, values: dict[str, Any]) -> tuple[Row | None, list[CellError]]:
        """``values`` (field -> raw cell, keys restricted to column names; absent ones are None) as
        a row tuple in column order and ``[]``, or ``None`` and an error for every bad cell."""
        try:
            return self._row(values), []
        except Refused:
            return None, self.errors(values)

    def errors(self, values: dict[str, Any]) -> list[CellError]:
        found = []
        for name, convert in zip(self.names, self._converters, strict=True):
            try:
                convert(values.get(name))
            except Refused as refused:
                found.append(CellError(name, str(refused)))
        return found


# --- the row function ------------------------------------------------------------------------------
#
# Calling one converter per cell costs a Python call each (about half of a 10-column row's time).
# So RowConverter compiles one function per column list that does, inline, the cheap checks that
# settle the common cell of each type (plain digits, plain text, a date seen before) and calls the
# column's converter for anything else. The converters alone decide what a value is and refuse
# what is not; the inline checks only ever accept what their converter would return unchanged,
# which tests/test_readers.py checks against the converters on every kind of cell. The source
# holds no text from the file or the dataset: names and converters are passed in as variables.


def _fast_path(column: Column, i: int, unguard_text: bool) -> list[str]:
    """Statements that set ``v{i}`` from the raw cell ``x``."""
    kind, convert = column.type, f"c{i}(x)"
    if kind == "string":
        check = "x.__class__ is str"
        if unguard_text:
            check += ' and x and x[0] != "\'"'  # "" is None, and only a quote can start the guard
        if column.max_length is not None:
            check += f" and len(x) <= {int(column.max_length)}"
        return [f"v{i} = x if {check} else {convert}"]
    if kind == "integer":
        return [
            f"if x.__class__ is str and x.isdigit() and x.isascii() and len(x) < 19: v{i} = int(x)",
            f"elif x.__class__ is int and {INT_MIN} <= x <= {INT_MAX}: v{i} = x",
            f"else: v{i} = {convert}",
        ]
    if kind == "float":
        return [
            "if x.__class__ is str and len(x) < 300 and (d := x.replace('.', '', 1)).isdigit() and d.isascii():",
            f"    v{i} = float(x)",  # fewer than 300 digits: finite
            f"elif x.__class__ is float and x - x == 0.0: v{i} = x",  # not NaN or infinite
            f"else: v{i} = {convert}",
        ]
    if kind == "boolean":
        return [f"v{i} = BOOLEANS.get(x) if x.__class__ is str else None", f"if v{i} is None: v{i} = {convert}"]
    if kind == "date":
        return [f"v{i} = x if x.__class__ is str and x in s{i} else {convert}"]
    return [f"v{i} = {convert}"]


def compile_row(
    columns: Sequence[Column], converters: Sequence[Callable[[Any], Any]], *, unguard_text: bool
) -> Callable[[dict[str, Any]], Row]:
    """A function of a record's cells that returns the typed row or raises ``Refused``."""
    lines = ["def row(values):", "    get = values.get"]
    scope: dict[str, Any] = {"BOOLEANS": BOOLEANS}
    for i, (column, convert) in enumerate(zip(columns, converters, strict=True)):
        scope[f"n{i}"], scope[f"c{i}"] = column.name, convert
        if column.type == "date":
            scope[f"s{i}"] = convert.seen  # type: ignore[attr-defined]  # set on the date converter (formats.converters)
        lines.append(f"    x = get(n{i})")
        lines += [f"    {line}" for line in _fast_path(column, i, unguard_text)]
    lines.append(f"    return ({''.join(f'v{i}, ' for i in range(len(columns)))})")
    exec("\n".join(lines), scope)
    row: Callable[[dict[str, Any]], Row] = scope["row"]  # the function exec just made
    return row
