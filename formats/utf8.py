"""A binary stream read as UTF-8 text, a chunk at a time: how the text formats are read.

Text formats (CSV, JSON, NDJSON) are read through ``Utf8Chunks``: fixed-size reads, UTF-8 checked
as the bytes arrive (a multi-byte character split between two reads is carried over), a BOM
dropped, bytes counted for progress. Memory is a few chunks, whatever the file's size.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import Protocol

from formats.records import FileError

# Reads of this size: large enough that the per-read Python work is noise, small enough to stay
# in the cache. boto3's StreamingBody may return fewer bytes; that is fine.
CHUNK_BYTES = 64 * 1024

_BOM = "\ufeff"


class ByteStream(Protocol):
    """What a reader reads: ``read(n)`` and nothing else (a local file, boto3's StreamingBody, a
    stored file's ``storage.base.ReadStream``). XLSX needs more: a seekable file."""

    def read(self, n: int, /) -> bytes: ...


class Utf8Chunks:
    """A binary stream read in ``CHUNK_BYTES`` pieces and checked to be UTF-8 on the way.

    ``texts()`` yields the decoded text, ``chunks()`` the same bytes undecoded (JSON parsers want
    bytes); either way a leading BOM is dropped, and bytes that are not UTF-8 raise ``FileError``
    naming the line and byte offset, after everything before them has been yielded.
    """

    def __init__(self, stream: ByteStream, *, format: str) -> None:
        self._stream = stream
        self._format = format
        self.bytes_read = 0
        self._newlines = 0  # "\n" in the bytes yielded so far: the line number of an error

    def chunks(self) -> Iterator[bytes]:
        for data, _ in self._decoded():
            yield data

    def texts(self) -> Iterator[str]:
        for _, text in self._decoded():
            yield text

    def _decoded(self) -> Iterator[tuple[bytes, str]]:
        read, decode = self._stream.read, codecs.utf_8_decode
        carry = b""  # the start of a character cut off at the end of the last read
        offset = 0  # where carry (or the next chunk) starts in the file
        first = True
        while True:
            chunk = read(CHUNK_BYTES) or b""
            self.bytes_read += len(chunk)
            data = carry + chunk if carry else chunk
            if first and data:
                self._sniff(data)
            bad = None
            try:
                text, used = decode(data, "strict", not chunk)
            except UnicodeDecodeError as error:
                bad, bad_byte, bad_offset = error.start, data[error.start], offset + error.start
                text, used = data[:bad].decode("utf-8"), bad  # what comes before it is still read
            if first and text:
                first = False
                if text[0] == _BOM:
                    text, data, used, offset = text[1:], data[3:], used - 3, offset + 3
            if used < len(data):
                carry, data = data[used:], data[:used]
            else:
                carry = b""
            if data:
                offset += len(data)
                self._newlines += data.count(b"\n")
                yield data, text
            if bad is not None:
                raise self._not_utf8(bad_byte, bad_offset)
            if not chunk:
                return

    def _sniff(self, data: bytes) -> None:
        """Files that are plainly something else, named before their bytes make a worse error."""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise FileError(
                "the file is UTF-16 text, not UTF-8: save it as UTF-8 (in Excel: 'CSV UTF-8') and upload it again"
            )
        if data.startswith(b"PK\x03\x04"):
            raise FileError(
                f"the file is a zip archive (an XLSX workbook?), not {self._format} text: "
                "choose XLSX as the format, or save the sheet as CSV UTF-8"
            )

    def _not_utf8(self, byte: int, offset: int) -> FileError:
        return FileError(
            f"the file is not UTF-8 text: line {self._newlines + 1:,} holds the byte 0x{byte:02X} "
            f"(at byte offset {offset:,}), which is not UTF-8 (the file may be Latin-1 or Windows-1252); "
            "save it as UTF-8 (in Excel: 'CSV UTF-8') and upload it again"
        )
