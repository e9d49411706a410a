"""JSON (one array of objects) and NDJSON (one object a line) readers.

Both read through ``Utf8Chunks``: UTF-8 is checked, a BOM dropped and bytes counted before a
parser sees them, so a bad byte is reported the same way as in CSV, with its line.

JSON
    ``ijson``'s push interface (``items_coro``, yajl2_c backend) parses the array element by
    element as 64 KiB chunks arrive; an element is built whole (that is ijson's unit), nothing
    more. The first byte that is not white space must be ``[``; any other top level is a
    ``FileError`` that names what the file holds instead (an object: perhaps it is NDJSON).
    An element that is not an object is a row problem. Syntax errors and a file that ends early
    are ``FileError``s, raised after every element before them has been yielded.
    Numbers: ijson's ``use_float`` would be quicker, but then yajl parses integers itself and
    calls -2**63 (which exports write) and anything beyond 64 bits an overflow that stops the
    whole file (ICRAR/ijson#153, lloyd/yajl#130). Without it, integers come as exact ``int`` and
    other numbers as ``Decimal``, which ``plain_numbers`` turns into the nearest ``float`` (what
    ``float()`` of the same text gives; 1e400 becomes inf, which the float column then refuses).

NDJSON
    Lines are cut from the chunks and parsed one by one with ``orjson``; blank lines are skipped
    (and counted: a record's number is its line). A line that is not JSON, or not an object, is
    a row problem. A line longer than ``MAX_LINE_CELLS`` × ``max_cell_bytes`` is a row problem
    read no further: its bytes are dropped as they arrive, up to the next line break, so memory
    stays bounded. Note that orjson reads an integer beyond 64 bits as a float.

Cell size: a string value longer than ``max_cell_bytes`` in UTF-8 (or a nested value whose JSON
is) fails its row. Only records that may be that large are looked at: the NDJSON line or the
bytes parsed since the last element must exceed the limit first.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any, BinaryIO

import ijson
import orjson

from formats.readers import FileError, Record, Utf8Chunks, as_text, json_text, text_over

MAX_LINE_CELLS = 16

_WHITESPACE = b" \t\r\n"
_STARTS = {
    b"{": "an object",
    b'"': "a string",
    b"t": "true",
    b"f": "false",
    b"n": "null",
}


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


def plain_numbers(value: Any) -> Any:
    """``value`` with every ``Decimal`` in it made a ``float``, in place where it can be."""
    cls = value.__class__
    if cls is dict:
        for key, item in value.items():
            if item.__class__ in _CONTAINERS:
                value[key] = plain_numbers(item)
        return value
    if cls is list:
        for i, item in enumerate(value):
            if item.__class__ in _CONTAINERS:
                value[i] = plain_numbers(item)
        return value
    if cls is Decimal:
        return float(value)
    return value


_CONTAINERS = frozenset((dict, list, Decimal))


def oversized(obj: dict, limit: int) -> str | None:
    """The first key whose value is larger than ``limit`` bytes, if any."""
    for key, value in obj.items():
        if isinstance(value, str):
            if text_over(value, limit):
                return key
        elif isinstance(value, dict | list) and len(json_text(value).encode()) > limit:
            return key
    return None


class JsonReader:
    fields = None

    def __init__(self, stream: BinaryIO, *, max_cell_bytes: int) -> None:
        self.max_cell_bytes = max_cell_bytes
        self._source = Utf8Chunks(stream, format="JSON")

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read

    def records(self) -> Iterator[Record]:
        limit = self.max_cell_bytes
        found = ijson.sendable_list()
        parser = ijson.items_coro(found, "item")  # not use_float: see the module docstring
        count = 0  # elements yielded
        sent = 0  # bytes given to the parser
        mark = 0  # bytes given before the chunk that completed the last element
        started = False
        try:
            for data in self._source.chunks():
                if not started:
                    head = data.lstrip(_WHITESPACE)[:4]
                    if not head:
                        continue  # white space so far
                    if head[:1] != b"[":
                        raise self._not_an_array(head)
                    started = True
                before, sent = sent, sent + len(data)
                parser.send(data)
                if found:
                    # An element ends within this chunk, so it began after ``mark``.
                    check = sent - mark > limit
                    mark = before
                    for value in found:
                        count += 1
                        yield self._record(count, value, check)
                    del found[:]
            if not started:
                raise FileError('the file is empty: a JSON import needs one array of objects, like [{"a": 1}]')
            parser.close()
        except ijson.JSONError as error:
            for value in found:  # what the parser finished before the error
                count += 1
                yield self._record(count, value, True)
            raise self._invalid(error, count) from None
        for value in found:
            count += 1
            yield self._record(count, value, True)

    def _record(self, number: int, value: Any, check: bool) -> Record:
        value = plain_numbers(value)
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

    def _invalid(self, error: Exception, count: int) -> FileError:
        lines = str(error).strip().splitlines() or ["invalid JSON"]
        reason = lines[0].removeprefix("parse error: ").removeprefix("lexical error: ").rstrip(".")
        where = f"after element {count:,}" if count else "before the first element"
        if "premature EOF" in reason:
            return FileError(
                f"the JSON ends early, {where}: the file seems cut off (the array is not closed); upload it again"
            )
        context = f" near: {lines[1].strip()}" if len(lines) > 1 and lines[1].strip() else ""
        if "trailing garbage" in reason:
            return FileError(f"the JSON array is followed by more text ({where}){context}; remove it")
        return FileError(f"the JSON is not valid {where} (around byte {self.bytes_read:,}): {reason}{context}")


class NdjsonReader:
    fields = None

    def __init__(self, stream: BinaryIO, *, max_cell_bytes: int) -> None:
        self.max_cell_bytes = max_cell_bytes
        self.max_line_bytes = MAX_LINE_CELLS * max_cell_bytes
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
            for line in lines:
                number += 1
                record = self._record(number, line)
                if record is not None:
                    yield record
            if len(pending) > self.max_line_bytes:
                skipped, pending = pending[:1000], b""
        if skipped is not None:
            number += 1
            yield self._too_long(number, skipped)
        elif pending:
            record = self._record(number + 1, pending)
            if record is not None:
                yield record

    def _record(self, number: int, line: bytes) -> Record | None:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            if not line.strip():
                return None  # a blank line
            problem = f"line {number} is not valid JSON: {error.msg} (at character {error.pos + 1})"
            return Record(number, {}, problem, line, as_text)
        if value.__class__ is not dict:
            return Record(number, {}, f"line {number} holds {kind_of(value)}, not an object", value, json_text)
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
