"""CSV: UTF-8, a header row, RFC 4180 quoting, ``\\r\\n`` line endings.

What a cell becomes is what the stdlib ``csv`` module (``QUOTE_MINIMAL``) writes for it: ``None``
an empty field, ``float`` its ``repr`` (the shortest text that reads back to the same float),
anything else its ``str``; a field holding ``,``, ``"``, CR or LF is quoted, with ``"`` doubled; a
row whose only field is empty is written ``""``. Two kinds of column get work first:

* boolean columns: ``True``/``False`` become ``true``/``false`` (the JSON spelling);
* string columns, when the formula guard is on: text a spreadsheet would run as a formula gets a
  leading ``'``. Numbers and dates are never touched, so ``-1.5`` stays a number.

The guard is lossless: text that already starts with quotes followed by a trigger character
(``'=x``) gets one more quote, so ``unguard`` (used by imports) can always drop exactly one and
a round trip restores the original text.

How the text is made (the bytes are the ``csv`` module's either way)
    ``csv.writer`` spends most of its time on numbers: ``repr`` of one float, then a copy of it
    character by character, costs 0.6-0.8 µs, and a wide export is mostly floats. So each batch
    is rendered column by column, in C wherever the cells allow it:

    - number columns (integer, float): the cells' exact types are checked (``int``, ``float``,
      ``None``), then ``orjson.dumps`` writes the whole column, or for a run of adjacent number
      columns (``ROW_RUN`` or more, as in wide exports) the run of every row, at once.
      orjson writes a float as the shortest round-trip text, as ``repr`` does (the same digits),
      and differs from ``repr`` only in spelling: ``1e-7`` for ``1e-07`` and ``0.00001`` for
      ``1e-05``; those tokens are respelled. NaN and infinities, which orjson writes as
      ``null``, integers beyond 64 bits and any other type send the column (or run) to the
      ``csv`` module. ``orjson_writes_repr()`` checks at import that the installed orjson writes
      as described; if not, every batch goes through the ``csv`` module;
    - boolean columns of ``bool``/``None`` map to ``true``/``false``/empty;
    - text columns of ``str``/``None`` are joined with NUL and encoded once; a translated copy of
      those bytes tells whether any cell may need the guard (guarded, if so, by one regex
      substitution) or quotes (usually none or a few, found and quoted one by one; when many,
      the ``csv`` module writes the column as one NUL-delimited row, so its quoting is its own).

    A column whose cells are of other types (a ``Decimal`` in a float column, a number in a text
    column), or holding a NUL, is written by ``csv.writer`` itself, row by row, so its text is
    exactly the module's; a batch of rows of other lengths than the columns' goes to it whole.
    The fields are then interleaved with ``,`` and ``\\r\\n`` and joined once. ``render`` is the
    same path for a source that holds its cells by column (the PostgreSQL source's flattened
    documents). Measured (2 cores, busy): 100,000 rows × 55 mixed columns in 1.3-1.8 s instead of
    2.1-3.1 s; 40,000 rows of 2,897 floats (JSONB fields) in 10-13 s instead of 64-108 s.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, islice
from operator import itemgetter
from typing import Any

import orjson

from dataport.columns import Column, Row

# A spreadsheet treats text starting with one of these as a formula (tab and CR can hide one).
GUARD_TRIGGERS = "=+-@\t\r"
_NEEDS_GUARD = re.compile(r"'*[=+\-@\t\r]").match
_IS_GUARDED = re.compile(r"'+[=+\-@\t\r]").match
_ANY_NEEDS_GUARD = re.compile(r"\0'*[=+\-@\t\r]").search


def guard(text: str) -> str:
    """``text`` made safe to open in a spreadsheet: a leading ``'`` if it could run as a formula."""
    return "'" + text if _NEEDS_GUARD(text) else text


def unguard(text: str) -> str:
    """The inverse of ``guard``: drop the one leading ``'`` that ``guard`` added, nothing else."""
    return text[1:] if _IS_GUARDED(text) else text


def guard_column(cells: Sequence[Any]) -> Sequence[Any]:
    """``guard`` over one column of cells; ``None`` passes through."""
    # Most batches have no cell to guard: one regex over the joined column finds that out in C.
    # A NUL inside a cell can only cause a false alarm, which the exact per-cell pass settles.
    try:
        joined = "\0" + "\0".join(filter(None, cells))
    except TypeError:  # not all text: let the per-cell pass sort it out
        joined = "\0="
    if _ANY_NEEDS_GUARD(joined) is None:
        return cells
    return ["'" + v if v.__class__ is str and _NEEDS_GUARD(v) else v for v in cells]


_BOOL_TEXT = {True: "true", False: "false"}


def bool_column(cells: Sequence[Any]) -> list[Any]:
    """``true``/``false`` as JSON spells them; ``None`` passes through."""
    return list(map(_BOOL_TEXT.get, cells, cells))


# A column's cells in, the same column fixed out (guarded, booleans spelled).
ColumnFix = Callable[[Sequence[Any]], Sequence[Any]]


def column_fixes(columns: Sequence[Column], formula_guard: bool) -> list[tuple[int, ColumnFix]]:
    """(index, transform) for the columns whose cells need Python-side work before encoding."""
    fixes: list[tuple[int, ColumnFix]] = []
    for i, column in enumerate(columns):
        if column.type == "boolean":
            fixes.append((i, bool_column))
        elif column.type == "string" and formula_guard:
            fixes.append((i, guard_column))
    return fixes


# --- number text in C ------------------------------------------------------------------------

# A run of this many adjacent number columns or more is written row by row (one orjson call per
# batch for all the rows' runs); shorter ones column by column.
ROW_RUN = 8

_NONE = type(None)
_NUMBER_TYPES = frozenset((int, float, _NONE))
_BOOL_TYPES = frozenset((bool, _NONE))
_OPT = orjson.OPT_PASSTHROUGH_SUBCLASS
_dumps = orjson.dumps
_DIGITS = re.compile(rb"[0-9]*").match
_SHORT_EXPONENT = re.compile(rb"e-(?=[1-9][,\]])").sub  # a literal replacement: no Python call per match


def _number_text(blob: bytes) -> bytes:
    """orjson's text of a list of ints, floats and ``None`` (no NaN or infinity), with every
    number spelled as ``str``/``repr`` spell it and every ``null`` an empty cell."""
    if b"e-" in blob:  # repr writes an exponent with at least two digits: "e-07" where orjson has "e-7"
        blob = _SHORT_EXPONENT(b"e-0", blob)
    at = blob.find(b"0.0000")
    if at >= 0:  # 1e-5 <= |x| < 1e-4: orjson writes it in full, repr with an exponent ("1e-05")
        out: list[bytes] = []
        done = 0
        while at >= 0:
            if blob[at - 1 : at] in b"[,-":  # the number begins there (after its sign)
                digits = _DIGITS(blob, at + 6)
                assert digits is not None  # [0-9]* matches anywhere, if only the empty string
                end = digits.end()
                out += (blob[done:at], repr(float(blob[at:end])).encode())
                done = end
            at = blob.find(b"0.0000", at + 6)
        blob = b"".join([*out, blob[done:]])
    return blob.translate(None, b"nul") if b"n" in blob else blob


def _finite(cells: Iterable[Any]) -> bool:
    """No NaN or infinity among ``cells`` (ints, floats and ``None``)."""
    try:
        return math.isfinite(sum(filter(None, cells)))
    except OverflowError:  # an int beyond float range: orjson refuses it anyway
        return False


# What the caller of CsvWriter.render knows about the cells of a run: nothing; that each is an
# int, a float or None; that, besides, no float is NaN or infinite.
UNKNOWN, NUMBERS, FINITE = 0, 1, 2


def _numbers(values: Sequence[Any], *, rows: bool, known: int = UNKNOWN) -> bytes | None:
    """``values`` (a column, or with ``rows`` a list of each row's run of cells) as number text;
    ``None`` if a cell is not a plain int, float or ``None`` that orjson writes the way the csv
    module would."""
    if known < NUMBERS and not set(map(type, chain.from_iterable(values) if rows else values)) <= _NUMBER_TYPES:
        return None
    try:
        blob = _dumps(values, option=_OPT)
    except TypeError:  # an int beyond 64 bits
        return None
    if known < FINITE and b"n" in blob and not _finite(chain.from_iterable(values) if rows else values):
        return None  # orjson writes NaN and infinities as null, like None
    return _number_text(blob)


def orjson_writes_repr() -> bool:
    """Whether the installed orjson writes numbers the way ``_number_text`` expects: checked on
    values around every place where orjson's spelling and ``repr``'s part ways."""
    values: list[Any] = [
        0.0,
        -0.0,
        1.0,
        -1.5,
        0.1,
        1 / 3,
        2.5e-8,
        123456789.125,
        5e-324,
        1.7976931348623157e308,
        2.0**53,
        9999999999999998.0,
        1e15,
        1e16,
        1e22,
        1e100,
        1e-4,
        1e-5,
        1e-7,
        1e-10,
        0,
        -7,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        None,
    ]
    for e in range(-30, 30):
        for m in (1.0, 1.5, 9.999999999999998, 4.35):
            x = m * 10.0**e
            values += [x, -x, math.nextafter(x, 0.0), math.nextafter(x, math.inf)]
    try:
        text = _numbers(values, rows=False)
    except Exception:  # pragma: no cover - a broken orjson
        return False
    return text == ("[" + ",".join("" if v is None else repr(v) for v in values) + "]").encode()


FAST = orjson_writes_repr()


# --- text columns ----------------------------------------------------------------------------

# What makes the csv module quote a field (QUOTE_MINIMAL, this dialect), marked as ","; a cell that
# may need the guard (it begins with a trigger or a quote), marked by "=" after its separator.
_SPECIAL = re.compile(b'[,"\r\n]')
_SPECIAL_MARK = bytes.maketrans(b'"\r\n', b",,,")
_GUARD_FIRST = b"'" + GUARD_TRIGGERS.encode()
_GUARD_MARK = bytes.maketrans(_GUARD_FIRST, b"=" * len(_GUARD_FIRST))
_GUARD_ALL = re.compile(rb"\0(?='*[=+\-@\t\r])").sub  # a literal replacement: no Python call per cell


def _texts(
    cells: Sequence[Any], formula_guard: bool, quote_column: Callable[[Sequence[Any]], str]
) -> list[bytes] | None:
    """A column of ``str``/``None`` as CSV fields in UTF-8 (guarded, quoted, ``None`` empty);
    ``None`` if some cell is of another type or holds a NUL."""
    if len(cells) >= _FEW_VALUES_FROM:
        # A column of a few values (a site, a lab, a status), perhaps one that the csv module has
        # to quote: each value written once, then looked up (2.6 ms a page of 10,000 cells against
        # 0.3 ms, for six sites of which two need quotes).
        try:
            few = len(set(islice(cells, _FEW_VALUES_SAMPLE))) <= _FEW_VALUES
            values = list(set(cells)) if few else []
        except TypeError:  # an unhashable cell: not text either
            return None
        if few and len(values) <= _FEW_VALUES:
            fields = _texts(values, formula_guard, quote_column)
            if fields is None:
                return None
            return list(map(dict(zip(values, fields, strict=True)).__getitem__, cells))
    if None in cells:
        cells = ["" if v is None else v for v in cells]
    try:
        data = "\0".join(cells).encode("utf-8")  # also the type check: only text joins
    except TypeError:
        return None
    count = len(cells)
    if data.count(b"\0") != count - 1:  # a NUL inside a cell: it would split wrongly
        return None
    texts: Sequence[Any] | None = cells  # None once the guarded cells are in ``data`` only
    if formula_guard and b"\0=" in b"\0" + data.translate(_GUARD_MARK):
        # Some cell begins with a trigger or a quote: it may need the guard.
        if set(map(type, cells)) == {str}:  # guard_column guards exact str cells only
            data = _GUARD_ALL(b"\0'", b"\0" + data)[1:]
            texts = None
        else:
            texts = ["'" + v if v.__class__ is str and _NEEDS_GUARD(v) else v for v in cells]
            data = "\0".join(texts).encode("utf-8")
    specials = data.translate(_SPECIAL_MARK).count(b",")
    if specials * 8 > count:  # many cells to quote: the csv module quotes the whole column
        text = quote_column(data.decode("utf-8").split("\0") if texts is None else texts)
        return text.encode("utf-8").split(b"\0")
    fields = data.split(b"\0")
    if specials:  # a few: find them, counting the separators in front of each special character
        at = last = 0
        quoted = -1
        for match in _SPECIAL.finditer(data):
            at += data.count(b"\0", last, match.start())
            last = match.start()
            if at != quoted:
                quoted = at
                fields[at] = b'"' + fields[at].replace(b'"', b'""') + b'"'
    return fields


# A text column with at most _FEW_VALUES distinct cells among its first _FEW_VALUES_SAMPLE, and in
# all (a column of at least _FEW_VALUES_FROM cells), writes each value once.
_FEW_VALUES, _FEW_VALUES_SAMPLE, _FEW_VALUES_FROM = 32, 256, 512

_BOOL_FIELD = {True: b"true", False: b"false", None: b""}
_JOIN = 4096


def _bools(cells: Sequence[Any]) -> list[bytes] | None:
    if not set(map(type, cells)) <= _BOOL_TYPES:
        return None
    return list(map(_BOOL_FIELD.__getitem__, cells))


def segments(columns: Sequence[Column], formula_guard: bool) -> list[tuple[str, int, int]]:
    """The fast path's pieces, for CSV and XLSX alike: ("run", start, stop) for ``ROW_RUN`` or more
    adjacent number columns, else (kind, index, index + 1) with kind "number", "boolean", "guarded"
    (text under the formula guard) or "text"."""
    kinds = [_kind(c, formula_guard) for c in columns]
    pieces: list[tuple[str, int, int]] = []
    i = 0
    while i < len(kinds):
        j = i + 1
        while kinds[i] == "number" and j < len(kinds) and kinds[j] == "number":
            j += 1
        if kinds[i] == "number" and j - i >= ROW_RUN:
            pieces.append(("run", i, j))
            i = j
            continue
        pieces.append((kinds[i], i, i + 1))
        i += 1
    return pieces


def _kind(column: Column, formula_guard: bool) -> str:
    if column.type in ("integer", "float"):
        return "number"
    if column.type == "boolean":
        return "boolean"
    return "guarded" if column.type == "string" and formula_guard else "text"


class CsvWriter:
    extension = "csv"
    content_type = "text/csv; charset=utf-8"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.columns = tuple(columns)
        self.formula_guard = formula_guard
        self._fixes = column_fixes(self.columns, formula_guard)
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
        # One column written as one row: fields apart by NUL (no cell holds one) and the line
        # terminator made of the dialect's other special characters, so that the same cells are
        # quoted in the same way as in the file.
        self._column_buffer = io.StringIO()
        self._column_csv = csv.writer(
            self._column_buffer, delimiter="\0", lineterminator="\r\n,", quoting=csv.QUOTE_MINIMAL
        )
        self._segments = segments(self.columns, formula_guard)
        self._runs = any(kind == "run" for kind, _, _ in self._segments)

    def begin(self) -> bytes:
        names = [c.name for c in self.columns]
        self._csv.writerow(guard_column(names) if self.formula_guard else names)
        return self._drain()

    def write(self, rows: Sequence[Row]) -> bytes:
        if not rows:
            return b""
        n = len(self.columns)
        if not FAST or n == 0 or set(map(len, rows)) != {n}:
            return self._write_csv(rows)
        columns = None if self._runs else list(zip(*rows, strict=True))
        return self.render(
            len(rows),
            lambda i: columns[i] if columns is not None else list(map(itemgetter(i), rows)),
            lambda start, stop: ([row[start:stop] for row in rows], UNKNOWN),
        )

    def render(
        self,
        count: int,
        column: Callable[[int], Sequence[Any]],
        run: Callable[[int, int], tuple[Sequence[Sequence[Any]], int]],
        known: int = UNKNOWN,
    ) -> bytes:
        """``count`` rows given column-wise, as ``write`` writes them (only while ``FAST``).

        ``column(i)`` is column ``i``'s cells; ``run(start, stop)`` each row's cells of columns
        ``start`` to ``stop`` (a run of number columns), with what is known about them
        (``UNKNOWN``, ``NUMBERS`` or ``FINITE``: that much is not checked again); ``known`` is
        the same for the cells of the number columns that ``column`` gives. For sources that
        hold their cells by column rather than as row tuples."""
        pieces: list[list[bytes]] = []  # per segment, each row's fields of it (without the ",")
        for kind, start, stop in self._segments:
            if kind == "run":
                runs, known = run(start, stop)
                blob = _numbers(runs, rows=True, known=known)
                if blob is None:
                    pieces.append(self._exact(runs, start))
                    continue
                fields = blob.split(b"],[")
                fields[0] = fields[0][2:]  # without "[[" and "]]"
                fields[-1] = fields[-1][:-2]
                pieces.append(fields)
                continue
            cells = column(start)
            if kind == "number":
                blob = _numbers(cells, rows=False, known=known)
                done = None if blob is None else blob[1:-1].split(b",")
            elif kind == "boolean":
                done = _bools(cells)
            else:
                done = _texts(cells, kind == "guarded", self._quote_column)
            pieces.append(done if done is not None else self._exact([(c,) for c in cells], start))
        if len(self.columns) == 1:  # the csv module writes a row of one empty field as "" (else a blank line)
            pieces[0] = [b'""' if field == b"" else field for field in pieces[0]]
        # Interleave: field, ",", field, ..., field, "\r\n", then one join.
        width = 2 * len(pieces)
        out = [b","] * (width * count)
        for k, fields in enumerate(pieces):
            out[2 * k :: width] = fields
        out[width - 1 :: width] = [b"\r\n"] * count
        if len(out) <= _JOIN:
            return b"".join(out)
        # bytes.join sets up 80 bytes per item first: in slices it stays in the cache.
        return b"".join([b"".join(out[i : i + _JOIN]) for i in range(0, len(out), _JOIN)])

    def _quote_column(self, cells: Sequence[str]) -> str:
        """``cells`` as the csv module writes them, apart by NUL."""
        self._column_csv.writerow((*cells, None))  # one more field: a lone empty one is not quoted
        text = self._column_buffer.getvalue()[:-4]  # without it and the line terminator
        self._column_buffer.seek(0)
        self._column_buffer.truncate()
        return text

    def _exact(self, parts: Sequence[Sequence[Any]], start: int) -> list[bytes]:
        """Each row's cells ``parts`` (the columns from ``start`` on) as the csv module writes them
        within a row: fixed first, then written with one more empty field so that a lone empty
        field is not quoted, which is taken off again."""
        fixes = [(i - start, fix) for i, fix in self._fixes if start <= i < start + len(parts[0])]
        if fixes:
            columns: list[Sequence[Any]] = list(zip(*parts, strict=True))
            for i, fix in fixes:
                columns[i] = fix(columns[i])
            parts = list(zip(*columns, strict=True))
        out: list[bytes] = []
        writerow, buffer = self._csv.writerow, self._buffer
        for cells in parts:
            writerow((*cells, None))
            out.append(buffer.getvalue()[:-3].encode("utf-8"))  # without the extra "," and "\r\n"
            buffer.seek(0)
            buffer.truncate()
        return out

    def _write_csv(self, rows: Sequence[Row]) -> bytes:
        """The whole batch through the csv module (and the column fixes)."""
        table: Iterable[Sequence[Any]] = rows
        if self._fixes:
            # Transpose, fix the few columns that need it, transpose back: cheaper than
            # looking at every cell of every row.
            cells: list[Sequence[Any]] = list(zip(*rows, strict=True))
            for i, fix in self._fixes:
                cells[i] = fix(cells[i])
            table = zip(*cells, strict=True)
        self._csv.writerows(table)
        return self._drain()

    def finish(self) -> Iterator[bytes]:
        return iter(())

    def _drain(self) -> bytes:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text.encode("utf-8")
