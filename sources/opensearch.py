"""OpenSearch source: the export query as query DSL, read in one pass (point in time or scroll).

Semantics match ``sources.sql`` (read its docstring) so that one ``Query`` gives the same rows from
every store:

- EQ is a ``term``; NE and NOT_IN are ``must_not`` clauses, so documents without the field (SQL's
  NULL) are kept, like ``IS DISTINCT FROM``;
- GT/GTE/LT/LTE/BETWEEN are ``range`` queries (BETWEEN inclusive); dates and date-times carry an
  explicit ``format`` and compare as instants in UTC (fractions finer than the field keeps are
  rounded the way the comparison needs, so ``LT 09:00:00.1234`` still finds ``09:00:00.123``);
- CONTAINS is a case-sensitive ``wildcard`` ``*value*`` with ``*``, ``?`` and ``\\`` escaped;
  PREFIX a ``prefix`` query; IS_NULL ``must_not exists`` (false: ``exists``);
- a ``text`` field is filtered and sorted through its ``keyword`` subfield; one without such a
  subfield is refused with a user error instead of matching analysed tokens;
- ascending sorts put missing values last, descending first; the dataset key (ascending) ends
  every sort, so the order is total and a rerun writes the same file.

Reading: with a total order (the dataset has a key) a short read (at most ``PIT_MAX_PAGES`` pages,
as the caller's count says) opens a point in time and pages with ``search_after``; a longer one is
one scroll sorted the same way (some clusters sort every match again for each ``search_after``
page). A cluster without point-in-time support, or a dataset without a key (whose sort values
need not be unique), is read with one scroll, sorted by ``_doc`` unless a sort is asked for. The
point in time or scroll is released when the read ends, fails or is abandoned (the generator is
closed, the task cancelled), and ``close()`` releases whatever is still open.

Speed: the next page is asked for before the current one is handed out (the cluster prepares it
meanwhile); an export of every mapped field asks for whole documents (a ``_source`` filter that
drops nothing costs the cluster a rewrite of each); a page's answer is parsed from its bytes and
converted at once, column by column in C where the cells allow (``PageReader``), with the cyclic
garbage collector paused until the documents are freed; CSV goes to the writer by column
(``csv_batches``), never as row tuples. A CSV read of ``HELPERS_AFTER_CELLS`` cells or more hands
each answer's bytes to helper processes that convert and write it (``RenderedPages``): this
process only fetches, both cores convert while the cluster prepares the next pages.

Failures: 429, 5xx, connection errors and timeouts are retried with exponential backoff (4 tries
over about 5 s), then raised as ``TransientSourceError``; the worker retries the whole export.
A scroll page is only retried when the request cannot have reached the cluster (429, refused
connection): a scroll cannot be rewound, and a replayed page would silently skip rows (so a long
read in key order, being a scroll, starts again where a point in time would retry the page). Other
4xx answers (missing index, bad credentials, refused query) are ``SourceError`` with a message
that says what to change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from opensearchpy import AIOHttpConnection, AsyncOpenSearch, OpenSearch
from opensearchpy._async.http_aiohttp import OpenSearchClientResponse
from opensearchpy.exceptions import (
    ConnectionError as OSConnectionError,
)
from opensearchpy.exceptions import (
    ConnectionTimeout,
    SerializationError,
    TransportError,
)
from opensearchpy.serializer import JSONSerializer

import formats.csv as csv_format
from dataport import errors
from dataport.errors import UserError, UserErrors
from sources.base import Column, Dataset, Row, SourceError, TransientSourceError
from sources.helpers import HELPERS
from sources.opensearch_pages import BadCell, PageReader, RenderedPages, csv_of, parse
from sources.query import Filter, Query

log = logging.getLogger("dataport.sources.opensearch")

# Pauses between tries: 4 tries over about 5 seconds (each pause varies by up to ±20 %).
RETRY_DELAYS = (0.7, 1.4, 2.8)
REQUEST_TIMEOUT_SECONDS = 30.0
RELEASE_TIMEOUT_SECONDS = 1.0  # a point in time or scroll is given up within this
KEEP_ALIVE = "5m"  # between two pages; renewed by every page
MAX_PAGE = 10_000  # index.max_result_window's default
PAGE_CELLS = 200_000  # documents per page x columns: bounds the memory one page takes
# A read in key order of more pages than this is one sorted scroll rather than a point in time with
# search_after: some clusters (osmem) sort every match again for each search_after page, which
# makes a long read quadratic (200,000 documents in pages of 10,000: 21 sorts, ~14 s, against one
# sort and ~1.5 s for a scroll); on a cluster that does not, both cost about the same. A short read
# keeps the point in time, whose pages can be retried.
PIT_MAX_PAGES = 4
# A CSV read of this many cells (documents x columns) or more is converted by helper processes
# (``RenderedPages``). Forked from a running fork server they pay off from about one page of
# 10,000 narrow documents on (measured here); a few pages' worth keeps small reads, and the api's
# streaming route (whose fork server may not be running yet), to one process.
HELPERS_AFTER_CELLS = 500_000

# OpenSearch field types, by the column type they hold.
_INTEGER_TYPES = {"long", "integer", "short", "byte", "unsigned_long"}
_FLOAT_TYPES = {"double", "float", "half_float", "scaled_float"}
_KEYWORD_TYPES = {"keyword", "constant_keyword"}
_TEXT_TYPES = {"text", "match_only_text"}
# Kept as plain text but neither filtered nor sorted: their queries do not compare like SQL text.
_OPAQUE_TEXT_TYPES = {"ip", "version", "wildcard", "binary"}
_PLAIN_DATE_FORMATS = {"yyyy-MM-dd", "date", "strict_date"}
_EPOCH_FORMATS = {"epoch_millis", "epoch_second"}
# The OpenSearch type assumed for a declared column that the mapping does not know (yet).
_DEFAULT_KINDS = {"string": "keyword", "integer": "long", "float": "double", "boolean": "boolean",
                  "date": "date", "datetime": "date"}  # fmt: skip
# Shard failures that a later try can get past.
_TRANSIENT_FAILURES = ("rejected", "node_not_connected", "no_shard_available", "node_disconnected",
                       "circuit_breaking", "timeout")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Fields: where a column lives in the index


@dataclass(frozen=True)
class Field:
    """Where filters and sorts on a column look: ``path`` (a text field's keyword subfield) and
    the OpenSearch type there. ``searchable`` is false for a text field without a keyword
    subfield; ``mapped`` is false for a column the mapping does not know."""

    path: str
    kind: str
    searchable: bool = True
    mapped: bool = True


def _default_field(column: Column) -> Field:
    return Field(column.name, _DEFAULT_KINDS.get(column.type, "keyword"), mapped=False)


def _mapping_properties(response: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The ``properties`` of each index in a get-mapping answer, indices in name order."""
    for _, entry in sorted(response.items()):
        mappings = (entry or {}).get("mappings") or {}
        if "properties" not in mappings and len(mappings) == 1:  # a pre-7 mapping type level
            mappings = next(iter(mappings.values())) or {}
        yield mappings.get("properties") or {}


def _leaves(properties: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Leaf fields as (dotted name, spec); object properties are walked, nested ones skipped
    (plain queries cannot reach inside them)."""
    for name, spec in properties.items():
        if not isinstance(spec, dict):
            continue
        full = prefix + name
        kind = spec.get("type", "object" if "properties" in spec else None)
        if kind == "object":
            if spec.get("enabled", True) is not False:
                yield from _leaves(spec.get("properties") or {}, full + ".")
        elif kind is not None and kind != "nested":
            yield full, spec


def _keyword_subfield(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    subs = [(n, s) for n, s in (spec.get("fields") or {}).items() if isinstance(s, dict) and s.get("type") == "keyword"]
    subs.sort(key=lambda item: (item[0] != "keyword", item[0]))
    return subs[0] if subs else None


def _date_type(spec: Mapping[str, Any]) -> str:
    formats = [f.strip() for f in str(spec.get("format") or "").split("||") if f.strip()]
    if formats and formats[0] in _PLAIN_DATE_FORMATS and all(
        f in _PLAIN_DATE_FORMATS or f in _EPOCH_FORMATS for f in formats
    ):
        return "date"
    return "datetime"


def _describe(name: str, spec: Mapping[str, Any]) -> tuple[Column, Field] | None:
    """The column a mapped field becomes, and where its filters and sorts look."""
    kind = spec.get("type")
    indexed = spec.get("index", True) is not False
    doc_values = spec.get("doc_values", True) is not False
    if kind in _KEYWORD_TYPES:
        plain = not spec.get("normalizer")  # a normalizer would make filters and sorts case-blind
        return Column(name, "string", filterable=indexed and plain, sortable=doc_values and plain), Field(name, kind)
    if kind in _TEXT_TYPES:
        sub = _keyword_subfield(spec)
        if sub is None:
            return Column(name, "string", filterable=False, sortable=False), Field(name, kind, searchable=False)
        sub_name, sub_spec = sub
        plain = not sub_spec.get("normalizer")
        return (
            Column(name, "string", filterable=plain and sub_spec.get("index", True) is not False,
                   sortable=plain and sub_spec.get("doc_values", True) is not False),
            Field(f"{name}.{sub_name}", "keyword"),
        )
    if kind in _OPAQUE_TEXT_TYPES:
        return Column(name, "string", filterable=False, sortable=False), Field(name, kind, searchable=False)
    if kind in _INTEGER_TYPES:
        column_type = "integer"
    elif kind in _FLOAT_TYPES:
        column_type = "float"
    elif kind == "boolean":
        column_type = "boolean"
    elif kind == "date":
        column_type = _date_type(spec)
    elif kind == "date_nanos":
        column_type = "datetime"
    else:
        return None  # geo, range, join, flat_object, alias, ...: not a column
    return Column(name, column_type, filterable=indexed, sortable=doc_values), Field(name, kind)


def _describe_mapping(response: Mapping[str, Any]) -> dict[str, tuple[Column, Field]]:
    """Every field of every index in the answer, by dotted name; the first index (by name) to
    map a field decides its type."""
    described: dict[str, tuple[Column, Field]] = {}
    for properties in _mapping_properties(response):
        for name, spec in _leaves(properties):
            if name not in described:
                entry = _describe(name, spec)
                if entry is not None:
                    described[name] = entry
    return described


# Dynamic settings under which a document can hold fields its mapping does not list.
_OPEN_DYNAMIC = {False, "false", "false_allow_templates", "runtime"}


def _source_fields(response: Mapping[str, Any]) -> frozenset[str] | None:
    """Every leaf field a document's ``_source`` can hold, by dotted name, over every index in a
    get-mapping answer; None when a document may hold more than the mappings list (dynamic
    mapping off somewhere, a disabled object, nested objects, a filtered ``_source``)."""
    names: set[str] = set()

    def walk(properties: Mapping[str, Any], prefix: str, dynamic: Any) -> bool:
        for name, spec in properties.items():
            if not isinstance(spec, dict):
                return False
            kind = spec.get("type", "object" if "properties" in spec else None)
            if kind in ("object", "nested"):
                inner = spec.get("dynamic", dynamic)
                if kind == "nested" or spec.get("enabled", True) is False or inner in _OPEN_DYNAMIC:
                    return False
                if not walk(spec.get("properties") or {}, prefix + name + ".", inner):
                    return False
            elif kind is None:
                return False  # neither a field nor an object: unknown, so not known to be closed
            elif kind != "alias":  # an alias holds nothing in _source
                names.add(prefix + name)
        return True

    for _, entry in sorted(response.items()):
        mappings = (entry or {}).get("mappings") or {}
        if "properties" not in mappings and len(mappings) == 1:  # a pre-7 mapping type level
            mappings = next(iter(mappings.values())) or {}
        stored = mappings.get("_source") or {}
        if mappings.get("dynamic") in _OPEN_DYNAMIC or stored.get("includes") or stored.get("excludes"):
            return None
        if not walk(mappings.get("properties") or {}, "", mappings.get("dynamic")):
            return None
    return frozenset(names)


def discover_columns(url: str, index: str) -> tuple[Column, ...]:
    """The index mapping as columns (object fields as dotted names, in name order). Blocking:
    called once at start-up."""
    client = OpenSearch(hosts=[url], timeout=10, max_retries=2, retry_on_timeout=True,
                        retry_on_status=(429, 502, 503, 504))  # fmt: skip
    try:
        response = client.indices.get_mapping(index=index)
    except TransportError as e:
        raise SourceError(explain_error(e, f"reading the mapping of index '{index}'", index, url)) from None
    finally:
        client.close()
    described = _describe_mapping(response)
    if not described:
        raise SourceError(f"index '{index}' at {redact(url)} maps no fields that can be exported")
    return tuple(column for _, (column, _) in sorted(described.items()))


# --------------------------------------------------------------------------------------------
# The query DSL


def compile_query(query: Query, fields: Mapping[str, Field] | None = None) -> dict[str, Any]:
    """The search body for ``query``: ``query`` (bool filter / must_not), ``sort`` and ``_source``.

    ``fields`` says where each column lives (from the index mapping); without it every column is
    taken to be a field of its own name and of the usual type for its column type.
    Raises ``UserErrors`` for a filter or sort on a text field that has no keyword subfield."""
    return _compile(query, fields or {})[0]


def _compile(query: Query, fields: Mapping[str, Field]) -> tuple[dict[str, Any], bool]:
    """The body, and whether its sort is a total order (the dataset key ends it)."""

    def field(column: Column) -> Field:
        return fields.get(column.name) or _default_field(column)

    problems: list[UserError] = []
    must: list[dict[str, Any]] = []
    must_not: list[dict[str, Any]] = []
    for i, f in enumerate(query.filters):
        where = field(f.column)
        if not where.searchable and f.op != "IS_NULL":
            problems.append(UserError(
                f"Column '{f.column.name}' is full text in the index (no keyword subfield) and cannot be "
                f"filtered with {f.op}.", errors.NOT_FILTERABLE, ("input", "filters", str(i), "field")))
            continue
        positive, negative = _condition(f, where)
        must.extend(positive)
        must_not.extend(negative)

    sort: list[Any] = []
    for i, s in enumerate(query.sort):
        where = field(s.column)
        if not where.searchable:
            problems.append(UserError(
                f"Column '{s.column.name}' is full text in the index (no keyword subfield) and cannot be sorted on.",
                errors.NOT_SORTABLE, ("input", "sort", str(i), "field")))
            continue
        sort.append(_sort_clause(s.column, where, s.descending))
    if problems:
        raise UserErrors(problems)

    sorted_on = {s.column.name for s in query.sort}
    total = bool(query.dataset.key)
    for name in query.dataset.key:
        column = query.dataset.by_name.get(name)
        if name in sorted_on:
            continue
        where = field(column) if column is not None else None
        if where is None or not where.searchable:
            total = False
            continue
        sort.append(_sort_clause(column, where, False))
    if not query.dataset.key:
        sort.append("_doc")  # index order: cheapest, and the order of a table without a key

    body: dict[str, Any] = {}
    if must or must_not:  # without filters, no query: match_all is the default (and costs some servers)
        body["query"] = {"bool": {}}
        if must:
            body["query"]["bool"]["filter"] = must
        if must_not:
            body["query"]["bool"]["must_not"] = must_not
    body["sort"] = sort
    body["_source"] = {"includes": [c.name for c in query.columns]}
    return body, total


def _sort_clause(column: Column, where: Field, descending: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"order": "desc" if descending else "asc", "missing": "_first" if descending else "_last"}
    if not where.mapped:
        spec["unmapped_type"] = where.kind
    return {where.path: spec}


_MATCH_NONE: dict[str, Any] = {"match_none": {}}
_RANGE_OPS = {"GT": "gt", "GTE": "gte", "LT": "lt", "LTE": "lte"}


def _condition(f: Filter, where: Field) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(filter clauses, must_not clauses) for one filter."""
    path, op = where.path, f.op
    if op == "IS_NULL":
        exists = {"exists": {"field": path}}
        return ([], [exists]) if f.values[0] else ([exists], [])
    if op == "CONTAINS":
        return [{"wildcard": {path: {"value": f"*{_escape_wildcard(f.values[0])}*"}}}], []
    if op == "PREFIX":
        return [{"prefix": {path: {"value": f.values[0]}}}], []
    if f.column.type in ("date", "datetime"):
        return _date_condition(f, where)
    if op == "EQ":
        return [{"term": {path: f.values[0]}}], []
    if op == "NE":
        return [], [{"term": {path: f.values[0]}}]
    if op == "IN":
        return [{"terms": {path: list(f.values)}}], []
    if op == "NOT_IN":
        return [], [{"terms": {path: list(f.values)}}]
    if "" in f.values and op in ("GT", "GTE", "LT", "LTE", "BETWEEN"):
        return _empty_text_bound(f, path)
    if op in _RANGE_OPS:
        return [{"range": {path: {_RANGE_OPS[op]: f.values[0]}}}], []
    if op == "BETWEEN":
        return [{"range": {path: {"gte": f.values[0], "lte": f.values[1]}}}], []
    raise ValueError(f"operator {op} has no OpenSearch form")  # build_query refuses these first


def _empty_text_bound(f: Filter, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A range bounded by the empty text, written without it: "" is the least text, and some
    servers take an empty bound for no bound at all."""
    empty = {"term": {path: ""}}
    exists = {"exists": {"field": path}}
    if f.op == "LT":
        return [_MATCH_NONE], []
    if f.op == "LTE":
        return [empty], []
    if f.op == "GT":
        return [exists], [empty]
    if f.op == "GTE":
        return [exists], []
    low, high = f.values  # BETWEEN
    if high == "":
        return ([empty], []) if low == "" else ([_MATCH_NONE], [])
    return [{"range": {path: {"lte": high}}}], []


def _escape_wildcard(value: str) -> str:
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def _date_condition(f: Filter, where: Field) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dates and date-times. Comparisons are ranges with an explicit format, so they hold whatever
    format the mapping declares. A ``date`` field keeps milliseconds: a filter value with finer
    digits is rounded the way each comparison needs, so that the answer is the exact one."""
    path, op, values = where.path, f.op, f.values
    if f.column.type == "date":
        fmt, encode = "strict_date", _encode_date
        exact: Callable[[Any], bool] = lambda v: True  # noqa: E731
    else:
        fmt, encode = "strict_date_optional_time", _encode_datetime
        exact = (lambda v: True) if where.kind == "date_nanos" else (lambda v: v.microsecond % 1000 == 0)

    def rng(**bounds: Any) -> dict[str, Any]:
        return {"range": {path: {**{k: encode(v) for k, v in bounds.items()}, "format": fmt}}}

    if op in ("EQ", "NE"):
        v = values[0]
        if not exact(v):  # no stored value equals it
            return ([_MATCH_NONE], []) if op == "EQ" else ([], [])
        clause = rng(gte=v, lte=v)
        return ([clause], []) if op == "EQ" else ([], [clause])
    if op in ("IN", "NOT_IN"):
        kept = [encode(v) for v in values if exact(v)]
        if not kept:
            return ([_MATCH_NONE], []) if op == "IN" else ([], [])
        clause = {"terms": {path: kept}}
        return ([clause], []) if op == "IN" else ([], [clause])
    if op in _RANGE_OPS:
        v = values[0]
        if exact(v):
            return [rng(**{_RANGE_OPS[op]: v})], []
        # stored values are whole milliseconds: x > 9.1234 ⟺ x > 9.123, x < 9.1234 ⟺ x <= 9.123
        return [rng(**{"gt" if op in ("GT", "GTE") else "lte": _floor_ms(v)})], []
    if op == "BETWEEN":
        low, high = values
        lower = {"gte": low} if exact(low) else {"gt": _floor_ms(low)}
        return [rng(**lower, lte=_floor_ms(high))], []
    raise ValueError(f"operator {op} has no OpenSearch form for dates")


def _floor_ms(value: Any) -> Any:
    if not isinstance(value, dt.datetime):
        return value
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _encode_date(value: dt.date) -> str:
    return value.isoformat()


def _encode_datetime(value: dt.datetime) -> str:
    v = value.astimezone(dt.UTC)  # not strftime, which does not zero-pad years before 1000
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}Z"


# --------------------------------------------------------------------------------------------
# Errors


def redact(url: str) -> str:
    """``url`` without its credentials, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _error_type(e: TransportError) -> str:
    info = e.info if isinstance(e.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        return str(error.get("type") or "")
    return str(e.error or "")


def error_reason(e: TransportError) -> str:
    if isinstance(e, ConnectionTimeout):
        return "no answer in time"
    if isinstance(e, OSConnectionError):
        return f"connection failed: {e.info}" if e.info else "connection failed"
    info = e.info if isinstance(e.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        causes = error.get("root_cause") or []
        cause = causes[0] if causes and isinstance(causes[0], dict) else error
        return f"{cause.get('type') or error.get('type')}: {cause.get('reason') or error.get('reason')}"
    if isinstance(error, str):
        return error
    return str(e.error or info or e.status_code)


def is_transient(e: TransportError) -> bool:
    if isinstance(e, OSConnectionError):  # includes timeouts
        return True
    return isinstance(e.status_code, int) and (e.status_code == 429 or e.status_code >= 500)


def _never_reached(e: TransportError) -> bool:
    """True when the cluster cannot have acted on the request: it said "too many requests", or
    no connection was made."""
    if e.status_code == 429:
        return True
    return isinstance(e, OSConnectionError) and not isinstance(e, ConnectionTimeout) and isinstance(
        e.info, aiohttp.ClientConnectorError
    )


def _context_gone(e: TransportError) -> bool:
    text = f"{_error_type(e)} {error_reason(e)}"
    return e.status_code == 404 and ("search_context_missing" in text or "No search context found" in text)


def explain_error(e: TransportError, what: str, index: str, url: str) -> str:
    """A message for a failure that a retry will not mend: what went wrong and what to change."""
    where = redact(url)
    kind = _error_type(e)
    if isinstance(e, OSConnectionError):
        return f"OpenSearch at {where} could not be reached while {what} ({error_reason(e)})."
    if "index_not_found" in kind:
        return (f"Index '{index}' does not exist at {where}. Check `index` in the datasets file, or create "
                f"the index.")  # fmt: skip
    if e.status_code == 401:
        return f"OpenSearch at {where} refused the credentials (401). Check the user and password in the dataset's url."
    if e.status_code == 403:
        return f"OpenSearch at {where} does not allow {what} (403: {error_reason(e)}). Grant the user read access."
    if e.status_code == 400:
        return f"OpenSearch refused the request while {what} ({error_reason(e)})."
    return f"OpenSearch at {where} answered {e.status_code} while {what} ({error_reason(e)})."


def _shard_problem(response: Mapping[str, Any], what: str) -> SourceError | None:
    """Partial answers are never exported: a failed shard or a timed-out search is an error."""
    shards = response.get("_shards") or {}
    if response.get("timed_out"):
        return TransientSourceError(f"OpenSearch timed out while {what}; the answer would be incomplete.")
    if not shards.get("failed"):
        return None
    reasons = []
    for failure in shards.get("failures") or []:
        reason = failure.get("reason") if isinstance(failure, dict) else None
        if isinstance(reason, dict):
            reasons.append(f"{reason.get('type')}: {reason.get('reason')}")
    text = "; ".join(dict.fromkeys(reasons)) or "no reason given"
    message = f"{shards['failed']} shard(s) failed while {what} ({text}); the answer would be incomplete."
    if not reasons or any(any(t in r for t in _TRANSIENT_FAILURES) for r in reasons):
        return TransientSourceError(message)
    return SourceError(message)


# --------------------------------------------------------------------------------------------
# The source


class OrjsonSerializer(JSONSerializer):
    """orjson for the bulk of the bytes (search answers); the standard one for what it refuses
    (integers beyond 64 bits)."""

    def loads(self, s: str | bytes) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            return super().loads(s)

    def dumps(self, data: Any) -> Any:
        if isinstance(data, str | bytes):
            return data
        try:
            return orjson.dumps(data, default=self.default).decode()
        except TypeError:
            return super().dumps(data)


class _SourceSerializer(OrjsonSerializer):
    """Hands a successful JSON answer (bytes, from ``_Connection``) to ``OpenSearchSource._call``
    unparsed: it parses and digests a page in one go (see there)."""

    def loads(self, s: str | bytes) -> Any:
        return s if s.__class__ is bytes else super().loads(s)


class _JsonBytesResponse(OpenSearchClientResponse):
    async def text(self, encoding: Any = None, errors: str = "strict") -> Any:
        """A successful JSON answer as its bytes: orjson parses UTF-8 bytes directly, where text
        would be decoded here and encoded back inside orjson (~25 % of the parse of a page with
        non-ASCII text). Anything else (errors, other types) as text."""
        if self.status < 300 and self.content_type == "application/json":
            return await self.read()
        return await super().text(encoding, errors)


class _Connection(AIOHttpConnection):
    async def _create_aiohttp_session(self) -> Any:
        await super()._create_aiohttp_session()
        # aiohttp takes the response class only when the session is made, and opensearch-py makes
        # it; should the attribute ever be renamed, answers are simply decoded to text as before.
        self.session._response_class = _JsonBytesResponse


def _query_key(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body.get("query"), option=orjson.OPT_SORT_KEYS)


@dataclass(eq=False)
class _Cursor:
    kind: str  # "pit" | "scroll"
    id: str


class OpenSearchSource:
    def __init__(self, dataset: Dataset, settings: Any = None, *, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 timeout: float = REQUEST_TIMEOUT_SECONDS, page_rows: int | None = None,
                 pit_max_pages: int = PIT_MAX_PAGES, helpers_after_cells: int = HELPERS_AFTER_CELLS):  # fmt: skip
        """``page_rows`` fixes the documents per request (default: by a cell budget, at least a
        batch); ``retry_delays`` are the pauses between tries; a read in key order of more than
        ``pit_max_pages`` pages is one sorted scroll instead of a point in time; a CSV read of at
        least ``helpers_after_cells`` cells is converted by helper processes."""
        self.dataset = dataset
        self.page_rows = page_rows
        self.pit_max_pages = pit_max_pages
        self.helpers_after_cells = helpers_after_cells
        self.index = dataset.table
        self.retry_delays = tuple(retry_delays)
        self.timeout = float(settings.opensearch_timeout_seconds if settings is not None else timeout)
        self.client = AsyncOpenSearch(
            hosts=[dataset.url], timeout=self.timeout, max_retries=0, retry_on_status=(),
            serializer=_SourceSerializer(), connection_class=_Connection,
        )  # fmt: skip
        self._fields: dict[str, Field] | None = None
        self._source_fields: frozenset[str] | None = None
        self._cursors: list[_Cursor] = []
        self._pit_supported: bool | None = None
        # The last count of each query (its "query" part as JSON): (documents, exact). Callers count
        # before they read; the read uses it to choose between a point in time and a scroll.
        self._counted: dict[bytes, tuple[int, bool]] = {}

    # -- the protocol

    async def count(self, query: Query, cap: int | None = None) -> int:
        fields = await self._mapping()
        body, _ = _compile(query, fields)
        limits = [n for n in (cap, query.limit) if n is not None]
        track: int | bool = min(limits) if limits else True
        what = f"counting documents in index '{self.index}'"
        response = await self._call(what, lambda: self.client.search(
            index=self.index, body={**({"query": body["query"]} if "query" in body else {}), "size": 0,
                                    "track_total_hits": track},
            params={"filter_path": "hits.total,_shards.failed,_shards.failures,timed_out"},
        ))  # fmt: skip
        problem = _shard_problem(response, what)
        if problem:
            raise problem
        total = (response.get("hits") or {}).get("total")
        found = total.get("value", 0) if isinstance(total, dict) else int(total or 0)
        exact = not isinstance(total, dict) or total.get("relation", "eq") == "eq"
        self._counted[_query_key(body)] = (found, exact)
        return min([found, *limits])

    async def counted(self, query: Query, rows: int) -> None:
        """Take ``rows`` as the count of ``query`` (the caller's, from when the export was
        requested): the read is planned by it (point in time or scroll, helpers or not) without
        counting again."""
        body, _ = _compile(query, await self._mapping())
        self._counted[_query_key(body)] = (rows, True)

    async def batches(self, query: Query, batch_rows: int) -> AsyncIterator[list[Row]]:
        width = len(query.columns)
        async with aclosing(self._columns(query, batch_rows)) as pages:
            async for columns, count in pages:
                yield list(zip(*columns, strict=True)) if width else [()] * count

    async def csv_batches(
        self, query: Query, batch_rows: int, *, formula_guard: bool
    ) -> AsyncIterator[tuple[bytes, int]]:
        """The query as CSV bytes, exactly as ``CsvWriter.write`` writes ``batches``: ``(header, 0)``
        first, then ``(chunk, rows in chunk)``. The cells go to the writer by column, as they are
        read, instead of being made into row tuples and taken apart again."""
        writer = csv_format.CsvWriter(query.columns, formula_guard=formula_guard)
        yield writer.begin(), 0
        plan = body, pit, rows = await self._plan(query, batch_rows)
        if HELPERS and csv_format.FAST and rows * len(query.columns) >= self.helpers_after_cells:
            rendered = RenderedPages(query.columns, formula_guard)
            helpers = rendered.helpers
            helpers.begin()  # they start while the cluster answers the first request
            try:
                async with aclosing(self._pages(body, pit, query.limit, rendered)) as pages:
                    async for _ in pages:  # each page handed to a helper: take what is done
                        async for chunk in helpers.results():
                            yield chunk
                async for chunk in helpers.results(every=True):
                    yield chunk
            finally:
                helpers.stop()
            return
        async with aclosing(self._columns(query, batch_rows, plan)) as pages:
            async for columns, count in pages:
                yield csv_of(writer, columns, count), count

    async def close(self) -> None:
        for cursor in list(self._cursors):
            await self._release(cursor)
        await self.client.close()

    # -- reading

    async def _columns(self, query: Query, batch_rows: int, plan: tuple[dict[str, Any], bool, int] | None = None,
                       ) -> AsyncIterator[tuple[list[Sequence[Any]], int]]:  # fmt: skip
        """The rows as (one sequence of cells per column, rows), at most ``batch_rows`` at a time."""
        body, pit, _ = plan or await self._plan(query, batch_rows)
        batch_rows = max(1, batch_rows)
        async with aclosing(self._pages(body, pit, query.limit, PageReader(query.columns))) as pages:
            async for columns, count in pages:
                for start in range(0, count, batch_rows):
                    yield [cells[start : start + batch_rows] for cells in columns], min(batch_rows, count - start)

    async def _plan(self, query: Query, batch_rows: int) -> tuple[dict[str, Any], bool, int]:
        """How to read ``query``: the search body, whether through a point in time, and how many
        rows the read gives (from the caller's count; at least that many when it was capped)."""
        fields = await self._mapping()
        body, total_order = _compile(query, fields)
        if self._source_fields is not None and self._source_fields <= {c.name for c in query.columns}:
            # The export takes every field a document can hold: a _source filter would drop nothing,
            # and costs the cluster a parse and rewrite of every document (osmem: 3 of 4 seconds
            # for 200,000 narrow documents). Unfiltered, the same cells are looked up by name.
            del body["_source"]
        # Pages larger than a batch save round trips (and, for search_after, the cluster's work per
        # page); the cell budget keeps pages of wide documents as small as a batch.
        size = min(MAX_PAGE, query.limit or MAX_PAGE,
                   self.page_rows or max(batch_rows, PAGE_CELLS // max(1, len(query.columns))))
        body = {**body, "size": size}
        rows = await self._rows_to_read(query, body, size)
        return body, total_order and math.ceil(rows / size) <= self.pit_max_pages, rows

    async def _rows_to_read(self, query: Query, body: dict[str, Any], size: int) -> int:
        """How many rows a read of ``query`` gives, from the caller's count of it (counting now,
        only as far as the answer matters, if there was none)."""
        limit = query.limit
        found, exact = self._counted.get(_query_key(body), (0, False))
        if not exact and (limit is None or found < limit) and found <= self.pit_max_pages * size:
            await self.count(query, cap=self.pit_max_pages * size + 1)
            found, exact = self._counted[_query_key(body)]
        return found if limit is None else min(found, limit)

    async def _pages(self, body: dict[str, Any], pit: bool, limit: int | None,
                     read: PageReader | RenderedPages,
                     ) -> AsyncIterator[tuple[list[Sequence[Any]], int]]:  # fmt: skip
        """The pages as (what ``read`` made of the hits, rows), in one pass: cells by column from a
        ``PageReader``, None from ``RenderedPages`` (whose helpers hold the pages' CSV). Through a
        point in time (``pit``, where the cluster has one) or a scroll; released when the read
        ends, fails or is abandoned.

        The request for the next page is sent before a page is handed out, so that the cluster
        prepares it while this process writes the current one; each page is converted as soon as
        it is parsed, so that its documents are freed before the next one arrives."""
        size = body["size"]
        remaining = limit
        cursor = await self._open_pit() if pit else None
        if cursor is not None:
            body = {**body, "track_total_hits": False}  # (a scroll refuses this)
        what = f"reading index '{self.index}'"
        pending: asyncio.Future | None = None
        try:
            if cursor is not None:
                page = await self._call(what, lambda: self._pit_page(cursor, body, None),
                                        digest=partial(self._digest, what, cursor, remaining, read), decode=read.decode)
            else:
                # The scroll's id is taken before the hits are read (a bad cell fails the read), so
                # that the scroll is released all the same.
                scroll: list[_Cursor] = []

                def opened(response: Any) -> Any:  # parsed, or decoded by the reader
                    scroll_id = response.get("_scroll_id") if response.__class__ is dict else response.scroll_id
                    if scroll_id:
                        scroll.append(_Cursor("scroll", scroll_id))
                        self._cursors.append(scroll[0])
                    return self._digest(what, scroll[0] if scroll else None, remaining, read, response)

                try:
                    page = await self._call(what, lambda: self.client.search(index=self.index, body=body,
                                                                             scroll=KEEP_ALIVE),
                                            digest=opened, decode=read.decode)
                finally:
                    cursor = scroll[0] if scroll else None
            while True:
                columns, count, after = page
                if remaining is not None:
                    remaining -= count
                # search_after answers full pages until the end; a scroll, an empty one at the end
                more = count > 0 and remaining != 0 and cursor is not None and (cursor.kind != "pit" or count == size)
                if more:
                    assert cursor is not None
                    pending = asyncio.ensure_future(self._next_page(what, cursor, body, after, remaining, read))
                if count:
                    yield columns, count
                if not more:
                    return
                assert pending is not None
                page = columns = None  # not kept alive while the next page is read
                page = await pending
                pending = None
        finally:
            if pending is not None:  # abandoned (closed, cancelled, failed) with a page asked for
                pending.cancel()
                with suppress(BaseException):
                    await pending
            if cursor is not None:
                await self._release(cursor)

    async def _next_page(self, what: str, cursor: _Cursor, body: dict[str, Any], after: list[Any] | None,
                         remaining: int | None, read: PageReader | RenderedPages,
                         ) -> tuple[list[Sequence[Any]], int, list[Any] | None]:  # fmt: skip
        digest = partial(self._digest, what, cursor, remaining, read)
        if cursor.kind == "pit":
            return await self._call(what, lambda: self._pit_page(cursor, body, after), digest=digest,
                                    decode=read.decode)
        return await self._call(what, lambda: self.client.scroll(body={"scroll_id": cursor.id, "scroll": KEEP_ALIVE}),
                                replay_safe=False, digest=digest, decode=read.decode)

    @staticmethod
    def _digest(what: str, cursor: _Cursor | None, remaining: int | None,
                read: PageReader | RenderedPages, response: Mapping[str, Any],
                ) -> tuple[list[Sequence[Any]], int, list[Any] | None]:  # fmt: skip
        """A page's answer (parsed, or a typed page from ``read.decode``) as (cells by column, rows,
        the last hit's sort values); the cursor takes the id it carries. At most ``remaining`` hits
        are read. None when a typed page holds a cell that does not convert: then the answer is
        read again as dicts, whose error names the document."""
        if response.__class__ is not dict:  # a typed page
            head: Mapping[str, Any] = {"_shards": response.shards, "timed_out": response.timed_out,
                                       "pit_id": response.pit_id, "_scroll_id": response.scroll_id}
            hits = response.hits.hits if response.hits is not None else []
        else:
            head = response
            hits = (response.get("hits") or {}).get("hits") or []
        problem = _shard_problem(head, what)
        if problem:
            raise problem
        if cursor is not None:
            cursor.id = head.get("pit_id" if cursor.kind == "pit" else "_scroll_id") or cursor.id
        if remaining is not None:
            hits = hits[:remaining]
        after = None
        if hits and cursor is not None and cursor.kind == "pit":
            after = hits[-1]["sort"] if response.__class__ is dict else hits[-1].sort
        try:
            return read.take(response, hits), len(hits), after
        except BadCell:
            return None

    async def _mapping(self) -> dict[str, Field]:
        """Where each column lives (a text column's keyword subfield), from the index mapping;
        fetched once per source. Without the right to read mappings, columns are taken as named."""
        if self._fields is None:
            try:
                response = await self._call(f"reading the mapping of index '{self.index}'",
                                            lambda: self.client.indices.get_mapping(index=self.index))
            except SourceError as e:
                if not isinstance(e.__cause__, TransportError) or e.__cause__.status_code != 403:
                    raise
                response = {}
            self._fields = {name: where for name, (_, where) in _describe_mapping(response).items()}
            self._source_fields = _source_fields(response) if response else None
        return self._fields

    async def _open_pit(self) -> _Cursor | None:
        """A point in time over the index, or None where the cluster has none (it is then read
        with a scroll)."""
        if self._pit_supported is False:
            return None
        try:
            response = await self._call(f"opening a point in time on index '{self.index}'",
                                        lambda: self.client.create_pit(index=self.index, keep_alive=KEEP_ALIVE))
        except TransientSourceError:
            raise
        except SourceError as e:
            cause = e.__cause__
            if isinstance(cause, TransportError) and "index_not_found" in _error_type(cause):
                raise
            log.info("index '%s': no point in time (%s); reading with a scroll", self.index, e)
            self._pit_supported = False
            return None
        self._pit_supported = True
        cursor = _Cursor("pit", response["pit_id"])
        self._cursors.append(cursor)
        return cursor

    def _pit_page(self, cursor: _Cursor, body: dict[str, Any], after: list[Any] | None) -> Awaitable[Any]:
        page = {**body, "pit": {"id": cursor.id, "keep_alive": KEEP_ALIVE}}
        if after is not None:
            page["search_after"] = after
        return self.client.search(body=page)

    async def _release(self, cursor: _Cursor) -> None:
        """Give the point in time or scroll back to the cluster, within a second; a failure is
        logged (the cluster drops it when its keep-alive ends)."""
        if cursor not in self._cursors:
            return
        self._cursors.remove(cursor)
        if cursor.kind == "pit":
            call = self.client.delete_pit(body={"pit_id": [cursor.id]})
        else:
            call = self.client.clear_scroll(body={"scroll_id": [cursor.id]}, ignore=(404,))
        try:
            await asyncio.wait_for(call, RELEASE_TIMEOUT_SECONDS)
        except (TransportError, SerializationError, TimeoutError, aiohttp.ClientError, RuntimeError) as e:
            log.warning("index '%s': could not release the %s (%s); it expires after %s", self.index,
                        "point in time" if cursor.kind == "pit" else "scroll", e, KEEP_ALIVE)

    async def _call(self, what: str, request: Callable[[], Awaitable[Any]], *, replay_safe: bool = True,
                    digest: Callable[[Any], Any] | None = None, decode: Callable[[bytes], Any] | None = None) -> Any:
        """One request, retried with backoff while the failure may pass. ``replay_safe=False``
        (a scroll page) retries only what cannot have reached the cluster. The answer, parsed, or
        what ``digest`` makes of it: of what ``decode`` makes of its bytes if that is not None (and
        ``digest`` takes it), else of the parsed answer."""
        answer = await self._request(what, request, replay_safe)
        if answer.__class__ is not bytes:
            return digest(answer) if digest is not None else answer
        # A page is ~10,000 hits of dicts and lists (no cycles) that live only until ``digest`` has
        # taken their cells. Left on, the cyclic collector would scan them (and, every so often, the
        # whole heap) over and over while they are made, then once more: ~20 % of an export's CPU.
        # Paused from the parse until they are freed, it never sees them.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            page = decode(answer) if decode is not None and digest is not None else None
            if page is not None:
                out = digest(page)
                if out is not None:
                    return out
            try:
                parsed = parse(answer)
            except ValueError as e:
                raise SourceError(f"OpenSearch sent an answer that is not JSON while {what}: {e}") from e
            if digest is None:
                return parsed
            out = digest(parsed)
            del parsed
            return out
        finally:
            if paused:
                gc.enable()

    async def _request(self, what: str, request: Callable[[], Awaitable[Any]], replay_safe: bool) -> Any:
        started = time.monotonic()
        tries = len(self.retry_delays) + 1
        for attempt in range(tries):
            try:
                return await request()
            except TransportError as e:
                if not is_transient(e):
                    if _context_gone(e):
                        raise TransientSourceError(
                            f"The point in time or scroll over index '{self.index}' expired while {what}; "
                            f"the read has to start again.") from e
                    raise SourceError(explain_error(e, what, self.index, self.dataset.url)) from e
                if not replay_safe and not _never_reached(e):
                    raise TransientSourceError(
                        f"OpenSearch failed while {what} ({error_reason(e)}); a scroll cannot be resumed after an "
                        f"unanswered page, so the read has to start again.") from e
                if attempt == tries - 1:
                    raise TransientSourceError(
                        f"OpenSearch at {redact(self.dataset.url)} failed {tries} times while {what} over "
                        f"{time.monotonic() - started:.1f} s (last: {e.status_code} {error_reason(e)}); it may be "
                        f"overloaded or down.") from e
                delay = self.retry_delays[attempt] * random.uniform(0.8, 1.2)
                log.info("index '%s': %s failed (%s %s); try %d of %d in %.1f s", self.index, what,
                         e.status_code, error_reason(e), attempt + 2, tries, delay)
                await asyncio.sleep(delay)
            except SerializationError as e:
                raise SourceError(f"OpenSearch sent an answer that is not JSON while {what}: {e}") from e
        raise AssertionError("unreachable")

