"""JSON (one array of objects) and NDJSON (one object a line) readers, bounded whatever the file holds.

Both read through ``Utf8Chunks``: UTF-8 is checked, a BOM dropped and bytes counted before a
parser sees them, so a bad byte is reported the same way as in CSV, with its line.

JSON
    The array is cut into elements here, and each element is parsed whole by ``orjson`` (C, and
    bounded: it refuses nesting past 1,024 levels and never builds a number it cannot hold). Most
    rows are objects of scalars: one regex (``_RUN``, in C) takes a run of such elements from the
    64 KiB read, and one ``orjson.loads`` parses the run as a list. An element the regex does not
    take (a nested value, a long run of digits, an element cut off by the end of a read) is
    followed byte by byte for its end (``_Scan``: brackets and quotes only, resumable across
    reads). While following it, nesting deeper than ``max_nesting`` levels (the row's object is
    level 1) or an element longer than ``MAX_ROW_CELLS`` × ``max_cell_bytes`` is a
    ``FileLimitError``: the element's end cannot be found without following it, and no row is
    that deep or large. Memory is one element plus one read, whatever the file.

    The library this replaces (ijson's yajl2_c backend) crashed the process on an integer of more
    than 4,300 digits, and built nesting bombs in memory quadratic in their depth.

    The first byte that is not white space must be ``[``; any other top level is a ``FileError``
    that names what the file holds instead (an object: perhaps it is NDJSON). An element that is
    not an object is a row problem. Syntax errors and a file that ends early are ``FileError``s,
    raised after every element before them has been yielded.

NDJSON
    Lines are cut from the chunks and parsed one by one with ``orjson``; blank lines are skipped
    (and counted: a record's number is its line). A line that is not JSON, or not an object, is a
    row problem, as is a line nested deeper than ``max_nesting``. A line longer than
    ``MAX_ROW_CELLS`` × ``max_cell_bytes`` is a row problem read no further: its bytes are dropped
    as they arrive, up to the next line break, so memory stays bounded.

Numbers (both): orjson reads integers beyond 64 bits as floats and refuses 1e400 outright, so an
element or line holding a run of 19 digits or more, or one orjson refuses, is read again by
``careful_loads``: a small tokenizer (``_TOKEN``) that decodes each string with orjson and each
number with ``number_or_long``: exact ``int``s, ``float``s as ``float()`` reads them (1e400 is
inf, which a float column refuses), and a number longer than ``MAX_NUMBER_CHARS`` as a
``LongNumber``, which fails its cell naming the column, never reaching ``int()``.

Text: a lone surrogate escape (``"\\ud800"``, half of a UTF-16 pair) is not a character; it fails
its row with the same reason in both formats (it was stored as ``?`` before).

Cell size: a string value longer than ``max_cell_bytes`` in UTF-8 (or a nested value whose JSON
is) fails its row. Only records that may be that large are looked at: the NDJSON line or the
bytes of the element (or of the run it came in) must exceed the limit first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from formats.limits import number_or_long
from formats.records import FileError, FileLimitError, Record, as_text, json_text, text_over
from formats.utf8 import ByteStream, Utf8Chunks

# A row may take at most this many cells' worth of bytes (a JSON element, an NDJSON line).
MAX_ROW_CELLS = 16
MAX_LINE_CELLS = MAX_ROW_CELLS  # the old name

_STARTS = {
    b"{": "an object",
    b'"': "a string",
    b"t": "true",
    b"f": "false",
    b"n": "null",
}

_WS = rb"[ \t\r\n]*+"
_STRING = rb'"(?:[^"\\\x00-\x1f]++|\\.)*+"'
# An object of scalars with no run of more than 18 digits outside its strings: what orjson reads
# exactly as ijson did (a longer integer may be beyond 64 bits, which orjson makes a float).
_FLAT = rb"\{(?:[^\"{}\[\]0-9]++|[0-9]{1,18}+(?![0-9])|" + _STRING + rb")*+\}"
_RUN = re.compile(_FLAT + rb"(?:" + _WS + rb"," + _WS + _FLAT + rb")*+")
_FLAT_ONE = re.compile(_FLAT)
_SEP = re.compile(_WS + rb"," + _WS)
_SKIP_WS = re.compile(_WS)
# Digits as "0", the rest as " ": a run of 19 digits is then found by bytes.find, 10x quicker
# than a regex.
_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_NINETEEN = b"0" * 19


def long_digits(data: bytes) -> bool:
    """Whether ``data`` holds a run of 19 digits or more (a number orjson may not read exactly)."""
    return data.translate(_DIGITS).find(_NINETEEN) >= 0


# Scanning an element: structure outside strings, the end (or an escape) inside one, and the end
# of a top-level scalar.
_STRUCTURE = re.compile(rb'[\[\]{}"]')
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,\] \t\r\n]")
_OPEN, _CLOSE, _QUOTE = frozenset(b"[{"), frozenset(b"]}"), ord('"')
# A UTF-16 surrogate escape without its other half.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    return "a number"


def oversized(obj: dict[str, Any], limit: int) -> str | None:
    """The first key whose value is larger than ``limit`` bytes, if any."""
    for key, value in obj.items():
        if isinstance(value, str):
            if text_over(value, limit):
                return key
        elif isinstance(value, dict | list) and len(json_text(value).encode()) > limit:
            return key
    return None


# --- the careful parser -------------------------------------------------------------------------


class JsonSyntax(ValueError):
    """Not JSON; ``at`` is the byte offset in the text parsed."""

    def __init__(self, reason: str, at: int) -> None:
        super().__init__(reason)
        self.at = at


class RowRefused(ValueError):
    """JSON, but not a row: a lone surrogate, or nesting past the limit. The message finishes the
    sentence "element 3 …" / "line 3 …"."""


_TOKEN = re.compile(
    rb"[ \t\r\n]*+(?:"
    rb'("(?:[^"\\]++|\\.)*+")'  # 1: a string (orjson checks its escapes and control characters)
    rb"|(-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?)(?![0-9A-Za-z.+-])"  # 2: a number
    rb"|(true|false|null)(?![0-9A-Za-z])"  # 3
    rb"|([\[\]{},:])"  # 4
    rb")"
)
_LITERALS: dict[bytes, Any] = {b"true": True, b"false": False, b"null": None}


def surrogate_reason(text: bytes) -> str | None:
    lone = _LONE_SURROGATE.search(text)
    if lone is None:
        return None
    return (
        f"holds the escape {lone.group().decode()}, half of a UTF-16 pair (a lone surrogate), which is not a character"
    )


def nesting_reason(limit: int) -> str:
    return f"is nested deeper than {limit} levels (a row is an object of values)"


class _Careful:
    """One JSON value of ``data``, parsed token by token (``careful_loads``)."""

    def __init__(self, data: bytes, max_nesting: int) -> None:
        self.data, self.max_nesting, self.at = data, max_nesting, 0

    def token(self) -> re.Match[bytes]:
        found = _TOKEN.match(self.data, self.at)
        if found is None:
            rest = self.data[self.at :].lstrip()
            raise JsonSyntax("premature end" if not rest else "invalid token", len(self.data) - len(rest))
        self.at = found.end()
        return found

    def value(self, depth: int) -> Any:
        token = self.token()
        text, number, literal, mark = token.groups()
        if text is not None:
            return self.string(text, token.start(1))
        if number is not None:
            return number_or_long(number.decode())
        if literal is not None:
            return _LITERALS[literal]
        if mark not in (b"{", b"["):
            raise JsonSyntax(f"unexpected {mark.decode()!r}", token.start(4))
        if depth >= self.max_nesting:
            raise RowRefused(nesting_reason(self.max_nesting))
        return self.object(depth + 1) if mark == b"{" else self.array(depth + 1)

    def string(self, text: bytes, at: int) -> str:
        try:
            string: str = orjson.loads(text)  # the token is a JSON string
            return string
        except orjson.JSONDecodeError as error:
            reason = surrogate_reason(text)
            if reason is not None:
                raise RowRefused(reason) from None
            raise JsonSyntax(f"invalid string ({error.msg})", at) from None

    def array(self, depth: int) -> list[Any]:
        out: list[Any] = []
        after = self.at
        if self.token().group(4) == b"]":
            return out
        self.at = after
        while True:
            out.append(self.value(depth))
            mark = self.token()
            if mark.group(4) == b"]":
                return out
            if mark.group(4) != b",":
                raise JsonSyntax("expect ',' or ']'", mark.start())

    def object(self, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        token = self.token()
        if token.group(4) == b"}":
            return out
        while True:
            if token.group(1) is None:
                raise JsonSyntax("expect a string as the key", token.start())
            key = self.string(token.group(1), token.start(1))
            if self.token().group(4) != b":":
                raise JsonSyntax("expect ':' after a key", self.at)
            out[key] = self.value(depth)
            mark = self.token()
            if mark.group(4) == b"}":
                return out
            if mark.group(4) != b",":
                raise JsonSyntax("expect ',' or '}'", mark.start())
            token = self.token()


def careful_loads(data: bytes, max_nesting: int) -> Any:
    """``data`` (one JSON value) parsed safely: see the module docstring. Raises ``JsonSyntax`` or
    ``RowRefused``. Nesting is checked here, so recursion stays within ``max_nesting``."""
    parser = _Careful(data, max_nesting)
    value = parser.value(0)
    if data[parser.at :].strip():
        raise JsonSyntax("trailing garbage", parser.at)
    return value


def nesting(value: Any) -> int:
    """The depth of a parsed value: a scalar is 0, an object of scalars 1."""
    if value.__class__ is dict:
        return 1 + max(map(nesting, value.values()), default=0)
    if value.__class__ is list:
        return 1 + max(map(nesting, value), default=0)
    return 0


# --- JSON ------------------------------------------------------------------------------------------

_UNREAD = object()

# Where the reader is in the file.
_START, _FIRST, _VALUE, _SEPARATOR, _AFTER = range(5)


class _Scan:
    """Following one element that ``_RUN`` did not take, across reads: how far (from the element's
    start), how deep, inside a string or not, or a scalar (a number or literal) or not."""

    __slots__ = ("done", "depth", "in_string", "scalar")

    def __init__(self) -> None:
        self.done, self.depth, self.in_string, self.scalar = 0, 0, False, False


class JsonReader:
    fields = None
    # Where records() is: set when it starts.
    _pos: int
    _state: int
    _scan: _Scan | None

    def __init__(self, stream: ByteStream, *, max_cell_bytes: int, max_nesting: int = 8) -> None:
        self.max_cell_bytes = max_cell_bytes
        self.max_nesting = max_nesting
        self.max_row_bytes = MAX_ROW_CELLS * max_cell_bytes
        self._source = Utf8Chunks(stream, format="JSON")
        self._count = 0  # elements yielded
        self._dropped = 0  # bytes consumed and dropped from the buffer: offsets in the file

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read

    def records(self) -> Iterator[Record]:
        buf = bytearray()
        self._pos, self._state, self._scan = 0, _START, None
        for data in self._source.chunks():
            if self._pos:
                del buf[: self._pos]
                self._dropped += self._pos
                self._pos = 0
            buf += data
            yield from self._advance(buf, final=False)
        yield from self._advance(buf, final=True)
        if self._state == _START:
            raise FileError('the file is empty: a JSON import needs one array of objects, like [{"a": 1}]')
        if self._state != _AFTER:
            where = f"after element {self._count:,}" if self._count else "before the first element"
            raise FileError(
                f"the JSON ends early, {where}: the file seems cut off (the array is not closed); upload it again"
            )

    def _advance(self, buf: bytearray, final: bool) -> Iterator[Record]:
        """Everything ``buf`` holds from ``self._pos`` that can be read yet."""
        size = len(buf)
        while True:
            p = _SKIP_WS.match(buf, self._pos).end() if self._scan is None else self._pos  # type: ignore[union-attr]  # whitespace* matches anywhere
            state = self._state
            if p == size:
                self._pos = p
                return
            if state == _START:
                if buf[p] != ord("["):
                    raise self._not_an_array(bytes(buf[p : p + 4]))
                self._pos, self._state = p + 1, _FIRST
                continue
            if state == _AFTER:
                raise self._invalid(p, "the JSON array is followed by more text", trailing=True)
            if state == _SEPARATOR:
                c = buf[p]
                if c == ord(","):
                    self._pos, self._state = p + 1, _VALUE
                elif c == ord("]"):
                    self._pos, self._state = p + 1, _AFTER
                else:
                    raise self._invalid(p, "expect ',' or ']'")
                continue
            if state == _FIRST and buf[p] == ord("]"):
                self._pos, self._state = p + 1, _AFTER
                continue
            # An element starts at p.
            if self._scan is None:
                run = _RUN.match(buf, p)
                if run is not None:
                    yield from self._run(buf, p, run.end())
                    self._pos, self._state = run.end(), _SEPARATOR
                    continue
                self._scan = _Scan()
            end = self._follow(buf, p, final)
            if end is None:
                self._pos = p
                return
            self._scan = None
            self._count += 1
            yield self._element(self._count, bytes(buf[p:end]), p)
            self._pos, self._state = end, _SEPARATOR

    def _run(self, buf: bytearray, start: int, end: int) -> Iterator[Record]:
        """The flat elements ``buf[start:end]``, parsed as one list."""
        try:
            values = orjson.loads(b"[" + buf[start:end] + b"]")
        except orjson.JSONDecodeError:
            # One of them is not valid (or holds what orjson refuses): one by one, to say which.
            p = start
            while True:
                one = _FLAT_ONE.match(buf, p)
                assert one is not None
                self._count += 1
                yield self._element(self._count, bytes(buf[p : one.end()]), p)
                if one.end() >= end:
                    return
                p = _SEP.match(buf, one.end()).end()  # type: ignore[union-attr]  # a run has "," between elements
        check = end - start > self.max_cell_bytes  # else no cell of the run can be over the limit
        for value in values:
            self._count += 1
            yield self._record(self._count, value, check)

    def _follow(self, buf: bytearray, start: int, final: bool) -> int | None:
        """Where the element starting at ``start`` ends, or None until more is read."""
        scan = self._scan
        assert scan is not None
        size = len(buf)
        at = start + scan.done
        if scan.done == 0:
            first = buf[start]
            if first == _QUOTE:
                scan.in_string, at = True, start + 1
            elif first not in _OPEN:  # a number or a literal: up to a separator
                scan.scalar = True
        if scan.scalar:
            found = _SCALAR_END.search(buf, at)
            if found is not None:
                return found.start()
            if final:
                return size
            self._wait(scan, start, size)
            return None
        depth, in_string = scan.depth, scan.in_string
        while True:
            if in_string:
                found = _IN_STRING.search(buf, at)
                if found is None:
                    at = size
                    break
                if buf[found.start()] == _QUOTE:
                    in_string, at = False, found.end()
                    if depth == 0:
                        return at
                elif found.end() < size:
                    at = found.end() + 1  # the escaped character
                else:
                    at = found.start()  # the escape is cut off: look again once more is read
                    break
                continue
            found = _STRUCTURE.search(buf, at)
            if found is None:
                at = size
                break
            at = found.end()
            c = buf[found.start()]
            if c == _QUOTE:
                in_string = True
            elif c in _OPEN:
                depth += 1
                if depth > self.max_nesting:
                    raise FileLimitError(
                        f"element {self._count + 1:,} {nesting_reason(self.max_nesting)} (at byte "
                        f"{self._dropped + found.start():,}); its end cannot be found without following it"
                    )
            else:
                depth -= 1
                if depth == 0:
                    return at
        scan.depth, scan.in_string = depth, in_string
        if final:
            return None  # the file ends inside the element: the caller says so
        self._wait(scan, start, at)
        return None

    def _wait(self, scan: _Scan, start: int, at: int) -> None:
        scan.done = at - start
        if scan.done > self.max_row_bytes:
            raise FileLimitError(
                f"element {self._count + 1:,} is larger than {self.max_row_bytes:,} bytes (at byte "
                f"{self._dropped + start:,}): no row can be that large (each value may hold at most "
                f"{self.max_cell_bytes:,})"
            )
        return None

    def _element(self, number: int, data: bytes, at: int) -> Record:
        """One element's bytes as a record; a syntax error is a ``FileError``."""
        value: Any = _UNREAD
        if not long_digits(data):
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        if value is _UNREAD:
            try:
                value = careful_loads(data, self.max_nesting)
            except RowRefused as refused:
                return Record(number, {}, f"element {number} {refused}", data, as_text)
            except JsonSyntax as error:
                self._count = number - 1
                raise self._invalid(at + error.at, str(error)) from None
        return self._record(number, value, len(data) > self.max_cell_bytes)

    def _record(self, number: int, value: Any, check: bool) -> Record:
        if value.__class__ is not dict:
            return Record(number, {}, f"element {number} is {kind_of(value)}, not an object", value, json_text)
        if check:
            key = oversized(value, self.max_cell_bytes)
            if key is not None:
                problem = (
                    f"element {number}: the value of {key!r} is larger than {self.max_cell_bytes:,} bytes "
                    "(the limit per cell)"
                )
                return Record(number, value, problem, value, json_text)
        return Record(number, value, None, value, json_text)

    def _not_an_array(self, head: bytes) -> FileError:
        first = head[:1]
        if first in _STARTS:
            what = _STARTS[first]
        elif first in b"-0123456789":
            what = "a number"
        else:  # (a character may be cut off at the end of ``head``)
            what = f"the character {head.decode('utf-8', 'ignore')[:1]!r}"
        hint = " (one object a line is NDJSON: choose that format)" if first == b"{" else ""
        return FileError(
            f'a JSON import must be one array of objects, like [{{"a": 1}}, {{"a": 2}}]; '
            f"the file starts with {what}{hint}"
        )

    def _invalid(self, at: int, reason: str, trailing: bool = False) -> FileError:
        count = self._count
        where = f"after element {count:,}" if count else "before the first element"
        if trailing:
            return FileError(f"{reason} ({where}, at byte {self._dropped + at:,}); remove it")
        return FileError(f"the JSON is not valid {where} (around byte {self._dropped + at:,}): {reason}")


# --- NDJSON ------------------------------------------------------------------------------------------


class NdjsonReader:
    fields = None

    def __init__(self, stream: ByteStream, *, max_cell_bytes: int, max_nesting: int = 8) -> None:
        self.max_cell_bytes = max_cell_bytes
        self.max_nesting = max_nesting
        self.max_line_bytes = MAX_ROW_CELLS * max_cell_bytes
        self._source = Utf8Chunks(stream, format="NDJSON")

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read

    def records(self) -> Iterator[Record]:
        number = 0
        pending = b""  # a line not finished by the last read
        skipped = None  # the start of a line too long to keep, while its rest is dropped
        for data in self._source.chunks():
            if skipped is not None:
                end = data.find(b"\n")
                if end < 0:
                    continue
                number += 1
                yield self._too_long(number, skipped)
                skipped, data = None, data[end + 1 :]
            lines = data.split(b"\n")
            if pending:
                lines[0] = pending + lines[0]
            pending = lines.pop()
            suspect = long_digits(data)  # one look per read, not per line
            for i, line in enumerate(lines):
                number += 1
                record = self._record(number, line, suspect or (i == 0 and long_digits(line)))
                if record is not None:
                    yield record
            if len(pending) > self.max_line_bytes:
                skipped, pending = pending[:1000], b""
        if skipped is not None:
            number += 1
            yield self._too_long(number, skipped)
        elif pending:
            record = self._record(number + 1, pending, long_digits(pending))
            if record is not None:
                yield record

    def _record(self, number: int, line: bytes, suspect: bool) -> Record | None:
        """``suspect``: the line may hold a run of 19 digits (it is looked at again here)."""
        value: Any = _UNREAD
        if not (suspect and long_digits(line)):  # else exact integers: the careful way
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                pass
        if value is _UNREAD:
            if not line.strip():
                return None  # a blank line
            try:
                value = careful_loads(line, self.max_nesting)
            except RowRefused as refused:
                return Record(number, {}, f"line {number} {refused}", line, as_text)
            except JsonSyntax as syntax:
                try:  # orjson says it better (and as before)
                    orjson.loads(line)
                    reason = f"{syntax} (at byte {syntax.at + 1})"
                except orjson.JSONDecodeError as error:
                    reason = f"{error.msg} (at character {error.pos + 1})"
                return Record(number, {}, f"line {number} is not valid JSON: {reason}", line, as_text)
        if value.__class__ is not dict:
            return Record(number, {}, f"line {number} holds {kind_of(value)}, not an object", value, json_text)
        if line.count(b"{") + line.count(b"[") > self.max_nesting and nesting(value) > self.max_nesting:
            return Record(number, {}, f"line {number} {nesting_reason(self.max_nesting)}", line, as_text)
        if len(line) > self.max_cell_bytes:
            key = oversized(value, self.max_cell_bytes)
            if key is not None:
                problem = (
                    f"line {number}: the value of {key!r} is larger than {self.max_cell_bytes:,} bytes "
                    "(the limit per cell)"
                )
                return Record(number, value, problem, value, json_text)
        return Record(number, value, None, value, json_text)

    def _too_long(self, number: int, head: bytes) -> Record:
        problem = (
            f"line {number} is longer than {self.max_line_bytes:,} bytes (each value may hold at most "
            f"{self.max_cell_bytes:,}); it was not read"
        )
        return Record(number, {}, problem, head + b"...", as_text)
