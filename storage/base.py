"""The storage seam: where finished files live, and how clients reach them.

A file is written as a stream through an ``ObjectWriter`` (never whole in memory, never a second
pass), verified by reading it back before a task may succeed, and reached through short-lived
signed URLs issued afresh on every read.
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

    async def verify(self, key: str) -> StoredObject | None:
        """Read the stored object back: its size and SHA-256, or None when it is missing."""
        ...

    async def download_url(
        self, key: str, *, task_id: str, filename: str, expires_at: dt.datetime
    ) -> str: ...

    async def delete(self, key: str) -> None: ...

    async def check(self) -> None:
        """Raise ``StorageError`` when the backend is not usable (readiness)."""
        ...
