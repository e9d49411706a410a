"""One record's cells checked against the dataset's columns and converted to their types.

``RowConverter`` turns the raw cells a reader gives (CSV: text; JSON: JSON values; XLSX: what
openpyxl reads) into the typed values the sources write, the same types exports start from:

=========  =======================================================================================
string     ``str``; with ``unguard_text`` (CSV, XLSX) the export's formula guard is undone, and ``""``
           is no value (CSV cannot tell them apart, XLSX has no empty text). JSON keeps ``""``.
           ``max_length`` counts characters. A number, boolean or date is refused, not turned into
           text: a spreadsheet that made ``00123`` a number has already lost the zeros.
integer    ``int`` within 64 bits. Text: an optional sign and ASCII digits, nothing else (no
           spaces, ``_``, ``12.0`` or ``1e3``). A float (JSON ``3.0``, any XLSX number) only if
           integral and at most 2**53, beyond which a double no longer holds every integer.
float      finite ``float``; ints are taken. Text: Python's float syntax without spaces, ``_``,
           ``nan`` or ``inf``; a value too large for a double is refused.
boolean    ``bool``. Text, any case: ``true``/``false``, ``t``/``f``, ``yes``/``no``, ``1``/``0``.
           The numbers 1 and 0 too (MySQL exports and spreadsheets write them).
date       ``YYYY-MM-DD`` text. Text must be exactly that (no ``20240102``, no week dates); XLSX
           dates (datetimes at midnight) and ``date`` objects are taken.
datetime   ``iso_datetime`` text (UTC, ``Z``). Text: ``YYYY-MM-DD``, ``T`` or a space, ``HH:MM``
           with optional ``:SS`` and up to six fractional digits, then ``Z``, ``±HH:MM``,
           ``±HHMM``, ``±HH`` or nothing, which means UTC; offsets are converted to UTC. XLSX
           datetimes (naive: UTC) are taken.
=========  =======================================================================================

JSON leniency: a column accepts its native JSON type and also a string holding a valid value
(``"12"`` for an integer, ``"true"`` for a boolean), as CSV would; ``""`` is no value for every
column but text; booleans are never numbers (``true`` in an integer column is refused). Values
of other JSON types (objects, arrays, a number for a text column) are refused with what was found.

Speed: ``RowConverter`` builds one converter (a closure) per column up front, and from them one
row function (``compile_row``) that settles the common cells inline and calls a converter only
for the rest. Refusals are ``Refused`` exceptions, which cost nothing when not raised; only when
one is raised does ``convert`` go back over the row, converter by converter, to name every bad
cell. That is the path of records (JSON, NDJSON, XLSX). A CSV import goes through
``ColumnChecker`` instead, a batch at a time and column by column: one regex over a whole column
takes every cell already in its final form, and only the others meet the converter (see "column
by column" below); it can also hand the valid cells on as text (``TEXT``), for PostgreSQL's COPY,
without making typed values at all. Both decide every cell as the converters do (the tests compare
them cell by cell). Measured with ``python tests/test_readers.py``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from formats.csv import unguard
from formats.limits import LongNumber, listed
from sources.base import Column, iso_datetime

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
EXACT_INT_FLOAT = 2**53  # every integer up to this is exactly a double; past it, some are not

REQUIRED = "required, but empty"
DATETIME_FORMAT = "YYYY-MM-DDTHH:MM:SS, optionally with a fraction and Z or ±HH:MM"


@dataclass(frozen=True)
class CellError:
    column: str
    reason: str


class Refused(ValueError):
    """A cell that cannot be a value of its column; the message is the user-facing reason."""


class RowConverter:
    """Converts the cells of one record to a row of ``columns``' types (see the module docstring)."""

    def __init__(self, columns: Sequence[Column], *, unguard_text: bool) -> None:
        self.columns = tuple(columns)
        self.names = tuple(c.name for c in self.columns)
        self._converters = tuple(converter(c, unguard_text=unguard_text) for c in self.columns)
        self._row = compile_row(self.columns, self._converters, unguard_text=unguard_text)

    def convert(self, values: dict[str, Any]) -> tuple[tuple | None, list[CellError]]:
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


def converter(column: Column, *, unguard_text: bool) -> Callable[[Any], Any]:
    """The function that converts one raw cell of ``column``; it raises ``Refused``."""
    kind = column.type
    if kind == "string":
        return _string(column.required, column.max_length, unguard_text)
    make = _CONVERTERS.get(kind)
    if make is None:
        raise ValueError(f"column {column.name!r} has an unknown type {kind!r}")
    return make(column.required)


# --- messages ------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A cell as an error message quotes it: text in quotes (cut after 40 characters), else repr
    (an integer of more than 40 digits by its size: repr() of a huge one is slow, or refused)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if value.__class__ is int and value.bit_length() > 132:
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return repr(value)


def kind_of(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"a number ({show(value)})"
    if isinstance(value, LongNumber):
        return value.describe()
    if isinstance(value, str):
        return f"text ({show(value)})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dt.datetime):
        return f"a date-time ({value.isoformat(sep=' ')})"
    if isinstance(value, dt.date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, dt.time):
        return f"a time of day ({value.isoformat()})"
    return f"a {type(value).__name__}"


def _missing(value: Any, required: bool, expected: str) -> None:
    """What a cell that is not of the expected type comes to: None (no value) or a refusal."""
    if value is None or value == "":
        if required:
            raise Refused(REQUIRED)
        return None
    raise Refused(f"expected {expected}, got {kind_of(value)}")


# --- one converter per type ----------------------------------------------------------------------


def _string(required: bool, max_length: int | None, unguard_text: bool) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        if v.__class__ is not str or (unguard_text and not v):
            return _missing(v, required, "text")
        if unguard_text and v[0] == "'":  # only text starting with a quote can carry the guard
            v = unguard(v)
        if max_length is not None and len(v) > max_length:
            raise Refused(f"longer than {max_length} characters ({len(v)})")
        return v

    return convert


_INT_TEXT = re.compile(r"[+-]?[0-9]+").fullmatch


def _integer(required: bool) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        cls = v.__class__
        if cls is str:
            # isdigit() alone takes other scripts' digits, which int() reads; isascii() is O(1).
            if v.isascii() and (v.isdigit() or (v[:1] in ("-", "+") and v[1:].isdigit())):
                if len(v) < 19:  # at most 18 digits: within 64 bits
                    return int(v)
                if len(v.lstrip("+-0")) > 19:  # out of range: never int() of it (4,301 digits raise)
                    raise Refused(f"{show(v)} is out of range for an integer (-2^63 to 2^63-1; "
                                  f"{len(v.lstrip('+-0')):,} digits)")
                n = int(v)
            elif v:
                raise Refused(f"{show(v)} is not an integer")
            else:
                return _missing(v, required, "an integer")
        elif cls is int:
            n = v
        elif cls is float:
            if not (v.is_integer() and -EXACT_INT_FLOAT <= v <= EXACT_INT_FLOAT):
                if v.is_integer():
                    raise Refused(f"{v!r} is too large to be an exact integer here; write it as text or in JSON")
                raise Refused(f"{show(v)} is not an integer")
            n = int(v)
        else:
            return _missing(v, required, "an integer")
        if INT_MIN <= n <= INT_MAX:
            return n
        raise Refused(f"{show(v)} is out of range for an integer (-2^63 to 2^63-1)")

    return convert


_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?").fullmatch
_NOT_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _float(required: bool) -> Callable[[Any], Any]:
    isfinite = math.isfinite

    def convert(v: Any) -> Any:
        cls = v.__class__
        if cls is float:
            x = v
        elif cls is str:
            # Plain decimals ("12.5", "0.1") pass a cheap check; signs and exponents the regex.
            digits = v.replace(".", "", 1)
            if not ((digits.isdigit() and digits.isascii()) or _FLOAT_TEXT(v)):
                if v.lower() in _NOT_FINITE:
                    raise Refused(f"{show(v)} is not a finite number")
                if v:
                    raise Refused(f"{show(v)} is not a number")
                return _missing(v, required, "a number")
            x = float(v)
        elif cls is int:
            try:
                x = float(v)
            except OverflowError:
                raise Refused(f"{show(v)} is out of range for a float") from None
        else:
            return _missing(v, required, "a number")
        if isfinite(x):
            return x
        if cls is str:
            raise Refused(f"{show(v)} is out of range for a float")
        raise Refused(f"{show(v)} is not a finite number")

    return convert


_BOOLEANS = {
    "true": True, "t": True, "yes": True, "1": True,
    "false": False, "f": False, "no": False, "0": False,
}  # fmt: skip
BOOLEAN_SPELLINGS = "true/false, yes/no, t/f or 1/0"


def _boolean(required: bool) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        cls = v.__class__
        if cls is bool:
            return v
        if cls is str:
            b = _BOOLEANS.get(v)
            if b is None:
                b = _BOOLEANS.get(v.lower())
            if b is not None:
                return b
            if v:
                raise Refused(f"{show(v)} is not a boolean ({BOOLEAN_SPELLINGS})")
        elif (cls is int or cls is float) and (v == 1 or v == 0):
            return v == 1
        return _missing(v, required, "a boolean")

    return convert


_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}").fullmatch
_MIDNIGHT = dt.time()


# Dates repeat: each converter remembers up to this many it has checked, to skip the parse.
SEEN_DATES = 50_000


def _date(required: bool) -> Callable[[Any], Any]:
    parse = dt.date.fromisoformat
    seen: set[str] = set()

    def convert(v: Any) -> Any:
        cls = v.__class__
        if cls is str:
            if v in seen:
                return v
            if _DATE_TEXT(v):
                try:
                    parse(v)
                except ValueError as error:
                    raise Refused(f"{show(v)} is not a date (YYYY-MM-DD): {error}") from None
                if len(seen) >= SEEN_DATES:
                    seen.clear()
                seen.add(v)
                return v
            if v:
                raise Refused(f"{show(v)} is not a date (YYYY-MM-DD)")
        elif cls is dt.datetime:
            if v.time() != _MIDNIGHT:
                raise Refused(f"{show(v)} is not a date: it has a time of day")
            return v.date().isoformat()
        elif cls is dt.date:
            return v.isoformat()
        return _missing(v, required, "a date")

    convert.seen = seen  # type: ignore[attr-defined]  # compile_row's fast path looks there first
    return convert


# The text iso_datetime writes: taken as it is once its numbers are checked.
_CANONICAL_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{0,5}[1-9])?Z"
).fullmatch
_DATETIME_TEXT = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]"  # the date, then T or a space
    r"([0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?)"  # HH:MM, optional :SS and fraction
    r"([Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?"  # the offset, if any
).fullmatch


def _datetime(required: bool) -> Callable[[Any], Any]:
    parse = dt.datetime.fromisoformat

    def convert(v: Any) -> Any:
        cls = v.__class__
        if cls is str:
            if _CANONICAL_DATETIME(v):
                try:
                    parse(v)
                except ValueError as error:
                    raise Refused(f"{show(v)} is not a date-time: {error}") from None
                return v
            match = _DATETIME_TEXT(v)
            if match:
                day, time, zone = match.groups()
                try:
                    return iso_datetime(parse(f"{day}T{time}{(zone or '').upper()}"))
                except (ValueError, OverflowError) as error:
                    raise Refused(f"{show(v)} is not a date-time: {error}") from None
            if v:
                raise Refused(f"{show(v)} is not a date-time ({DATETIME_FORMAT})")
        elif cls is dt.datetime:
            try:
                return iso_datetime(v)
            except OverflowError as error:
                raise Refused(f"{show(v)} is not a date-time: {error}") from None
        return _missing(v, required, "a date-time")

    return convert


_CONVERTERS: dict[str, Callable[[bool], Callable[[Any], Any]]] = {
    "integer": _integer,
    "float": _float,
    "boolean": _boolean,
    "date": _date,
    "datetime": _datetime,
}


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
) -> Callable[[dict[str, Any]], tuple]:
    """A function of a record's cells that returns the typed row or raises ``Refused``."""
    lines = ["def row(values):", "    get = values.get"]
    scope: dict[str, Any] = {"BOOLEANS": _BOOLEANS}
    for i, (column, convert) in enumerate(zip(columns, converters, strict=True)):
        scope[f"n{i}"], scope[f"c{i}"] = column.name, convert
        if column.type == "date":
            scope[f"s{i}"] = convert.seen  # type: ignore[attr-defined]
        lines.append(f"    x = get(n{i})")
        lines += [f"    {line}" for line in _fast_path(column, i, unguard_text)]
    lines.append(f"    return ({''.join(f'v{i}, ' for i in range(len(columns)))})")
    exec("\n".join(lines), scope)
    return scope["row"]


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


def _column_pattern(cells: list[str]) -> Callable[..., re.Match | None]:
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


def _unmatched(match: Callable[..., re.Match | None], joined: str) -> list[int]:
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
for _spelling, _value in _BOOLEANS.items():
    for _form in (_spelling, _spelling.upper(), _spelling.capitalize()):
        _BOOL_TEXT[_form] = "t" if _value else "f"
_TEXT_BOOL = {"t": True, "f": False, "": None}


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
    ) -> tuple[list[Sequence] | None, dict[int, list[CellError]]]:
        if output == TEXT and not self.unguard_text:
            raise ValueError("TEXT output spells no value as '', which only unguard_text has for text")
        errors: dict[int, list[CellError]] = {}
        out: list[Sequence] = []
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
        out: list,
        output: int,
        errors: dict[int, list[CellError]],
    ) -> list:
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
        match: Callable[..., re.Match | None],
        output: int,
        errors: dict[int, list[CellError]],
        typed: Callable[[str], Any] | None,
    ) -> list | None:
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
    ) -> Sequence:
        if output == NO_OUTPUT:
            return self._cells(k, cells, bad, [], output, errors)
        if output == TEXT and not bad:
            return cells
        out = list(cells)
        if output == TYPED and typed is not None:
            for i in bad:
                out[i] = ""
            out = list(map(typed, out)) if all(out) else [typed(v) if v else None for v in out]
        elif output == TYPED and not all(out):
            out = [v or None for v in out]
        return self._cells(k, cells, bad, out, output, errors) if bad else out

    def _integer(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
        return self._pattern(k, cells, _INTEGER_COLUMN, output, errors, int)

    def _float(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
        return self._pattern(k, cells, _FLOAT_COLUMN, output, errors, float)

    def _date(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
        return self._pattern(k, cells, _DATE_COLUMN, output, errors, None)

    def _datetime(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
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
        return self._cells(k, cells, bad, list(out) if out is cells else out, output, errors)

    def _boolean(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
        try:
            texts = list(map(_BOOL_TEXT.get, cells))
        except TypeError:  # an unhashable cell (a JSON object)
            return None
        try:
            "".join(texts)  # quicker than `None in texts`, which compares every text with None
            bad = []
        except TypeError:  # a None: a spelling the dict does not have
            bad = [i for i, v in enumerate(texts) if v is None]
        if self.columns[k].required and not all(texts):
            bad = sorted({*bad, *(i for i, v in enumerate(texts) if v == "")})
        if output == TYPED:
            texts = list(map(_TEXT_BOOL.get, texts))
        return self._cells(k, cells, bad, texts, output, errors) if bad else texts

    def _string(self, k, cells, output, errors):  # type: ignore[no-untyped-def]
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
        return self._cells(k, cells, bad, texts, output, errors) if bad else texts

    _FAST: dict[str, Callable[..., list | None]] = {
        "string": _string, "integer": _integer, "float": _float, "boolean": _boolean, "date": _date,
        "datetime": _datetime,
    }  # fmt: skip


# --- header ----------------------------------------------------------------------------------------

SHOWN_NAMES = 10
SHOWN_UNKNOWN = 20


def _quoted(name: str) -> str:
    """A column name as a message lists it: bare, unless spaces or commas would hide where it ends."""
    return name if name and name.strip() == name and "," not in name else repr(name)


def header_problems(fields: Sequence[str], columns: Sequence[Column]) -> list[str]:
    """What is wrong with a CSV/XLSX header for these columns, before any row is read: names that
    are not columns of the dataset, and required columns the file lacks. ``[]`` when fine."""
    names = [c.name for c in columns]
    known = set(names)
    problems = []
    unknown = [f for f in fields if f not in known]
    if unknown:
        # (a 100,000-column header once made a 789 KB message, stored in the task and sent on every poll)
        message = f"unknown columns: {listed([_quoted(u) for u in unknown[:SHOWN_UNKNOWN]] + unknown[SHOWN_UNKNOWN:])}"
        hints = _suggestions(unknown, names, known.difference(fields))
        if hints:
            message += f" (did you mean {'; '.join(hints)}?)"
        if len(fields) == 1 and any(sep in fields[0] for sep in ";\t|"):
            sep = next(sep for sep in ";\t|" if sep in fields[0])
            message += f" (the header seems separated by {sep!r}: a CSV import needs commas)"
        shown = ", ".join(map(_quoted, names[:SHOWN_NAMES]))
        more = f" and {len(names) - SHOWN_NAMES:,} more" if len(names) > SHOWN_NAMES else ""
        message += f" (the dataset has: {shown}{more})"
        problems.append(message)
    present = set(fields)
    missing = [c.name for c in columns if c.required and c.name not in present]
    if missing:
        problems.append(f"missing required columns: {', '.join(map(_quoted, missing))}")
    return problems


def _suggestions(unknown: Sequence[str], names: Sequence[str], unused: set[str]) -> list[str]:
    """'name' for ' Name ': the same name but for case and spaces, else a close spelling, among the
    columns the file does not name yet (only for the first few unknown names: difflib is slow)."""
    folded = {name.strip().casefold(): name for name in names if name in unused}
    hints = []
    for field in unknown[:5]:
        match = folded.get(field.strip().casefold())
        if match is None:
            close = difflib.get_close_matches(field, [n for n in names if n in unused], n=1, cutoff=0.8)
            match = close[0] if close else None
        if match is not None:
            hints.append(f"{_quoted(match)} for {_quoted(field)}")
    return hints
