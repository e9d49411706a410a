"""Task ids derived from the request, so that asking twice for the same export finds the same task."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

import orjson


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal requests give equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def task_id(owner: str, kind: str, dataset: str, request: dict[str, Any]) -> str:
    """Lower-case base32 of the first 15 bytes of SHA-256: 24 characters, no padding."""
    digest = hashlib.sha256(canonical_json([owner, kind, dataset, request])).digest()
    return base64.b32encode(digest[:15]).decode().lower()


def random_task_id() -> str:
    """For imports: each request is a new upload, so its id comes from chance, not the request.
    Same shape as ``task_id``: 24 lower-case base32 characters."""
    return base64.b32encode(secrets.token_bytes(15)).decode().lower()
