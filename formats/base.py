"""The format seam: a writer turns batches of typed rows into bytes, one chunk per batch.

Cells arrive as ``None``, ``str``, ``int``, ``float`` or ``bool``; dates and date-times arrive as
ISO 8601 text. A writer never holds more than the batch it is given, so memory does not grow with
the number of rows. The same writers serve the worker (chunks go to storage) and the streaming
route (chunks go to the HTTP response).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from dataport.columns import Column, Row


class Writer(Protocol):
    extension: str
    content_type: str

    def begin(self) -> bytes:
        """Bytes before the first row (a header, an opening bracket)."""
        ...

    def write(self, rows: Sequence[Row]) -> bytes:
        """The encoding of one batch of rows."""
        ...

    def finish(self) -> Iterator[bytes]:
        """Whatever remains after the last row; XLSX yields its whole file here, in chunks."""
        ...


class WriterFactory(Protocol):
    def __call__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> Writer: ...


class WriterClass(WriterFactory, Protocol):
    """A writer class as ``formats.WRITERS`` holds it: what its files are called before any is
    made (the upload's content type, the export's file name), and the factory of its writers."""

    @property
    def extension(self) -> str: ...

    @property
    def content_type(self) -> str: ...
