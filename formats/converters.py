"""One cell checked against its column's type and converted: a converter per type.

``converter(column, unguard_text=…)`` is the function that turns one raw cell a reader gives (CSV:
text; JSON: JSON values; XLSX: what openpyxl reads) into the typed value the sources write, the
same types exports start from, or raises ``Refused`` with the reason the user reads:

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

The converters alone decide what a value is and refuse what is not. Two callers take quicker paths
for the common cells, but only ever accept what the converter would return unchanged (the tests
compare them cell by cell): ``formats.row_converter`` (a record at a time: JSON, NDJSON, XLSX) and
``formats.column_checker`` (a batch of CSV rows, column by column). ``show`` and ``kind_of`` are
how a refusal quotes the cell.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataport.columns import Column, iso_datetime
from formats.csv import unguard
from formats.limits import LongNumber

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
                    raise Refused(
                        f"{show(v)} is out of range for an integer (-2^63 to 2^63-1; {len(v.lstrip('+-0')):,} digits)"
                    )
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


BOOLEANS = {
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
            b = BOOLEANS.get(v)
            if b is None:
                b = BOOLEANS.get(v.lower())
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
