"""Streaming file writers, one module per format; ``writer_for`` picks one by its GraphQL name."""

from __future__ import annotations

from collections.abc import Sequence

from dataport.columns import Column
from formats.base import Writer, WriterClass
from formats.csv import CsvWriter
from formats.json import JsonWriter, NdjsonWriter
from formats.parquet import ParquetWriter
from formats.xlsx import XlsxWriter

# Keyed by the GraphQL FileFormat enum values.
WRITERS: dict[str, WriterClass] = {
    "CSV": CsvWriter,
    "JSON": JsonWriter,
    "NDJSON": NdjsonWriter,
    "XLSX": XlsxWriter,
    "PARQUET": ParquetWriter,
}


def writer_for(format: str, columns: Sequence[Column], *, formula_guard: bool = True) -> Writer:
    """A fresh writer for one export; ``KeyError`` for a format not in ``WRITERS``.

    Any case is accepted, so the streaming route's ``format=csv`` works as well as ``CSV``.
    """
    return WRITERS[format.upper()](columns, formula_guard=formula_guard)
