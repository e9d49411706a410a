"""The local-directory backend (the default): files under one root, reached through signed URLs
that the api serves (``GET /files/{task_id}``, ``PUT /uploads/{task_id}``).

A file is written to ``<path>.partial-<random>`` and renamed into place only when complete, after
an fsync, so a reader never sees half a file and a killed writer leaves only a ``.partial-`` file,
which ``discard_incomplete`` removes. File I/O runs in worker threads, in batches, so the event
loop is never blocked for long.

Import files arrive through the api's signed ``PUT /uploads/{task_id}``, whose body ``receive``
streams to disk the same way (partial file, fsync, atomic rename), refusing it past the limit, and
renaming it into place only if its import still waits for it. An import starts from a hard link of
the upload (``seal``), so an upload that lands later cannot change the file the worker reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from storage.base import ObjectWriter, StorageError, StoredObject, UploadRefused, UploadTarget, UploadTooLarge
from storage.signing import signed_path

if TYPE_CHECKING:
    from dataport.settings import Settings

PARTIAL = ".partial-"
WRITE_BATCH = 1024 * 1024  # bytes gathered before one write (and hash update) in a thread
# A large file is synced to disk as it is written, this much at a time, in the writing thread:
# the fsync before the rename then waits for the last part only (a 193 MB export's final fsync
# took 0.2 s here, after the last row, on the export's critical path).
SYNC_EVERY = 64 * 1024 * 1024
READ_CHUNK = 1024 * 1024
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _os_error(action: str, key: str, e: OSError) -> StorageError:
    # A full disk or an I/O hiccup may pass; a permission problem will not.
    return StorageError(f"local storage: {action} {key!r} failed: {e}", transient=not isinstance(e, PermissionError))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories; the rename is still atomic
    finally:
        os.close(fd)


async def receive_into(
    writer: ObjectWriter,
    key: str,
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    keep: Callable[[], Awaitable[str | None]] | None = None,
) -> StoredObject:
    """``LocalStorage.receive``'s body, for any writer (``storage/encrypted.py`` passes one that
    encrypts as the upload arrives)."""
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                # Stop reading here: the rest of an oversized body is never written.
                raise UploadTooLarge(max_bytes, key=key)
            await writer.write(chunk)
        if keep is not None and (reason := await keep()) is not None:
            raise UploadRefused(reason)
        return await writer.complete()
    except BaseException:
        # Also on cancellation (the client went away): the partial file must not stay.
        await asyncio.shield(writer.abort())
        raise


class LocalWriter:
    """Streams into ``<path>.partial-<random>``, hashing and counting as it goes."""

    def __init__(self, key: str, path: Path, file: BinaryIO, partial: Path) -> None:
        self.key = key
        self.path = path
        self.partial = partial
        self._file: BinaryIO | None = file
        self._buffer = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0
        self._unsynced = 0
        self._state = "open"
        self._renamed = False
        self._op: asyncio.Future[None] | None = None  # the file operation running in a thread

    async def _in_thread(self, fn: Callable[..., None], *args: object) -> None:
        # Shielded: a cancelled caller does not leave the thread racing with abort(), which waits
        # for it before closing and removing the file.
        self._op = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        await asyncio.shield(self._op)

    async def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise StorageError(f"local storage: write to {self.key!r} after it was {self._state}", transient=False)
        if not chunk:
            return
        self._buffer += chunk
        if len(self._buffer) >= WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        """Hand the gathered bytes to a thread once the previous write is done, and go on: one
        write runs while the export reads on. Its error is raised by the next write or by
        ``complete``."""
        if not self._buffer:
            return
        await self._written()
        data, self._buffer = self._buffer, bytearray()
        self._op = asyncio.ensure_future(asyncio.to_thread(self._write_sync, data))

    async def _written(self) -> None:
        """Wait for the write in hand (shielded, as ``_in_thread``)."""
        if self._op is None:
            return
        try:
            await asyncio.shield(self._op)
        except OSError as e:
            raise _os_error("writing", self.key, e) from e

    def _write_sync(self, data: bytearray) -> None:
        assert self._file is not None
        self._sha.update(data)
        self._file.write(data)
        self._size += len(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            self._file.flush()
            _datasync(self._file.fileno())
            self._unsynced = 0

    async def complete(self) -> StoredObject:
        if self._state != "open":
            raise StorageError(f"local storage: complete {self.key!r} after it was {self._state}", transient=False)
        self._state = "completing"
        try:
            await self._flush()
            await self._written()
            await self._in_thread(self._complete_sync)
        except BaseException as e:
            await asyncio.shield(self._abort())
            if isinstance(e, OSError):
                raise _os_error("completing", self.key, e) from e
            raise
        self._state = "completed"
        return StoredObject(self.key, self._size, self._sha.hexdigest())

    def _complete_sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        self._renamed = True
        _fsync_dir(self.path.parent)

    async def abort(self) -> None:
        if self._state in ("completed", "aborted"):
            return
        await self._abort()

    async def _abort(self) -> None:
        self._state = "aborted"
        self._buffer = bytearray()
        if self._op is not None:
            with contextlib.suppress(Exception):
                await self._op
        await asyncio.to_thread(self._abort_sync)

    def _abort_sync(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)
        if self._renamed:  # complete() was cancelled after the rename: the caller saw no success
            self.path.unlink(missing_ok=True)


class LocalReader:
    """An open stored file: its ``size``, then its bytes in chunks (``async for``). Closes itself
    at the end; call ``aclose()`` (or use ``async with``) when stopping early."""

    def __init__(self, file: BinaryIO, size: int, chunk_size: int = READ_CHUNK) -> None:
        self._file: BinaryIO | None = file
        self.size = size
        self.chunk_size = chunk_size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._file is None:
            raise StopAsyncIteration
        chunk = await asyncio.to_thread(self._file.read, self.chunk_size)
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            await asyncio.to_thread(file.close)

    async def __aenter__(self) -> LocalReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalStorage:
    name = "local"

    def __init__(self, root: Path, public_url: str, secret: str) -> None:
        self.root = Path(root).absolute()
        self.public_url = public_url.rstrip("/")
        self.secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        return cls(settings.resolved_files_dir, settings.public_url, settings.signing_secret)

    def path_for(self, key: str) -> Path:
        """The file of ``key`` under the root. Refuses (``StorageError``, not transient) keys that
        are absolute, contain ``..``, ``.`` or empty segments, backslashes or NUL, name a
        ``.partial-`` file, or lead out of the root through a symlink."""
        if not isinstance(key, str) or not key:
            raise StorageError(f"local storage: invalid key {key!r}", transient=False)
        parts = key.split("/")
        if (
            key.startswith("/")
            or "\\" in key
            or "\x00" in key
            or any(part in ("", ".", "..") for part in parts)
            or PARTIAL in parts[-1]
        ):
            raise StorageError(f"local storage: invalid key {key!r}", transient=False)
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise StorageError(f"local storage: key {key!r} leads outside the storage root", transient=False)
        return path

    async def open_writer(self, key: str, content_type: str) -> LocalWriter:
        path = self.path_for(key)

        def _open() -> tuple[BinaryIO, Path]:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}{PARTIAL}{secrets.token_hex(8)}")
            return partial.open("xb"), partial

        try:
            file, partial = await asyncio.to_thread(_open)
        except OSError as e:
            raise _os_error("opening", key, e) from e
        return LocalWriter(key, path, file, partial)

    async def discard_incomplete(self, key: str) -> None:
        path = self.path_for(key)

        def _discard() -> None:
            try:
                entries = list(path.parent.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                return
            prefix = f"{path.name}{PARTIAL}"
            for entry in entries:
                if entry.name.startswith(prefix):
                    entry.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(_discard)
        except OSError as e:
            raise _os_error("discarding partial writes of", key, e) from e

    async def sweep_incomplete(self, older_than: dt.datetime) -> int:
        cutoff = older_than.timestamp()

        def _sweep() -> int:
            swept = 0
            for folder, _, names in os.walk(self.root):
                for name in names:
                    if PARTIAL not in name:
                        continue
                    path = Path(folder, name)
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            swept += 1
            return swept

        try:
            return await asyncio.to_thread(_sweep)
        except OSError as e:
            raise _os_error("sweeping partial writes under", str(self.root), e) from e

    async def verify(self, key: str) -> StoredObject | None:
        path = self.path_for(key)

        def _verify() -> StoredObject | None:
            sha = hashlib.sha256()
            size = 0
            try:
                with path.open("rb") as f:
                    while chunk := f.read(READ_CHUNK):
                        sha.update(chunk)
                        size += len(chunk)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            return StoredObject(key, size, sha.hexdigest())

        try:
            return await asyncio.to_thread(_verify)
        except OSError as e:
            raise _os_error("reading", key, e) from e

    async def open_read(self, key: str, chunk_size: int = READ_CHUNK) -> LocalReader | None:
        """The stored file as a ``LocalReader`` (size + async chunks), or None when it is missing."""
        path = self.path_for(key)

        def _open() -> LocalReader | None:
            try:
                file = path.open("rb")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            return LocalReader(file, os.fstat(file.fileno()).st_size, chunk_size)

        try:
            return await asyncio.to_thread(_open)
        except OSError as e:
            raise _os_error("opening", key, e) from e

    async def download_url(self, key: str, *, task_id: str, filename: str, expires_at: dt.datetime) -> str:
        # The route finds the file through the task; ``filename`` is its Content-Disposition there.
        self.path_for(key)
        return self.public_url + signed_path(self.secret, "GET", "/files", task_id, int(expires_at.timestamp()))

    def upload_url(self, task_id: str, expires_at: dt.datetime) -> str:
        """The signed ``PUT /uploads/{task_id}`` URL of an import file."""
        return self.public_url + signed_path(self.secret, "PUT", "/uploads", task_id, int(expires_at.timestamp()))

    async def upload_target(
        self, key: str, *, task_id: str, content_type: str, max_bytes: int, expires_at: dt.datetime
    ) -> UploadTarget:
        """A signed ``PUT /uploads/{task_id}``; the route finds ``key`` through the task and passes
        the body to ``receive``, which enforces ``max_bytes``."""
        self.path_for(key)  # a bad key is refused now, not when the file arrives
        return UploadTarget(
            url=self.upload_url(task_id, expires_at),
            method="PUT",
            headers={"Content-Type": content_type},
            fields=None,
            # The signature carries whole seconds and is valid through that second.
            expires_at=expires_at.replace(microsecond=0),
        )

    async def receive(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        keep: Callable[[], Awaitable[str | None]] | None = None,
    ) -> StoredObject:
        """Store an uploaded body under ``key`` as it arrives: never whole in memory, visible only
        when complete (a second upload replaces the first at once). More than ``max_bytes`` raises
        ``UploadTooLarge`` as soon as they arrive, and nothing of the upload is kept. ``keep`` is
        asked once the body is whole, just before it becomes visible: a reason not to keep it
        raises ``UploadRefused``, and nothing is kept either."""
        writer = await self.open_writer(key, "application/octet-stream")
        return await receive_into(writer, key, chunks, max_bytes=max_bytes, keep=keep)

    async def size_of(self, key: str) -> int | None:
        path = self.path_for(key)

        def _size() -> int | None:
            try:
                info = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            return info.st_size if stat.S_ISREG(info.st_mode) else None

        try:
            return await asyncio.to_thread(_size)
        except OSError as e:
            raise _os_error("inspecting", key, e) from e

    async def seal(self, key: str, sealed_key: str) -> int | None:
        """A hard link: the same bytes at no cost, and an upload renamed onto ``key`` later replaces
        the name ``key`` only. A file system without hard links gets a copy."""
        path, sealed = self.path_for(key), self.path_for(sealed_key)

        def _seal() -> int | None:
            sealed.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, sealed)
            except FileNotFoundError:
                return None
            except OSError:  # no hard links here: copy, through a partial file as every write
                partial = sealed.with_name(f"{sealed.name}{PARTIAL}{secrets.token_hex(8)}")
                try:
                    with path.open("rb") as src, partial.open("xb") as dst:
                        while chunk := src.read(READ_CHUNK):
                            dst.write(chunk)
                        dst.flush()
                        os.fsync(dst.fileno())
                except FileNotFoundError:
                    partial.unlink(missing_ok=True)
                    return None
                os.replace(partial, sealed)
            _fsync_dir(sealed.parent)
            return sealed.stat().st_size

        try:
            return await asyncio.to_thread(_seal)
        except OSError as e:
            raise _os_error("sealing", key, e) from e

    async def open_stream(self, key: str, start: int = 0) -> BinaryIO:
        """The stored file, opened for reading (a plain, seekable file object), at ``start``."""
        path = self.path_for(key)

        def _open() -> BinaryIO:
            file = path.open("rb")
            if start:
                file.seek(start)
            return file

        try:
            return await asyncio.to_thread(_open)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageError(f"local storage: {key!r} does not exist", transient=False) from None
        except OSError as e:
            raise _os_error("opening", key, e) from e

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys of the stored files under the folder ``prefix`` (``keys/``), partial files left out."""
        folder = self.path_for(prefix.rstrip("/"))

        def _list() -> list[str]:
            found: list[str] = []
            for parent, _, names in os.walk(folder):
                for name in names:
                    if PARTIAL not in name:
                        found.append(Path(parent, name).relative_to(self.root).as_posix())
            return sorted(found)

        try:
            return await asyncio.to_thread(_list)
        except OSError as e:
            raise _os_error("listing", prefix, e) from e

    async def delete(self, key: str) -> None:
        path = self.path_for(key)

        def _delete() -> None:
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break
                parent = parent.parent

        try:
            await asyncio.to_thread(_delete)
        except OSError as e:
            raise _os_error("deleting", key, e) from e

    async def check(self) -> None:
        def _check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".check{PARTIAL}{secrets.token_hex(8)}"
            with probe.open("xb") as f:
                f.write(b"ok")
            probe.unlink()

        try:
            await asyncio.to_thread(_check)
        except OSError as e:
            raise StorageError(f"local storage root {self.root} is not writable: {e}", transient=False) from e
