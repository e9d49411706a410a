"""OpenSearch pages as CSV: cells by column written as rows (``csv_of``), in this process or in
helper processes, which decode and write whole answers (``RenderedPages``).

The module the fork server preloads for helper processes (``sources.helpers.HELPER_MODULES``):
it imports ``decoding``, ``cells``, ``formats.csv`` and ``sources.base``, not opensearch-py nor
aiohttp, which take most of a second to import (``sources.opensearch`` imports its modules only
when a name is asked of it, for the same reason).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import msgspec

import formats.csv as csv_format
from sources.base import Column
from sources.helpers import HELPERS, HelperPool
from sources.opensearch.cells import BadCell
from sources.opensearch.decoding import PageReader, parse


def csv_of(writer: csv_format.CsvWriter, columns: list[Sequence[Any]], count: int, finite: bool = False) -> bytes:
    """``count`` rows given as cells by column, exactly as ``writer.write`` writes them as rows.
    ``finite``: no float is NaN or infinite (true of cells that msgspec or orjson decoded: they
    refuse such numbers; the standard module, their fallback, takes them)."""
    if not csv_format.FAST or not columns:
        return writer.write(list(zip(*columns, strict=True)) if columns else [()] * count)
    # Number columns hold ints, floats and None (checked or converted by PageReader).
    known = csv_format.FINITE if finite else csv_format.NUMBERS
    return writer.render(
        count, columns.__getitem__, lambda start, stop: (list(zip(*columns[start:stop], strict=True)), known), known
    )


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
            return csv_of(
                writer, read.typed(page.hits.hits[:count] if page.hits is not None else []), count, finite=True
            )
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
                self._inline = (
                    PageReader(self.columns),
                    csv_format.CsvWriter(self.columns, formula_guard=self.formula_guard),
                )
            read, writer = self._inline
            self.helpers.add(len(hits), csv_of(writer, read(hits), len(hits)))
            return
        assert self._decoded is not None and self._decoded[0] is response  # _call digests what it decoded
        answer = self._decoded[1]
        self._decoded = None
        self.helpers.submit(len(hits), _render, answer, len(hits))
