"""The ``Content-Disposition`` of a download, shared by the S3 presigned URL and the local route."""

from __future__ import annotations

import mimetypes
import re
from urllib.parse import quote

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")  # control characters and path separators
_NOT_TOKEN_SAFE = re.compile(r'[^\x20-\x7e]|["]')  # what cannot go inside filename="..."


def content_disposition(filename: str) -> str:
    """``attachment; filename="name"``; a name with non-ASCII characters also gets an RFC 6266
    ``filename*`` (the plain ``filename`` then holds an ASCII stand-in), so the header stays ASCII."""
    clean = _UNSAFE.sub("_", filename).strip() or "download"
    fallback = _NOT_TOKEN_SAFE.sub("_", clean)
    value = f'attachment; filename="{fallback}"'
    if fallback != clean:
        value += f"; filename*=UTF-8''{quote(clean, safe='')}"
    return value


# What a compressed export is (and what mimetypes gets wrong or does not know): the file is served
# as the compressed file it is, never with a Content-Encoding a client would undo on the way.
_TYPES = {
    ".gz": "application/gzip",
    ".zst": "application/zstd",
    ".parquet": "application/vnd.apache.parquet",
    ".ndjson": "application/x-ndjson",
}


def media_type(filename: str) -> str:
    """The ``Content-Type`` of a download named ``filename``: by its last extension, so
    ``x.csv.gz`` is ``application/gzip`` (``mimetypes`` says ``text/csv``, encoding gzip)."""
    dot = filename.rfind(".")
    known = _TYPES.get(filename[dot:].lower()) if dot >= 0 else None
    return known or mimetypes.guess_type(filename)[0] or "application/octet-stream"
