"""A zip archive written part by part, its last (large) member deflated as it comes in.

An XLSX file is a zip archive whose sheet is known only once the last row is in. ``ZipBuilder``
deflates the sheet as it is written (``zlib``, raw deflate) into a temporary file, keeping its
CRC-32 and sizes; ``chunks()`` then gives the archive: the small parts (deflated whole), the
sheet's header with its now known sizes, the deflated sheet read back from the file, and the
central directory. No data descriptors are needed, and Zip64 records are written only when a size
or offset passes 4 GiB, so small files stay plain zip (some spreadsheet programs refuse Zip64 in
a file that does not need it).

The deflating runs in a thread of its own (zlib and crc32 release the GIL), so the next batch is
rendered while the last one is compressed: ``write`` waits for the batch before the last, so at
most two batches of XML are held. Memory: those two batches and one read buffer.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

ZIP64_LIMIT = 0xFFFFFFFF  # from this size or offset on, Zip64 records (a test lowers it)
_SENTINEL = 0xFFFFFFFF  # what a 32-bit field holds when the value is in a Zip64 record
_DOS_TIME, _DOS_DATE = 0, (1980 - 1980) << 9 | 1 << 5 | 1  # 1980-01-01 00:00: the same rows, the same bytes


class ZipBuilder:
    """``add(name, data)`` for small parts, then ``stream`` for the last member, then ``chunks``."""

    def __init__(self, spool: BinaryIO, level: int) -> None:
        self._parts: list[tuple[bytes, bytes, int, int]] = []  # name, deflated data, crc, size
        self._spool = spool
        self._level = level
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0
        self._name = b""
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def add(self, name: str, data: bytes) -> None:
        deflate = zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._parts.append((name.encode(), deflate.compress(data) + deflate.flush(), zlib.crc32(data), len(data)))

    def stream(self, name: str) -> None:
        """The member the next ``write`` calls fill."""
        self._name = name.encode()

    def write(self, data: bytes) -> None:
        """Deflate ``data`` into the spool, in the background; an error shows at the next call."""
        if not data:
            return
        self._settle()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataport-deflate")
        self._pending = self._pool.submit(self._deflate_into_spool, data)

    def _deflate_into_spool(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._spool.write(self._deflate.compress(data))

    def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Stop the thread (a pending batch is dropped); the caller closes the spool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """The whole archive, in pieces of exactly ``chunk_bytes`` but the last."""
        self._settle()
        self.close()
        self._spool.write(self._deflate.flush())
        deflated = self._spool.tell()
        self._spool.seek(0)
        buffer = bytearray()  # the next chunk, while pieces smaller than one come in
        offset = 0
        central: list[bytes] = []
        for name, data, crc, size in self._parts:
            header, entry = _headers(name, crc, len(data), size, offset)
            central.append(entry)
            offset += len(header) + len(data)
            buffer += header + data
        header, entry = _headers(self._name, self._crc, deflated, self._size, offset)
        central.append(entry)
        offset += len(header) + deflated
        buffer += header
        while len(buffer) >= chunk_bytes:
            yield bytes(buffer[:chunk_bytes])
            del buffer[:chunk_bytes]
        # The sheet: read so that every chunk is whole, and without a copy once the buffer is empty.
        if buffer:  # the first chunk: the headers so far, then the start of the sheet
            buffer += self._spool.read(chunk_bytes - len(buffer))
            if len(buffer) == chunk_bytes:
                yield bytes(buffer)
                buffer.clear()
        if not buffer:
            while block := self._spool.read(chunk_bytes):
                if len(block) < chunk_bytes:  # the last of the sheet
                    buffer += block
                    break
                yield block
        buffer += _end(central, offset)
        while buffer:
            yield bytes(buffer[:chunk_bytes])
            del buffer[:chunk_bytes]


def _headers(name: bytes, crc: int, compressed: int, size: int, offset: int) -> tuple[bytes, bytes]:
    """A member's local header and its central directory entry (deflate, Zip64 where needed)."""
    big = compressed >= ZIP64_LIMIT or size >= ZIP64_LIMIT
    version = 45 if big or offset >= ZIP64_LIMIT else 20
    local_extra = struct.pack("<HHQQ", 1, 16, size, compressed) if big else b""
    sizes = (_SENTINEL, _SENTINEL) if big else (compressed, size)
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, version, 0, 8, _DOS_TIME, _DOS_DATE, crc, *sizes, len(name), len(local_extra)
    )
    fields = ([size, compressed] if big else []) + ([offset] if offset >= ZIP64_LIMIT else [])
    extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
    entry = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        version,
        version,
        0,
        8,
        _DOS_TIME,
        _DOS_DATE,
        crc,
        *sizes,
        len(name),
        len(extra),
        0,
        0,
        0,
        0,
        _SENTINEL if offset >= ZIP64_LIMIT else offset,
    )
    return local + name + local_extra, entry + name + extra


def _end(central: list[bytes], offset: int) -> bytes:
    """The central directory and its end records (Zip64 ones when it starts past 4 GiB)."""
    directory = b"".join(central)
    count = len(central)
    tail = b""
    if offset >= ZIP64_LIMIT:
        record = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), offset)
        locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(directory), 1)
        tail = record + locator
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), _SENTINEL if tail else offset, 0)
    return directory + tail + end
