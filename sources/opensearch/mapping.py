"""The index mapping: which fields are columns and of what type (``discover_columns``, once at
start-up), where a column's filters and sorts look (``Field``: a text field's keyword subfield),
and whether a document can hold more fields than the mapping lists (``_source_fields``; when it
cannot, an export of every field asks for whole documents).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError

from sources.base import Column, SourceError
from sources.opensearch.errors import explain_error, redact

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
    if (
        formats
        and formats[0] in _PLAIN_DATE_FORMATS
        and all(f in _PLAIN_DATE_FORMATS or f in _EPOCH_FORMATS for f in formats)
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
            Column(
                name,
                "string",
                filterable=plain and sub_spec.get("index", True) is not False,
                sortable=plain and sub_spec.get("doc_values", True) is not False,
            ),
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
