"""The encrypted file format: chunked AES-256-GCM under one random data key per file.

A stored file is a fixed header followed by records, one per chunk of plaintext::

    header  = magic "DPENC" | version (1 byte, 1) | chunk size (4 bytes, big-endian)
              | nonce prefix (8 random bytes)                                  18 bytes
    record  = AES-256-GCM(data key, nonce = prefix | counter (4 bytes, big-endian),
                          plaintext chunk, aad = header | final flag (1 byte))  chunk + 16 bytes

Every chunk but the last holds exactly ``chunk size`` plaintext bytes; the last holds 1 to
``chunk size`` (0 only for an empty file) and is the only one whose final flag is 1. So each
record is bound to its file (the header, with its random prefix, is in the associated data), to
its place (the counter is in the nonce) and to being last or not (the flag): a flipped byte, a
record moved or swapped, a file cut at any byte or at a record boundary, records appended or a
header altered all fail authentication. This is the STREAM construction (Hoang, Reyhanitabar,
Rogaway and Vizár, 2015) with GCM.

The data key itself is not in the file: it is wrapped by a key-encryption key and kept beside it
(``storage/keys.py``, ``storage/encrypted.py``), so keys can be rotated without touching files.

``Encryptor`` and ``Decryptor`` are incremental and pure (no I/O): memory is bounded by one chunk
plus whatever the caller hands them at once; ``DecryptingStream`` turns a stored file's stream into
a plaintext one. ``plaintext_size`` and ``record_span`` turn sizes and
plaintext offsets into ciphertext positions, for sizes without reading and ranged reads.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.base import ReadStream, StorageError

MAGIC = b"DPENC"
VERSION = 1
CHUNK_SIZE = 64 * 1024
TAG = 16
KEY_BYTES = 32
PREFIX_BYTES = 8
_HEADER = struct.Struct(">5sBI8s")
HEADER_SIZE = _HEADER.size  # 18
MAX_CHUNKS = 2**32  # the counter's range: 256 TiB at 64 KiB chunks
MIN_CHUNK, MAX_CHUNK = 1024, 16 * 1024 * 1024
READ = 1024 * 1024  # ciphertext read at once by DecryptingStream


class IntegrityError(StorageError):
    """An encrypted file failed authentication (altered, cut off, reordered) or is not in this
    format. Never transient: reading it again gives the same answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class Header:
    chunk_size: int
    prefix: bytes
    version: int = VERSION

    @classmethod
    def new(cls, chunk_size: int = CHUNK_SIZE) -> Header:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
        return cls(chunk_size, os.urandom(PREFIX_BYTES))

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.chunk_size, self.prefix)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"encrypted file: header cut off ({len(data)} of {HEADER_SIZE} bytes)")
        magic, version, chunk_size, prefix = _HEADER.unpack(data[:HEADER_SIZE])
        if magic != MAGIC:
            raise IntegrityError("encrypted file: not in Dataport's encrypted format (bad magic)")
        if version != VERSION:
            raise IntegrityError(f"encrypted file: format version {version} is not known (expected {VERSION})")
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise IntegrityError(f"encrypted file: chunk size {chunk_size} is out of range")
        return cls(chunk_size, prefix, version)

    @property
    def record_size(self) -> int:
        return self.chunk_size + TAG


def is_encrypted(first_bytes: bytes) -> bool:
    """Whether a stored file starts as this format does."""
    return first_bytes[: len(MAGIC)] == MAGIC


def _records(header: Header, body: int) -> int:
    """How many records a body of ``body`` ciphertext bytes holds (at least one, the final)."""
    if body < TAG:
        raise IntegrityError(f"encrypted file: cut off ({body} bytes after the header, at least {TAG} expected)")
    return max(1, -(-body // header.record_size))


def plaintext_size(header: Header, stored_size: int) -> int:
    """The plaintext size of a stored file of ``stored_size`` bytes (header included)."""
    body = stored_size - HEADER_SIZE
    return body - TAG * _records(header, body)


def last_record(header: Header, stored_size: int) -> tuple[int, int, int]:
    """(counter, offset, length) of the final record: reading it checks the file's end."""
    body = stored_size - HEADER_SIZE
    n = _records(header, body)
    offset = HEADER_SIZE + (n - 1) * header.record_size
    return n - 1, offset, stored_size - offset


def record_span(header: Header, plaintext_offset: int) -> tuple[int, int, int]:
    """Where reading from ``plaintext_offset`` starts: (counter of its chunk, that record's
    ciphertext offset, plaintext bytes of the chunk to skip)."""
    counter, skip = divmod(plaintext_offset, header.chunk_size)
    return counter, HEADER_SIZE + counter * header.record_size, skip


class _Chunks:
    def __init__(self, key: bytes, header: Header, counter: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        self._aead = AESGCM(key)
        self._header = header.pack()
        self._aad = (self._header + b"\x00", self._header + b"\x01")
        self._prefix = header.prefix
        self.chunk_size = header.chunk_size
        self.counter = counter

    def _nonce(self) -> bytes:
        if self.counter >= MAX_CHUNKS:
            raise StorageError("encrypted file: more chunks than the nonce counter allows", transient=False)
        nonce = self._prefix + self.counter.to_bytes(4, "big")
        self.counter += 1
        return nonce


class Encryptor(_Chunks):
    """Plaintext in, records out. ``update`` keeps back up to one chunk (the last one must be
    flagged, and only ``finish`` knows which is last); ``finish`` returns the final record."""

    def __init__(self, key: bytes, header: Header) -> None:
        super().__init__(key, header, 0)
        self._pending = bytearray()
        self._finished = False

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        pending = self._pending
        pending += data
        size = self.chunk_size
        full = (len(pending) - 1) // size if pending else 0  # strictly more than a chunk stays behind
        if full <= 0:
            return b""
        view = memoryview(pending)
        out = [self._aead.encrypt(self._nonce(), view[i * size : (i + 1) * size], self._aad[0]) for i in range(full)]
        view.release()
        del pending[: full * size]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._finished:
            raise StorageError("encrypted file: finished twice", transient=False)
        self._finished = True
        record = self._aead.encrypt(self._nonce(), bytes(self._pending), self._aad[1])
        self._pending = bytearray()
        return record


class Decryptor(_Chunks):
    """Records in (from the one numbered ``counter`` on), plaintext out. ``update`` keeps back
    the last whole record until more follows; ``finish`` opens it as the final one. Any failure
    raises ``IntegrityError`` and nothing of the failed record is returned."""

    def __init__(self, key: bytes, header: Header, counter: int = 0) -> None:
        super().__init__(key, header, counter)
        self._pending = bytearray()
        self._record = header.record_size

    def _open(self, record: memoryview | bytes, final: bool) -> bytes:
        counter = self.counter
        try:
            return self._aead.decrypt(self._nonce(), record, self._aad[final])
        except InvalidTag:
            where = "the final chunk" if final else f"chunk {counter}"
            raise IntegrityError(
                f"encrypted file: {where} failed authentication (the file was altered, cut off or reordered)"
            ) from None

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        pending = self._pending
        pending += data
        size = self._record
        full = (len(pending) - 1) // size if pending else 0
        if full <= 0:
            return b""
        view = memoryview(pending)
        try:
            out = [self._open(view[i * size : (i + 1) * size], False) for i in range(full)]
        finally:
            view.release()
        del pending[: full * size]
        return b"".join(out)

    def finish(self) -> bytes:
        if len(self._pending) < TAG:
            raise IntegrityError("encrypted file: cut off (its final chunk is missing)")
        plain = self._open(bytes(self._pending), True)
        self._pending = bytearray()
        return plain

    def open_final(self, record: bytes) -> bytes:
        """Open ``record`` as the final one at this decryptor's counter (checks a file's end)."""
        return self._open(record, True)


class DecryptingStream(io.RawIOBase):
    """A stored encrypted file as a plaintext ``ReadStream`` (for a worker thread): records from
    ``raw``, opened one by one, ``skip`` plaintext bytes of the first left out. A failed record
    raises ``IntegrityError``: nothing of it is returned."""

    def __init__(
        self, raw: ReadStream, header: Header, data_key: bytes, counter: int, skip: int, *, with_header: bool
    ) -> None:
        super().__init__()
        self._raw = raw
        self._header = header
        self._decryptor = Decryptor(data_key, header, counter)
        self._skip = skip
        self._with_header = with_header
        self._out = b""
        self._at = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        if self._with_header:
            self._with_header = False
            if read_exactly(self._raw, HEADER_SIZE) != self._header.pack():
                raise IntegrityError("encrypted file: its header does not match its key file")
        while self._at >= len(self._out) and not self._eof:
            data = self._raw.read(READ)
            if data:
                self._out = self._decryptor.update(data)
            else:
                self._out, self._eof = self._decryptor.finish(), True
            self._at = 0
            if self._skip:
                dropped = min(self._skip, len(self._out))
                self._at, self._skip = dropped, self._skip - dropped

    def readinto(self, buffer: Any) -> int:
        if self._at >= len(self._out):
            self._fill()
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def read_exactly(stream: ReadStream, n: int) -> bytes:
    data = b""
    while len(data) < n and (more := stream.read(n - len(data))):
        data += more
    return data


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)
