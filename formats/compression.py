"""Compression of an export's file: none, gzip or zstd, streamed chunk by chunk.

The file is compressed as it is written, so memory stays flat whatever its size: each chunk from
the format's writer goes through one compressor object, whose output (often nothing until enough
has gathered) goes on to storage or to the response. The result is an ordinary ``.gz`` (RFC 1952,
one member, no name and a zero time in the header, so the same rows give the same bytes) or
``.zst`` (one zstd frame, checksummed) file: what the user downloads is the compressed file, named
so and typed ``application/gzip`` / ``application/zstd``, never sent with a ``Content-Encoding``
that a client would undo on the way.

Levels: gzip 6 (zlib's default, what ``gzip`` writes) and zstd 3 (the ``zstd`` command's default).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import zstandard

GZIP_LEVEL = 6
ZSTD_LEVEL = 3


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclass(frozen=True)
class Compression:
    """One choice of the GraphQL ``Compression`` enum."""

    name: str
    suffix: str  # appended to the format's extension: "" or ".gz" / ".zst"
    content_type: str | None  # None: the format's own

    def compressor(self) -> Compressor | None:
        if self.name == "GZIP":
            return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip wrapper
        if self.name == "ZSTD":
            return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
        return None


COMPRESSIONS: dict[str, Compression] = {
    "NONE": Compression("NONE", "", None),
    "GZIP": Compression("GZIP", ".gz", "application/gzip"),
    "ZSTD": Compression("ZSTD", ".zst", "application/zstd"),
}


def compression_for(name: str | None) -> Compression:
    """The compression named ``name`` in any case (the streaming route's ``gzip``); None is NONE.
    ``KeyError`` for any other name."""
    return COMPRESSIONS[(name or "NONE").upper()]


async def compressed(
    chunks: AsyncGenerator[tuple[bytes, int], None], compression: Compression
) -> AsyncGenerator[tuple[bytes, int], None]:
    """``chunks`` (``sources.pipeline.encode``'s ``(bytes, rows)``) compressed: the rows counts
    pass through as they come, with whatever compressed bytes are ready by then (possibly none).
    Closing this generator closes ``chunks`` at once (the source's cursor is released then)."""
    compressor = compression.compressor()
    async with aclosing(chunks):
        if compressor is None:
            async for pair in chunks:
                yield pair
            return
        compress = compressor.compress
        async for chunk, rows in chunks:
            yield (compress(chunk) if chunk else b""), rows
        yield compressor.flush(), 0
