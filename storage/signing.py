"""Signed, expiring URLs for the local storage backend (``/files/{id}``, ``/uploads/{id}``).

A signature is HMAC-SHA256 over the HTTP method, the task id and the expiry (Unix seconds), so a
download link cannot be replayed as an upload link, for another task, or after it expires. The
message starts with a fixed label: the same secret also signs the JWTs, and the label keeps the
two kinds of signature apart.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlencode

_LABEL = b"dataport-signed-url-v1"


def _message(method: str, task_id: str, expires: int) -> bytes:
    if not method.isalpha():
        raise ValueError(f"not an HTTP method: {method!r}")
    # Unambiguous: the label and the method hold no newline, and the expiry (digits) follows the
    # last newline, so whatever lies between is the task id.
    return b"\n".join([_LABEL, method.upper().encode(), task_id.encode(), str(int(expires)).encode()])


def sign(secret: str, method: str, task_id: str, expires: int) -> str:
    """Hex HMAC-SHA256 of (method, task id, expiry)."""
    return hmac.new(secret.encode(), _message(method, task_id, expires), hashlib.sha256).hexdigest()


def verify(
    secret: str,
    method: str,
    task_id: str,
    expires: int | str,
    signature: object,
    now: float | None = None,
) -> bool:
    """True when ``signature`` was made by ``sign`` with the same arguments and ``expires`` has not
    passed. Malformed input is simply not valid (no exception)."""
    try:
        expires = int(expires)
    except (TypeError, ValueError):
        return False
    if (time.time() if now is None else now) > expires:
        return False
    if not isinstance(signature, str):
        return False
    expected = sign(secret, method, task_id, expires)
    # compare_digest on bytes: it refuses non-ASCII str, and a tampered signature may be anything.
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape"))


def signed_path(secret: str, method: str, path_prefix: str, task_id: str, expires: int) -> str:
    """``{path_prefix}/{task_id}?expires=...&signature=...``, e.g. ``/files/abc?expires=…``."""
    expires = int(expires)
    query = urlencode({"expires": expires, "signature": sign(secret, method, task_id, expires)})
    return f"{path_prefix.rstrip('/')}/{quote(task_id, safe='')}?{query}"
