"""Parsed and validated GraphQL documents, kept for the next request that sends the same text.

Clients send the same few documents over and over (a polling page sends one query text with new
variables), and graphql-core's parse and standard validation were most of the CPU an ``exportTask``
cost: of ~6.5 ms, validation ~3.7 ms and parsing ~1 ms (bench/results/2026-12-06-api_load.md).
Both are pure: a document depends only on its text and the parser's options (``max_tokens`` and
``max_source_length``, which ``api/graphql_limits.py`` sets per caller, so an anonymous caller's
smaller budget is its own key), and the standard rules' verdict only on the schema and the
document. So a document parsed once is reused, and one that passed validation once is not
validated again.

``api/graphql_limits.py``'s measure of a cached document (its depth, aliases and fields) is kept
with it too; the comparison with the caller's limits is made on every request, since it depends
on who asks. What is not cached: documents that failed to parse or to validate (they are refused
again the same way, at the same cost), and texts over ``MAX_TEXT`` characters (application
queries are far smaller; a cache of big documents would be memory an attacker chooses). The
cache is bounded (``MAX_ENTRIES``, least recently used out) and lives in each api process.

Why not Strawberry's ``ParserCache`` and ``ValidationCache``: ``ValidationCache`` sets the
validation result unconditionally, which would overwrite a ``QUERY_TOO_COMPLEX`` refusal made just
before it, and it caches refusals (shared error objects) too; ``ParserCache`` caches without a
bound on the text's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from graphql import DocumentNode
from strawberry.extensions import SchemaExtension

MAX_ENTRIES = 256
MAX_TEXT = 8 * 1024

Key = tuple[str, object, object]
T = TypeVar("T")


@dataclass
class Entry:
    document: DocumentNode
    valid: bool = False  # passed the standard validation rules
    measure: Any = None  # api/graphql_limits.py's measure of it, once taken


class DocumentCache:
    """A bounded LRU of parsed documents, keyed by text and parser options."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_text: int = MAX_TEXT) -> None:
        self.max_entries = max_entries
        self.max_text = max_text
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._by_document: dict[int, Entry] = {}  # id() of each entry's document, held by the entry
        self.hits = 0
        self.misses = 0

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Key, document: DocumentNode) -> Entry | None:
        if len(key[0]) > self.max_text:
            return None
        entry = self._entries[key] = Entry(document)
        self._by_document[id(document)] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            if self._by_document.get(id(evicted.document)) is evicted:
                del self._by_document[id(evicted.document)]
        return entry

    def of_document(self, document: DocumentNode) -> Entry | None:
        """The entry holding this very document object, if it is cached."""
        entry = self._by_document.get(id(document))
        return entry if entry is not None and entry.document is document else None

    def __len__(self) -> int:
        return len(self._entries)


# One per api process, shared by every request (the extension below is made afresh per request).
DOCUMENTS = DocumentCache()


def measured(document: DocumentNode, measure: Callable[[DocumentNode], T]) -> T:
    """``measure(document)``, taken once per cached document (``api/graphql_limits.py``'s walk of it:
    pure, and ~0.15 ms of a small query); an uncached document is measured every time."""
    entry = DOCUMENTS.of_document(document)
    if entry is None:
        return measure(document)
    if entry.measure is None:
        entry.measure = measure(document)
    return entry.measure


class CachedDocuments(SchemaExtension):
    """Serves the parse and the standard validation from ``DOCUMENTS``. List it after
    ``GraphQLLimits``: that one sets the parser's options this key includes, and its refusal (made
    on entering validation) is left alone here."""

    def __init__(self, cache: DocumentCache | None = None) -> None:
        super().__init__()
        self.cache = cache or DOCUMENTS
        self.entry: Entry | None = None

    def _key(self) -> Key | None:
        context = self.execution_context
        if not isinstance(context.query, str):
            return None
        options = context.parse_options
        return (context.query, options.get("max_tokens"), options.get("max_source_length"))

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        key = self._key()
        if key is not None and context.graphql_document is None:
            self.entry = self.cache.get(key)
            if self.entry is not None:
                context.graphql_document = self.entry.document  # Strawberry parses only when unset
        yield
        if key is not None and self.entry is None and context.graphql_document is not None:
            if not context.pre_execution_errors:
                self.entry = self.cache.put(key, context.graphql_document)

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        entry = self.entry if self.entry is not None and self.entry.document is context.graphql_document else None
        if entry is not None and entry.valid and context.pre_execution_errors is None:
            context.pre_execution_errors = []  # validated before: Strawberry validates only when None
        yield
        if entry is not None and context.pre_execution_errors == []:
            entry.valid = True
