"""JSON (one array of objects) and NDJSON (one object a line), encoded with ``orjson``.

Keys follow the column order; values keep their types (``None`` is ``null``, booleans stay
booleans). No formula guard: JSON is not opened by spreadsheets, and its readers want the data
exactly as stored. ``orjson`` writes NaN and infinity as ``null`` (JSON has no spelling for them)
and refuses integers outside 64 bits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from dataport.columns import Column, Row


class JsonWriter:
    """``[`` + objects separated by ``,\\n`` + ``]\\n``; an empty export is ``[]\\n``."""

    extension = "json"
    content_type = "application/json"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.names = tuple(c.name for c in columns)
        self._separator = b""  # before the next batch: nothing at first, then ",\n"

    def begin(self) -> bytes:
        return b"["

    def write(self, rows: Sequence[Row]) -> bytes:
        if not rows:
            return b""
        names, dumps = self.names, orjson.dumps
        body = b",\n".join([dumps(dict(zip(names, row, strict=True))) for row in rows])
        head, self._separator = self._separator, b",\n"
        return head + body

    def finish(self) -> Iterator[bytes]:
        yield b"]\n"


class NdjsonWriter:
    """One object a line, every line ``\\n``-terminated; an empty export is empty."""

    extension = "ndjson"
    content_type = "application/x-ndjson"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.names = tuple(c.name for c in columns)

    def begin(self) -> bytes:
        return b""

    def write(self, rows: Sequence[Row]) -> bytes:
        names, dumps, newline = self.names, orjson.dumps, orjson.OPT_APPEND_NEWLINE
        return b"".join([dumps(dict(zip(names, row, strict=True)), option=newline) for row in rows])

    def finish(self) -> Iterator[bytes]:
        return iter(())
