"""A batch of records checked and converted column by column: ``ColumnChecker``, how CSV is read.

``ColumnChecker`` makes ``formats.row_converter``'s checks and conversions for a batch of rows at
a time: one regex over a whole column takes every cell already in its final form, and only the
others meet the column's converter (``formats.converters``), which alone decides what they are.
It can also hand the valid cells on as text (``TEXT``), for PostgreSQL's COPY, without making
typed values at all; ``text_form`` and the ``*_TEXT`` patterns say how that text looks. It decides
every cell as the converters do (the tests compare them cell by cell). Measured with
``python tests/test_readers.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, cast

from dataport.columns import Column
from formats.converters import BOOLEANS, CellError, Refused, converter
from formats.csv import unguard

# --- column by column -----------------------------------------------------------------------------
#
# CSV cells are all text, and a column of a file is uniform: nearly every cell of an integer column
# is plain digits, nearly every date-time already in iso_datetime's form. So ColumnChecker takes a
# batch of records column by column: a column's cells are joined with "\n" and one regex, in C, takes
# every cell that is already in the form its converter would return (or, for floats, a plain decimal
# that float() reads as it stands); the cells where the regex stops, and only those, go to the
# column's converter, which alone decides what they are. Booleans are looked up in a dict of their
# spellings, text is only looked at for the formula guard, its length and emptiness. (An empty cell
# is found with all(cells), which only looks at lengths; `"" in cells` compares every text.)
# tests/test_readers.py checks ColumnChecker against the converters cell by cell, like compile_row.

NO_OUTPUT, TYPED, TEXT = 0, 1, 2  # what ColumnChecker.check returns besides the failures

_YEAR = "(?!0000)[0-9]{4}"  # date.fromisoformat takes the years 1 to 9999
_LEAP_YEAR = "(?!0000)(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[048]|[2468][048]|[13579][26])00)"
# Each form below is a list of alternatives: the column regexes are quickest with every branch flat.
# YYYY-MM-DD for a day that exists: exactly the texts _date takes.
_DAYS = [
    rf"{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])",
    rf"{_YEAR}-(?:0[13-9]|1[0-2])-(?:29|30)",
    rf"{_YEAR}-(?:0[13578]|1[02])-31",
    rf"{_LEAP_YEAR}-02-29",
]
_TIME = "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
# What iso_datetime writes, for a moment that exists: _datetime returns these texts unchanged.
_CANONICAL_DATETIMES = [rf"{day}{_TIME}(?:\.[0-9]{{0,5}}[1-9])?Z" for day in _DAYS]
# Integers as str(int) writes them, 18 digits at most (within 64 bits).
_PLAIN_INTEGERS = ["[1-9][0-9]{0,17}", "-[1-9][0-9]{0,17}", "0"]
# Decimals float() reads, far from overflow (< 1e115) and from underflow (>= 1e-140, or zero).
_PLAIN_FLOATS = [r"[0-9]{1,15}\.[0-9]{1,40}", r"[+-]?[0-9]{1,15}(?:\.[0-9]{0,40})?(?:[eE][+-]?[0-9]{1,2})?"]
DATE_TEXT = "|".join(_DAYS)
CANONICAL_DATETIME_TEXT = "|".join(_CANONICAL_DATETIMES)
PLAIN_INTEGER_TEXT = "|".join(_PLAIN_INTEGERS)
PLAIN_FLOAT_TEXT = "|".join(_PLAIN_FLOATS)
# The same with trailing zeros in the fraction too (".500Z", ".000Z"), which iso_datetime does not
# write: the column regex takes them, and _TRAILING_ZEROS finds them (a search for a "."
# is quick) to be cut (".5Z", "Z"), as the converter would.
_ISO_DATETIMES = [rf"{day}{_TIME}(?:\.[0-9]{{1,6}})?Z" for day in _DAYS]
_TRAILING_ZEROS = re.compile(r"\.[0-9]*0Z").finditer


def _column_pattern(cells: list[str]) -> Callable[..., re.Match[str] | None]:
    """A matcher of cells each followed by "\n", each one empty or one of ``cells``, from a
    position on (to the first cell that is neither)."""
    return re.compile("(?:" + "".join(rf"{cell}\n|" for cell in cells) + r"\n)*+").match


_INTEGER_COLUMN = _column_pattern(_PLAIN_INTEGERS)
_FLOAT_COLUMN = _column_pattern(_PLAIN_FLOATS)
_DATE_COLUMN = _column_pattern(_DAYS)
_DATETIME_COLUMN = _column_pattern(_ISO_DATETIMES)


def _joined(cells: Sequence[Any]) -> str | None:
    """The cells each followed by "\n", if they are all text and none holds a "\n"."""
    try:
        joined = "\n".join(cells)
    except TypeError:  # not all text
        return None
    if joined.count("\n") != len(cells) - 1:  # a cell holds a line break (and is bad)
        return None
    return joined + "\n"


def _unmatched(match: Callable[..., re.Match[str] | None], joined: str) -> list[int]:
    """The indexes of the cells of ``joined`` (see ``_joined``) that the column matcher ``match``
    does not take: a few calls per such cell, none per other cell."""
    bad: list[int] = []
    pos = index = 0
    size = len(joined)
    while True:
        end = match(joined, pos).end()  # type: ignore[union-attr]  # the pattern takes "" too
        if end == size:
            return bad
        index += joined.count("\n", pos, end)  # the cell the match stopped at
        bad.append(index)
        pos = joined.index("\n", end) + 1
        index += 1


_BOOL_TEXT: dict[str, str] = {"": ""}  # each spelling (lower, upper, capitalised) -> "t" or "f"
for _spelling, _value in BOOLEANS.items():
    for _form in (_spelling, _spelling.upper(), _spelling.capitalize()):
        _BOOL_TEXT[_form] = "t" if _value else "f"
_TEXT_BOOL: dict[str | None, bool | None] = {"t": True, "f": False, "": None}  # None: a bad cell


def text_form(value: Any) -> str:
    """How ``TEXT`` output spells a converted value: ``""`` for None, ``t``/``f`` for booleans,
    ``repr`` for floats, decimal for integers, text as it is."""
    if value is None:
        return ""
    if value is True or value is False:
        return "t" if value else "f"
    if value.__class__ is float:
        return repr(value)
    return str(value)


class ColumnChecker:
    """``RowConverter``'s checks and conversions for a batch of records given column by column.

    ``check(cells, output)`` takes one sequence of raw cells per column (all of a length: one cell
    per record) and returns the failures, as ``{record index: [CellError, …]}`` (the bad cells of
    each failed record, in column order, with the reasons the converters give), and, by ``output``:

    - ``TYPED``: each column's values, exactly what ``RowConverter`` returns for them;
    - ``TEXT``: each column's values as text, for stores that parse text (PostgreSQL's COPY):
      ``""`` for no value (so only with ``unguard_text``, where text has no empty value either),
      integers in decimal, booleans ``t``/``f``, dates, date-times and text as ``TYPED`` has them,
      floats as a decimal that ``float()`` reads as the value: the file's own text when it is a
      plain decimal (``PLAIN_FLOAT_TEXT``: ``1.50``, ``2e-3``), else ``repr``;
    - ``NO_OUTPUT``: nothing (a dry run).

    The columns hold a value at the index of every record, failed ones too (anything): the caller
    drops those records. Cells that are all text take the column paths (see above); a column
    holding other values (JSON, XLSX) is converted cell by cell.
    """

    def __init__(self, columns: Sequence[Column], *, unguard_text: bool) -> None:
        self.columns = tuple(columns)
        self.unguard_text = unguard_text
        self._converters = tuple(converter(c, unguard_text=unguard_text) for c in self.columns)
        self._fast = tuple(self._FAST.get(c.type) for c in self.columns)

    def check(
        self, cells: Sequence[Sequence[Any]], output: int
    ) -> tuple[list[Sequence[Any]] | None, dict[int, list[CellError]]]:
        if output == TEXT and not self.unguard_text:
            raise ValueError("TEXT output spells no value as '', which only unguard_text has for text")
        errors: dict[int, list[CellError]] = {}
        out: list[Sequence[Any]] = []
        for k, column in enumerate(cells):
            fast = self._fast[k]
            done = fast(self, k, column, output, errors) if fast is not None else None
            if done is None:
                done = self._cells(k, column, range(len(column)), [None] * len(column), output, errors)
            out.append(done)
        return (out if output != NO_OUTPUT else None), errors

    def _cells(
        self,
        k: int,
        cells: Sequence[Any],
        indexes: Sequence[int],
        out: list[Any],
        output: int,
        errors: dict[int, list[CellError]],
    ) -> list[Any]:
        """``cells`` at ``indexes`` through the column's converter, into ``out`` (never ``cells``
        itself: the originals go to the error report)."""
        convert, name = self._converters[k], self.columns[k].name
        for i in indexes:
            try:
                value = convert(cells[i])
            except Refused as refused:
                errors.setdefault(i, []).append(CellError(name, str(refused)))
                continue
            if output == TEXT:
                out[i] = text_form(value)
            elif output == TYPED:
                out[i] = value
        return out

    def _pattern(
        self,
        k: int,
        cells: Sequence[Any],
        match: Callable[..., re.Match[str] | None],
        output: int,
        errors: dict[int, list[CellError]],
        typed: Callable[[str], Any] | None,
    ) -> Sequence[Any] | None:
        """A column whose plain cells are their own text form; ``typed`` makes their value."""
        joined = _joined(cells)
        if joined is None:
            return None
        bad = _unmatched(match, joined)
        if self.columns[k].required and not all(cells):  # an empty cell: the converter says why
            bad = sorted({*bad, *(i for i, v in enumerate(cells) if not v)})
        return self._finish(k, cells, bad, output, errors, typed)

    def _finish(
        self,
        k: int,
        cells: Sequence[str],
        bad: list[int],
        output: int,
        errors: dict[int, list[CellError]],
        typed: Callable[[str], Any] | None,
    ) -> Sequence[Any]:
        if output == NO_OUTPUT:
            return self._cells(k, cells, bad, [], output, errors)
        if output == TEXT and not bad:
            return cells
        out: list[Any] = list(cells)
        if output == TYPED and typed is not None:
            for i in bad:
                out[i] = ""
            out = list(map(typed, out)) if all(out) else [typed(v) if v else None for v in out]
        elif output == TYPED and not all(out):
            out = [v or None for v in out]
        return self._cells(k, cells, bad, out, output, errors) if bad else out

    def _integer(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        return self._pattern(k, cells, _INTEGER_COLUMN, output, errors, int)

    def _float(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        return self._pattern(k, cells, _FLOAT_COLUMN, output, errors, float)

    def _date(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        return self._pattern(k, cells, _DATE_COLUMN, output, errors, None)

    def _datetime(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        joined = _joined(cells)
        if joined is None:
            return None
        bad = _unmatched(_DATETIME_COLUMN, joined)
        if self.columns[k].required and not all(cells):
            bad = sorted({*bad, *(i for i, v in enumerate(cells) if not v)})
        out = self._finish(k, cells, [], output, errors, None)
        zeros = _TRAILING_ZEROS(joined) if output != NO_OUTPUT else iter(())
        first = next(zeros, None)
        if first is not None:
            out = list(out)  # a copy: the cells are the caller's
            index = at = 0
            for match in chain((first,), zeros):
                index += joined.count("\n", at, match.start())
                at = match.start()
                v = cells[index]
                if v.endswith("0Z"):  # (else a bad cell, which the converter settles below)
                    out[index] = v[:-1].rstrip("0").rstrip(".") + "Z"
        if not bad:
            return out
        # A copy when ``out`` is the caller's cells; any other ``out`` is a list of our own.
        mine = out if isinstance(out, list) and out is not cells else list(out)
        return self._cells(k, cells, bad, mine, output, errors)

    def _boolean(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        try:
            texts: list[str | None] = list(map(_BOOL_TEXT.get, cells))
        except TypeError:  # an unhashable cell (a JSON object)
            return None
        bad: list[int]
        try:
            # The join raises TypeError at a None: quicker than `None in texts`, which compares
            # every text with None.
            "".join(texts)  # type: ignore[arg-type]  # the None it may meet is the point
            bad = []
        except TypeError:  # a None: a spelling the dict does not have
            bad = [i for i, v in enumerate(texts) if v is None]
        if self.columns[k].required and not all(texts):
            bad = sorted({*bad, *(i for i, v in enumerate(texts) if v == "")})
        values: list[Any] = texts
        if output == TYPED:
            values = list(map(_TEXT_BOOL.get, texts))
        return self._cells(k, cells, bad, values, output, errors) if bad else values

    def _string(
        self, k: int, cells: Sequence[Any], output: int, errors: dict[int, list[CellError]]
    ) -> Sequence[Any] | None:
        if not self.unguard_text:  # "" is a value then: the converter decides, cell by cell
            return None
        try:
            joined = "\0".join(cells)
        except TypeError:
            return None
        column = self.columns[k]
        texts = cells
        if joined[:1] == "'" or "\0'" in joined:  # some cell begins with a quote: it may carry the guard
            texts = [unguard(v) for v in cells]
        bad: list[int] = []
        if column.max_length is not None and cells and max(map(len, texts)) > column.max_length:
            bad = [i for i, v in enumerate(texts) if len(v) > column.max_length]
        if column.required and not all(cells):
            bad = sorted({*bad, *(i for i, v in enumerate(cells) if not v)})
        if output == TYPED:
            texts = list(texts) if all(texts) else [v or None for v in texts]
        elif bad and output == TEXT:
            texts = list(texts)
        if not bad:
            return texts
        # A list of our own wherever _cells writes into it (TEXT, TYPED); with NO_OUTPUT it may
        # still be the caller's cells, which _cells then does not touch.
        return self._cells(k, cells, bad, cast("list[Any]", texts), output, errors)

    _FAST: dict[
        str, Callable[[ColumnChecker, int, Sequence[Any], int, dict[int, list[CellError]]], Sequence[Any] | None]
    ] = {
        "string": _string, "integer": _integer, "float": _float, "boolean": _boolean, "date": _date,
        "datetime": _datetime,
    }  # fmt: skip
