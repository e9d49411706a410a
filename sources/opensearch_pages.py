"""OpenSearch pages: a search answer's hits as typed cells, and as CSV in helper processes.

Kept apart from ``sources.opensearch`` (the query DSL and the client) so that a helper process
imports only this, ``formats.csv`` and ``sources.base``: not opensearch-py nor aiohttp, which take
most of a second to import.

What a cell becomes: ``cell_converter`` is the reference, one document at a time; ``PageReader``
gives the same cells a page at a time, by column, mostly in C (its docstring says how).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import operator
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from functools import partial
from itertools import repeat
from typing import Any

import msgspec
import orjson

import formats.csv as csv_format
from sources.base import DECODED_CELL_TYPES, Column, Row, SourceError, iso_datetime
from sources.helpers import HELPERS, HelperPool


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


_NONE = type(None)
_NATIVE = {"string": str, "integer": int, "float": float, "boolean": bool}  # what a cell already is, mostly
_present = partial(operator.is_not, None)  # a filter in C: the cells that are not None


def _checked_dates(values: Sequence[Any]) -> bool:
    """Whether every cell of a date column is None or already the one text form (what ``_date``
    would return for it unchanged); the check runs in C."""
    present = list(filter(_present, values))
    if not present:
        return True
    if not set(map(type, present)) <= {str} or not set(map(len, present)) <= {10}:
        return False
    # Of the forms fromisoformat takes, only YYYY-MM-DD has 8 digits and 2 dashes in 10 characters
    # (fromisoformat takes ASCII digits only), and it is its own isoformat; 2020-W01-1 is not.
    digits = "".join(present).replace("-", "")
    if len(digits) != 8 * len(present) or not digits.isdigit():
        return False
    try:
        deque(map(dt.date.fromisoformat, present), maxlen=0)
    except ValueError:
        return False
    return True


def _checked_datetimes(values: Sequence[Any]) -> bool:
    """Whether every cell of a date-time column is None or text that ``_datetime`` keeps as it is
    (20 characters, ``T`` and ``Z`` in place, a valid date-time); the check runs in C."""
    present = list(filter(_present, values))
    if not set(map(type, present)) <= {str} or not set(map(len, present)) <= {20}:
        return False
    joined = "".join(present)
    if not set(joined[10::20]) <= {"T"} or not set(joined[19::20]) <= {"Z"}:
        return False
    try:
        deque(map(dt.datetime.fromisoformat, present), maxlen=0)
    except ValueError:
        return False
    return True


_raw_decode = json.JSONDecoder().raw_decode
_LEARN_WINDOW = 64 * 1024  # bytes after a first "_source": to find the document in


class PageReader:
    """A page's hits → one sequence of cells per column, typed as ``cell_converter`` types them.

    Two ways, the same cells:

    * ``decode`` + ``typed``: a search answer's bytes decoded by msgspec straight into Structs of
      the read's fields, typed by column (no dict per document, no lookups, no type checks), once
      a first page has shown the order of the documents' keys (msgspec finds each key at once
      when the fields follow it). Not for dotted columns (nested objects), nor documents with many
      fields beyond the read's. An answer with a value of another type (text in a float field, a
      list) is not decoded (``decode`` gives None) and goes the other way;
    * ``__call__``: hits parsed into dicts (orjson); the values are looked up in C (each document
      merged over a dict of None and its fields taken with one ``itemgetter``; walks for dotted
      names), then each column's types are checked at once with ``set(map(type, …))`` (dates and
      date-times with ``fromisoformat`` mapped over the column); only a column that holds
      something else (an int in a float column, a list, a date-time in another form) goes
      through the per-cell conversion. A value of the wrong type sends the page through
      ``cell_converter``, whose error names the first bad document and column.

    10,000 narrow documents: ~12 ms the dict way, against ~23 ms for ``cell_converter``."""

    def __init__(self, columns: tuple[Column, ...], *, sort_values: bool = True):
        """``sort_values``: whether ``typed`` pages keep each hit's sort values (a point in time
        pages by them; a helper has no use for them)."""
        self.columns = columns
        self.sort_values = sort_values
        self.convert = cell_converter(columns)
        names = [c.name for c in columns]
        self.plan = [(c.type, _CELLS.get(c.type, _string)) for c in columns]
        self.walks = [(c.name, _walker(c.name) if "." in c.name else None) for c in columns]
        self.plain = len(columns) > 1 and not any("." in name for name in names)
        self.empty = dict.fromkeys(names)
        self.fields = operator.itemgetter(*names) if self.plain else None
        self._decode: Callable[[bytes], Any] | None = None
        self._learnt = not self.plain  # whether a first document has been looked at
        self._order: list[int] = []  # per column, its field in the Struct

    def __call__(self, hits: list[dict[str, Any]]) -> list[Sequence[Any]]:
        sources = [hit.get("_source") or {} for hit in hits]
        if not self._learnt and sources:
            self._learn(sources[0])
        if self.fields is not None and sources:
            # Row by row while each document is in the cache (twice as fast as a pass per column).
            raw: list[Sequence[Any]] = list(zip(*map(self.fields, map(self.empty.__or__, sources)), strict=True))
        else:
            raw = [self._values_of(sources, name, walk) for name, walk in self.walks]
        try:
            return self._typed_columns(raw, ())
        except BadCell:
            rows = self.convert(hits)  # raises the error that names the document
            return [list(cells) for cells in zip(*rows, strict=True)] if rows else [[] for _ in self.columns]

    def take(self, response: Any, hits: list[Any]) -> list[Sequence[Any]]:
        """The hits of an answer (parsed, or a typed page from ``decode``) as cells by column."""
        return self(hits) if response.__class__ is dict else self.typed(hits)

    def decode(self, answer: bytes) -> Any:
        """The answer as a typed page (``typed`` reads its hits), or None."""
        if not self._learnt:
            self._learn_from(answer)
        if self._decode is None:
            return None
        try:
            return self._decode(answer)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def typed(self, hits: list[Any]) -> list[Sequence[Any]]:
        empty = (None,) * len(self._order)
        as_tuple = msgspec.structs.astuple
        in_fields = list(zip(*[as_tuple(h.source) if h.source is not None else empty for h in hits], strict=True))
        if not in_fields:
            return [[] for _ in self.columns]
        raw = [in_fields[i] for i in self._order]
        return self._typed_columns(raw, DECODED_CELL_TYPES)  # dates and date-times are checked as they are

    def _learn_from(self, answer: bytes) -> None:
        """Learn the order of the documents' keys from the first hit's ``_source`` alone, parsed
        from the bytes around it, so that a first page is decoded typed too (a helper's first
        page the other way cost ~100 ms more, on the export's critical path). Where the source
        cannot be found so, the first page is parsed whole and shows it, as before. A false
        find is harmless: the order only makes the typed decoding faster, never different."""
        at = answer.find(b'"_source":')
        if at < 0:
            return
        window = answer[at + 10 : at + 10 + _LEARN_WINDOW].decode("utf-8", "ignore").lstrip()
        try:
            source, _ = _raw_decode(window)
        except ValueError:  # longer than the window, or not JSON
            return
        if source.__class__ is dict:
            self._learn(source)

    def _learn(self, source: Mapping[str, Any]) -> None:
        self._learnt = True
        names = [c.name for c in self.columns]
        if source.__class__ is not dict or len(source.keys() - set(names)) > 16 + len(names) // 64:
            return
        in_document_order = [k for k in source if k in self.empty] + [n for n in names if n not in source]
        kinds = {c.name: c.type for c in self.columns}
        try:
            document = msgspec.defstruct("Document", [
                (f"f{i}", DECODED_CELL_TYPES.get(kinds[name], Any), msgspec.field(name=name, default=None))
                for i, name in enumerate(in_document_order)], gc=False)
        except (TypeError, ValueError):
            return
        # Only what is read: msgspec skips the rest of a hit (_id, _index, _score) without making
        # objects of it, ~0.4 µs a hit (a fifth of decoding a page of 10,000 narrow documents).
        hit = msgspec.defstruct("Hit", [
            ("source", document | None, msgspec.field(name="_source", default=None)),
            *([("sort", Any, None)] if self.sort_values else [])], gc=False)
        hits = msgspec.defstruct("Hits", [("hits", list[hit], msgspec.field(default_factory=list))], gc=False)
        page = msgspec.defstruct("Page", [
            ("hits", hits | None, None), ("scroll_id", str | None, msgspec.field(name="_scroll_id", default=None)),
            ("pit_id", str | None, None), ("shards", Any, msgspec.field(name="_shards", default=None)),
            ("timed_out", Any, None)], gc=False)
        position = {name: i for i, name in enumerate(in_document_order)}
        self._order = [position[name] for name in names]
        self._decode = msgspec.json.Decoder(page).decode

    @staticmethod
    def _values_of(sources: list[dict[str, Any]], name: str, walk: Callable | None) -> Sequence[Any]:
        if walk is None:
            return list(map(dict.get, sources, repeat(name)))
        values = list(map(walk, sources))
        if _MISSING in values:  # not a plain walk through objects (arrays, literal dotted keys)
            values = [_flatten(s).get(name) if v is _MISSING else v for s, v in zip(sources, values, strict=True)]
        return values

    def _typed_columns(self, raw: list[Sequence[Any]], decoded: Container[str]) -> list[Sequence[Any]]:
        """Each column's values typed; those of a kind in ``decoded`` are typed already."""
        out = []
        for values, (kind, cell) in zip(raw, self.plan, strict=True):
            native = _NATIVE.get(kind)
            if kind in decoded:
                fine = True
            elif native is not None:
                fine = set(map(type, values)) <= {native, _NONE}
            elif kind == "date":
                fine = _checked_dates(values)
            elif kind == "datetime":
                fine = _checked_datetimes(values)
            else:
                fine = False
            out.append(values if fine else list(map(cell, values)))
        return out


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




# --------------------------------------------------------------------------------------------
# CSV, in this process or in helper processes


def parse(answer: bytes) -> Any:
    """A search answer's bytes parsed: by orjson, or by the standard module for integers beyond 64
    bits, which orjson refuses. Raises ``ValueError`` when they are not JSON."""
    try:
        return orjson.loads(answer)
    except orjson.JSONDecodeError:
        return json.loads(answer)


def csv_of(writer: csv_format.CsvWriter, columns: list[Sequence[Any]], count: int, finite: bool = False) -> bytes:
    """``count`` rows given as cells by column, exactly as ``writer.write`` writes them as rows.
    ``finite``: no float is NaN or infinite (true of cells that msgspec or orjson decoded: they
    refuse such numbers; the standard module, their fallback, takes them)."""
    if not csv_format.FAST or not columns:
        return writer.write(list(zip(*columns, strict=True)) if columns else [()] * count)
    # Number columns hold ints, floats and None (checked or converted by PageReader).
    known = csv_format.FINITE if finite else csv_format.NUMBERS
    return writer.render(count, columns.__getitem__,
                         lambda start, stop: (list(zip(*columns[start:stop], strict=True)), known), known)


# In a helper process: the page reader and the writer, made once by _start_rendering.
_rendering: tuple[PageReader, csv_format.CsvWriter] | None = None


def _start_rendering(columns: tuple[Column, ...], formula_guard: bool) -> None:
    global _rendering
    # A page's objects hold no cycles and are freed once it is written; the cyclic collector would
    # only scan them while they are made (the worker pauses it around a page for the same reason).
    gc.disable()
    _rendering = (PageReader(columns, sort_values=False), csv_format.CsvWriter(columns, formula_guard=formula_guard))


def _render(answer: bytes, count: int) -> bytes:
    """The first ``count`` hits of a search answer as CSV (in a helper process). A value of the
    wrong type raises the ``SourceError`` that names the document, as in the worker."""
    assert _rendering is not None
    read, writer = _rendering
    page = read.decode(answer)
    if page is not None:
        try:
            return csv_of(writer, read.typed(page.hits.hits[:count] if page.hits is not None else []), count,
                          finite=True)
        except BadCell:
            pass
    return csv_of(writer, read(((parse(answer).get("hits") or {}).get("hits") or [])[:count]), count)


class _SortValues(msgspec.Struct, gc=False):
    sort: Any = None


class _EnvelopeHits(msgspec.Struct, gc=False):
    hits: list[_SortValues] = msgspec.field(default_factory=list)


class _Envelope(msgspec.Struct, gc=False):
    """What the worker reads of an answer whose hits a helper converts: the fields of a typed
    page, with each hit's sort values only (msgspec skips the rest of the bytes in C)."""

    hits: _EnvelopeHits | None = None
    scroll_id: str | None = msgspec.field(name="_scroll_id", default=None)
    pit_id: str | None = None
    shards: Any = msgspec.field(name="_shards", default=None)
    timed_out: Any = None


_read_envelope = msgspec.json.Decoder(_Envelope).decode


class RenderedPages:
    """Pages of hits made into CSV by helper processes (``sources.helpers``), the chunks taken in
    order: a reader for ``OpenSearchSource._pages`` like ``PageReader``, for large CSV exports.

    Decoding and typing the hits, then writing them, is most of an export's CPU (200,000 narrow
    documents: ~3.3 of ~3.7 s in one process), while the cluster needs little to hand a page over.
    Here the worker only fetches: it reads an answer's head and sort values (~10 ms a page of
    10,000) and hands the bytes to a helper, which converts them as ``PageReader`` does; both
    cores convert while the cluster prepares the next page. An answer that is not an envelope
    (never seen) is parsed and written here, in its place."""

    def __init__(self, columns: tuple[Column, ...], formula_guard: bool, processes: int = HELPERS):
        self.helpers = HelperPool(_start_rendering, (columns, formula_guard), processes=processes)
        self.columns = columns
        self.formula_guard = formula_guard
        self._decoded: tuple[_Envelope, bytes] | None = None
        self._inline: tuple[PageReader, csv_format.CsvWriter] | None = None

    def decode(self, answer: bytes) -> _Envelope | None:
        """The answer's envelope, kept with its bytes until ``take`` hands them to a helper."""
        try:
            envelope = _read_envelope(answer)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        self._decoded = (envelope, answer)
        return envelope

    def take(self, response: Any, hits: list[Any]) -> None:
        """Hand the (first ``len(hits)``) hits of a decoded answer to a helper, or write those of a
        parsed one here; the chunks are taken from ``helpers``, in order."""
        if not hits:
            return
        if response.__class__ is dict:
            if self._inline is None:
                self._inline = (PageReader(self.columns), csv_format.CsvWriter(self.columns,
                                                                               formula_guard=self.formula_guard))
            read, writer = self._inline
            self.helpers.add(len(hits), csv_of(writer, read(hits), len(hits)))
            return
        assert self._decoded is not None and self._decoded[0] is response  # _call digests what it decoded
        answer = self._decoded[1]
        self._decoded = None
        self.helpers.submit(len(hits), _render, answer, len(hits))
