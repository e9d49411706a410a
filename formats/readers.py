"""The reader seam for imports: a file in, one ``Record`` per row out, streamed.

``reader_for(format, stream, max_cell_bytes=…)`` picks a reader by its GraphQL ``FileFormat`` name;
the readers live beside this file (``csv_reader``, ``json_reader``, ``xlsx_reader``) and are imported
only when asked for, so that a CSV import never pays for openpyxl's import. What they hand on
(``Record``, ``RowBatch``) and the errors they raise (``FileError``) are in ``formats.records``;
the text formats read their bytes through ``formats.utf8``. Imports point one way: this module
imports the readers, the readers import ``records`` and ``utf8``, never this module.

What a reader does not do is judge cells against the dataset's columns: ``formats.converters``
does. The CSV reader also reads a batch of rows at a time, column by column (``RowBatch``), for
``formats.column_checker.ColumnChecker``: that is how the worker reads CSV.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol, cast

from formats.limits import ParseLimits
from formats.records import Record
from formats.utf8 import ByteStream


class Reader(Protocol):
    @property
    def fields(self) -> list[str] | None:
        """CSV/XLSX: the header's names, read when the reader is made. JSON/NDJSON: None (each
        record carries its own keys)."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes of the underlying stream consumed so far (for progress)."""
        ...

    def records(self) -> Iterator[Record]:
        """The rows, streamed; raises ``FileError`` for a problem with the file as a whole."""
        ...

    # Optional (CSV): ``batches(size) -> Iterator[RowBatch]``, the same records a batch at a time,
    # for ``formats.column_checker.ColumnChecker``; the worker uses it where a reader has it.


def reader_for(format: str, stream: ByteStream, *, max_cell_bytes: int, limits: ParseLimits | None = None) -> Reader:
    """A reader for ``stream`` in ``format`` (CSV, JSON, NDJSON or XLSX, any case); ``KeyError`` for
    another name.

    ``stream`` needs only ``read(n)`` (a local file or boto3's StreamingBody), except for XLSX, a
    zip archive, which needs a seekable file. CSV and XLSX readers read the header here, so this
    may raise ``FileError`` already. A cell larger than ``max_cell_bytes`` (UTF-8) fails its row;
    ``limits`` are the other bounds (``formats.limits``; the settings' defaults when None).
    """
    limits = limits or ParseLimits()
    name = format.upper()
    if name == "CSV":
        from formats.csv_reader import CsvReader

        return CsvReader(stream, max_cell_bytes=max_cell_bytes)
    if name == "JSON":
        from formats.json_reader import JsonReader

        return JsonReader(stream, max_cell_bytes=max_cell_bytes, max_nesting=limits.max_nesting)
    if name == "NDJSON":
        from formats.json_reader import NdjsonReader

        return NdjsonReader(stream, max_cell_bytes=max_cell_bytes, max_nesting=limits.max_nesting)
    if name == "XLSX":
        from formats.xlsx_reader import XlsxReader

        # The caller's promise (see above): an XLSX stream is a seekable file.
        return XlsxReader(cast(BinaryIO, stream), max_cell_bytes=max_cell_bytes, limits=limits)
    raise KeyError(format)
