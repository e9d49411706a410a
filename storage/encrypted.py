"""``EncryptedStorage``: any ``Storage`` with its files encrypted before they are stored.

The one place encryption is applied: the storage factory wraps the backend in it when
``DATAPORT_ENCRYPTION`` is ``aes256-gcm``, and exports, error reports, local uploads and sealed
import copies are encrypted without their callers knowing. Sizes and SHA-256s it reports (writers,
``verify``, ``size_of``, ``seal``) are those of the plaintext, which is what users download.

Each file ``K`` is stored in the format of ``storage/encryption.py`` under ``K``, and its wrapped
data key in a small JSON object ``keys/K`` (the *key file*: format version, the file's header, the
wrapping scheme, key id and wrapped key). Keeping the wrapped key outside the file lets
``rotate`` re-wrap every data key by rewriting key files only, on S3 as on disk, never a body.
The key file is written before its file becomes visible and removed after it; a file without a
key file is one stored in clear (written before encryption was on, or an S3 upload from the
browser) and is read as it is.

S3 uploads arrive from the browser in clear (a presigned POST or PUT); ``seal`` encrypts them into
the sealed copy the import reads, and the import's start then deletes the clear upload.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from storage.base import ObjectWriter, ReadStream, Storage, StorageError, StoredObject, UploadTarget
from storage.encryption import (
    CHUNK_SIZE,
    READ,
    DecryptingStream,
    Decryptor,
    Encryptor,
    Header,
    last_record,
    plaintext_size,
    read_exactly,
    record_span,
)
from storage.keys import Keyring, KeyUnavailable, WrappedKey

KEY_FILES = "keys/"
KEY_FILE_VERSION = 1
BATCH = 1024 * 1024  # plaintext gathered before it is hashed and encrypted (in a thread)
MAX_KEY_FILE = 64 * 1024


class MissingFile(StorageError):
    """The file is not in storage (its key file may be)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key!r} does not exist", transient=False)


def key_file(key: str) -> str:
    return KEY_FILES + key


class EncryptingWriter:
    """Plaintext in; header and records to the backend's writer. The plaintext's size and SHA-256
    are what ``complete`` returns."""

    def __init__(
        self,
        storage: EncryptedStorage,
        key: str,
        inner: ObjectWriter,
        header: Header,
        data_key: bytes,
        wrapped: WrappedKey,
    ) -> None:
        self._storage = storage
        self.key = key
        self._inner = inner
        self._header = header
        self._wrapped = wrapped
        self._encryptor = Encryptor(data_key, header)
        self._buffer = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) >= BATCH:
            await self._flush()

    def _seal(self, data: bytes) -> bytes:
        self._sha.update(data)
        self._size += len(data)
        return self._encryptor.update(data)

    async def _flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            await self._inner.write(await asyncio.to_thread(self._seal, data))

    async def complete(self) -> StoredObject:
        try:
            await self._flush()
            await self._inner.write(self._encryptor.finish())
            # The key file first: whenever the body is visible, so is its key.
            await self._storage._put_key_file(self.key, self._header, self._wrapped)
        except BaseException:
            await asyncio.shield(self._inner.abort())
            raise
        try:
            await self._inner.complete()
        except BaseException:
            await asyncio.shield(self._storage._drop_key_file(self.key))
            raise
        return StoredObject(self.key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        self._buffer = bytearray()
        await self._inner.abort()


@dataclass
class Plaintext:
    """An encrypted file opened for download: its plaintext size, an entity tag, and streams of
    it from any offset, under the data key unwrapped once."""

    storage: EncryptedStorage
    key: str
    header: Header
    data_key: bytes = field(repr=False)
    stored_size: int

    @property
    def size(self) -> int:
        return plaintext_size(self.header, self.stored_size)

    @property
    def etag(self) -> str:
        return '"' + self.header.prefix.hex() + '"'  # random per stored file

    async def check_end(self) -> None:
        """Authenticate the final record: a file cut off or extended is refused before a byte is
        served (an altered byte further in is refused when its record is reached)."""
        counter, offset, length = last_record(self.header, self.stored_size)
        raw = await self.storage.inner.open_stream(self.key, offset)

        def _check() -> None:
            try:
                Decryptor(self.data_key, self.header, counter).open_final(read_exactly(raw, length))
            finally:
                raw.close()

        await asyncio.to_thread(_check)

    async def open(self, start: int = 0) -> ReadStream:
        if start and start >= self.size:
            return io.BytesIO(b"")  # at or past the end: there may be no record to start from
        counter, offset, skip = record_span(self.header, start)
        raw = await self.storage.inner.open_stream(self.key, offset if start else 0)
        stream = DecryptingStream(raw, self.header, self.data_key, counter, skip, with_header=not start)
        return io.BufferedReader(stream, READ)


@dataclass
class Rotation:
    """What ``rotate`` did: files re-wrapped, already under the current key, and the failures."""

    rewrapped: int = 0
    current: int = 0
    failed: list[str] = field(default_factory=list)


class EncryptedStorage:
    """Wraps ``inner``; with ``encrypt`` False it writes in clear but still reads encrypted files
    (encryption turned off while encrypted files remain)."""

    def __init__(self, inner: Storage, keyring: Keyring, *, encrypt: bool = True, chunk_size: int = CHUNK_SIZE) -> None:
        self.inner = inner
        self.name = inner.name
        self.keyring = keyring
        self.encrypt = encrypt
        self.chunk_size = chunk_size

    # -- key files ---------------------------------------------------------------------------------

    async def _put_key_file(self, key: str, header: Header, wrapped: WrappedKey) -> None:
        body = {"version": KEY_FILE_VERSION, "header": header.pack().hex(), **wrapped.to_json()}
        writer = await self.inner.open_writer(key_file(key), "application/json")
        try:
            await writer.write(json.dumps(body, sort_keys=True).encode())
        except BaseException:
            await asyncio.shield(writer.abort())
            raise
        await writer.complete()

    async def _drop_key_file(self, key: str) -> None:
        await self.inner.delete(key_file(key))

    async def _key_file(self, key: str) -> tuple[Header, WrappedKey] | None:
        """The file's header and wrapped key; None when it has no key file (stored in clear)."""
        name = key_file(key)
        size = await self.inner.size_of(name)
        if size is None:
            return None
        if size > MAX_KEY_FILE:
            raise KeyUnavailable(f"the key file of {key!r} is {size:,} bytes, not a key file")
        stream = await self.inner.open_stream(name)

        def _read() -> bytes:
            try:
                return read_exactly(stream, MAX_KEY_FILE)
            finally:
                stream.close()

        try:
            body = json.loads(await asyncio.to_thread(_read))
            if body.get("version") != KEY_FILE_VERSION:
                raise ValueError(f"key file version {body.get('version')!r}")
            header = Header.unpack(bytes.fromhex(body["header"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyUnavailable(f"the key file of {key!r} is malformed ({e})") from None
        return header, WrappedKey.from_json(body)

    async def open_plaintext(self, key: str) -> Plaintext | None:
        """The encrypted file ``key`` opened for reading (its data key unwrapped); None when it is
        stored in clear. ``MissingFile`` when it is gone."""
        found = await self._key_file(key)
        if found is None:
            return None
        header, wrapped = found
        stored_size = await self.inner.size_of(key)
        if stored_size is None:
            raise MissingFile(key)
        data_key = await asyncio.to_thread(self.keyring.unwrap, wrapped, header.pack())
        return Plaintext(self, key, header, data_key, stored_size)

    # -- the Storage interface ---------------------------------------------------------------------

    async def open_writer(self, key: str, content_type: str) -> ObjectWriter:
        inner = await self.inner.open_writer(key, content_type)
        if not self.encrypt:
            return inner
        header = Header.new(self.chunk_size)
        try:
            data_key, wrapped = await asyncio.to_thread(self.keyring.new, header.pack())
            await inner.write(header.pack())
        except BaseException:
            await asyncio.shield(inner.abort())
            raise
        return EncryptingWriter(self, key, inner, header, data_key, wrapped)

    async def discard_incomplete(self, key: str) -> None:
        await self.inner.discard_incomplete(key)

    async def sweep_incomplete(self, older_than: dt.datetime) -> int:
        return await self.inner.sweep_incomplete(older_than)

    async def verify(self, key: str) -> StoredObject | None:
        """The plaintext's size and SHA-256, every record authenticated on the way."""
        try:
            plain = await self.open_plaintext(key)
        except MissingFile:
            return None
        if plain is None:
            return await self.inner.verify(key)
        stream = await plain.open()

        def _digest() -> StoredObject:
            sha, size = hashlib.sha256(), 0
            try:
                while chunk := stream.read(READ):
                    sha.update(chunk)
                    size += len(chunk)
            finally:
                stream.close()
            return StoredObject(key, size, sha.hexdigest())

        return await asyncio.to_thread(_digest)

    async def download_url(self, key: str, *, task_id: str, filename: str, expires_at: dt.datetime) -> str:
        return await self.inner.download_url(key, task_id=task_id, filename=filename, expires_at=expires_at)

    async def upload_target(
        self, key: str, *, task_id: str, content_type: str, max_bytes: int, expires_at: dt.datetime
    ) -> UploadTarget:
        return await self.inner.upload_target(
            key, task_id=task_id, content_type=content_type, max_bytes=max_bytes, expires_at=expires_at
        )

    async def size_of(self, key: str) -> int | None:
        """The plaintext size (computed from the stored size, nothing decrypted)."""
        found = await self._key_file(key)
        size = await self.inner.size_of(key)
        if found is None or size is None:
            return size
        return plaintext_size(found[0], size)

    async def seal(self, key: str, sealed_key: str) -> int | None:
        """An encrypted upload (local, encrypted as it arrived) is sealed by the backend with a
        copy of its key file; one in clear (an S3 upload from the browser) is encrypted into the
        sealed copy, streaming. The plaintext size, or None when nothing was uploaded."""
        found = await self._key_file(key)
        if found is not None:
            await self._put_key_file(sealed_key, *found)
            size = await self.inner.seal(key, sealed_key)
            if size is None:
                await self._drop_key_file(sealed_key)
                return None
            return plaintext_size(found[0], size)
        if not self.encrypt:
            return await self.inner.seal(key, sealed_key)
        if await self.inner.size_of(key) is None:
            return None
        source = await self.inner.open_stream(key)
        try:
            writer = await self.open_writer(sealed_key, "application/octet-stream")
            try:
                while chunk := await asyncio.to_thread(source.read, READ):
                    await writer.write(chunk)
                stored = await writer.complete()
            except BaseException:
                await asyncio.shield(writer.abort())
                raise
        finally:
            await asyncio.to_thread(source.close)
        return stored.size

    async def open_stream(self, key: str, start: int = 0) -> ReadStream:
        try:
            plain = await self.open_plaintext(key)
        except MissingFile:
            raise StorageError(f"{key!r} does not exist", transient=False) from None
        if plain is None:
            return await self.inner.open_stream(key, start)
        return await plain.open(start)

    async def list_keys(self, prefix: str) -> list[str]:
        return [k for k in await self.inner.list_keys(prefix) if not k.startswith(KEY_FILES)]

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
        await self._drop_key_file(key)  # after the body: a body never outlives its key

    async def check(self) -> None:
        await self.inner.check()

    async def receive(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        keep: Callable[[], Awaitable[str | None]] | None = None,
    ) -> StoredObject:
        """The local backend's upload (``LocalStorage.receive``), encrypted as it arrives: the
        clear upload never touches the disk."""
        from storage.local import receive_into

        writer = await self.open_writer(key, "application/octet-stream")
        return await receive_into(writer, key, chunks, max_bytes=max_bytes, keep=keep)

    # -- rotation ----------------------------------------------------------------------------------

    async def rotate(self) -> Rotation:
        """Re-wrap every stored data key under the current key (``Keyring.current``), rewriting
        key files only. A file that cannot be re-wrapped (its KEK is gone) is listed in
        ``failed``; the old KEK may be dropped once a rotation reports no failure."""
        report = Rotation()
        for name in await self.inner.list_keys(KEY_FILES):
            key = name[len(KEY_FILES) :]
            try:
                found = await self._key_file(key)
                if found is None or await self.inner.size_of(key) is None:
                    # Removed meanwhile, or its file is still being written (or never was): a key
                    # file is never removed here, which could race with its writer.
                    continue
                header, wrapped = found
                rewrapped = await asyncio.to_thread(self.keyring.rewrap, wrapped, header.pack())
                if rewrapped is None:
                    report.current += 1
                    continue
                await self._put_key_file(key, header, rewrapped)
                report.rewrapped += 1
            except StorageError as e:
                report.failed.append(f"{key}: {e}")
        return report
