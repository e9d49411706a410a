"""The storage seam: where finished files live, and how clients reach them.

A file is written as a stream through an ``ObjectWriter`` (never whole in memory, never a second
pass), verified by reading it back before a task may succeed, and reached through short-lived
signed URLs issued afresh on every read.

Imports go the other way: the browser uploads straight to storage through an ``UploadTarget``
(a presigned S3 POST or PUT, or the api's signed ``PUT /uploads/{task_id}`` for the local
backend), and the worker reads the file back as a ``ReadStream``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class StorageError(Exception):
    """Storage refused or failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = True):
        super().__init__(message)
        self.transient = transient


MiB = 1024 * 1024


@dataclass(frozen=True)
class UploadTarget:
    """How a browser uploads one import file. ``method`` "PUT": send the file as the body of a PUT
    to ``url`` with exactly ``headers`` (they are signed). ``method`` "POST": send a
    multipart/form-data POST to ``url`` with ``fields`` first, in order, then the file as the last
    field, named ``file``; ``headers`` is then empty (the browser sets the multipart Content-Type).
    """

    url: str
    method: str
    headers: dict[str, str]
    fields: dict[str, str] | None
    expires_at: dt.datetime


def describe_bytes(n: int) -> str:
    """``1,000 bytes``, or ``1 GiB``-scale sizes as ``1,024 MiB (1,073,741,824 bytes)``."""
    if n < MiB:
        return f"{n:,} bytes"
    mib = f"{n / MiB:,.1f}".removesuffix(".0")
    return f"{mib} MiB ({n:,} bytes)"


class UploadTooLarge(StorageError):
    """An upload had more bytes than allowed. Never transient: the same file is refused again."""

    def __init__(self, max_bytes: int, *, key: str | None = None, size: int | None = None) -> None:
        where = f" for {key!r}" if key else ""
        larger = f"is {size:,} bytes, more" if size is not None else "is larger"
        super().__init__(
            f"the uploaded file{where} {larger} than the limit of {describe_bytes(max_bytes)}", transient=False
        )
        self.max_bytes = max_bytes
        self.size = size


class UploadRefused(StorageError):
    """An upload arrived whole but may no longer be kept (its import has moved on). Not transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class ReadStream(Protocol):
    """A stored file opened for reading: a synchronous, binary, forward-only file object, meant for
    a worker thread (the file parsers are synchronous). Not seekable on S3: a format that needs
    seeking (XLSX, a zip) must be copied to a local temporary file first."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ObjectWriter(Protocol):
    async def write(self, chunk: bytes) -> None: ...

    async def complete(self) -> StoredObject:
        """Make the object visible under its key; returns its size and SHA-256 as written."""
        ...

    async def abort(self) -> None:
        """Drop everything written so far; nothing becomes visible under the key."""
        ...


class Storage(Protocol):
    name: str

    async def open_writer(self, key: str, content_type: str) -> ObjectWriter: ...

    async def discard_incomplete(self, key: str) -> None:
        """Remove partial writes to ``key`` left by an earlier attempt (a killed worker)."""
        ...

    async def sweep_incomplete(self, older_than: dt.datetime) -> int:
        """Remove every partial write begun before ``older_than`` (open S3 multipart uploads,
        local ``.partial-`` files): those a worker could not clean up because it was killed, or
        because the storage was down when it gave up. The number removed."""
        ...

    async def verify(self, key: str) -> StoredObject | None:
        """Read the stored object back: its size and SHA-256, or None when it is missing."""
        ...

    async def download_url(self, key: str, *, task_id: str, filename: str, expires_at: dt.datetime) -> str: ...

    async def upload_target(
        self, key: str, *, task_id: str, content_type: str, max_bytes: int, expires_at: dt.datetime
    ) -> UploadTarget:
        """Where and how the browser uploads the file stored under ``key``, valid until
        ``expires_at``. Only a presigned S3 POST caps the size (``max_bytes``) at upload time; the
        others cannot, so whoever starts the import checks ``size_of`` against the limit."""
        ...

    async def size_of(self, key: str) -> int | None:
        """The stored object's size in bytes, or None when it is missing."""
        ...

    async def seal(self, key: str, sealed_key: str) -> int | None:
        """Keep the object now stored under ``key`` also under ``sealed_key``, as it is at this moment:
        a later upload to ``key`` does not change it. Its size in bytes, or None when ``key`` is
        missing. An import is started from its sealed copy, so the file the worker reads is the
        one whose size was checked, whatever upload finishes after the start."""
        ...

    async def open_stream(self, key: str, start: int = 0) -> ReadStream:
        """The stored object from byte ``start`` on as a ``ReadStream``; ``StorageError`` (not
        transient) when missing."""
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys of the stored objects under ``prefix`` (a folder, ending in ``/``)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def check(self) -> None:
        """Raise ``StorageError`` when the backend is not usable (readiness)."""
        ...
