"""Verified tokens, remembered for their lifetime, so a client that sends the same token on every
request has it verified once (api/auth.py's ``Authenticator``).

Verifying a token is a signature check (HMAC, or RSA/ECDSA for the identity provider's) and a claims
walk: ~0.4 ms of an ``exportTask`` that costs ~2.5 ms once its document is cached. A polling page
sends one token for an hour, so the outcome is kept, keyed by the SHA-256 of the token (the cache
holds no token a memory dump could replay), until the token's own ``exp``: a cached answer is
never more generous than verifying again would be, since an expired entry is dropped and verified
afresh (which refuses it). A refusal is kept ``REFUSAL_SECONDS`` only, so a token refused while
the identity provider's keys were being fetched or rotated is tried again soon; and a flood of
garbage tokens costs one verification each per few seconds instead of one per request.

Bounded: ``MAX_ENTRIES`` tokens, least recently used out. Per api process; nothing in it needs to
be shared (each process would reach the same verdict).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Generic, TypeVar

MAX_ENTRIES = 10_000
REFUSAL_SECONDS = 2.0

T = TypeVar("T")


class TokenCache(Generic[T]):
    """Outcomes (credentials, or the refusal's message) by token hash, each until a deadline on
    ``time.time()``'s clock (a token's ``exp`` is on that clock)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, refusal_seconds: float = REFUSAL_SECONDS) -> None:
        self.max_entries = max_entries
        self.refusal_seconds = refusal_seconds
        self._entries: OrderedDict[bytes, tuple[float, T | str]] = OrderedDict()

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str) -> T | str | None:
        """The kept outcome (a refusal is its message), or None when there is none in date."""
        key = self.key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, outcome = entry
        if time.time() >= until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return outcome

    def accepted(self, token: str, outcome: T, expires_at: float) -> None:
        self._put(token, outcome, expires_at)

    def refused(self, token: str, message: str) -> None:
        self._put(token, message, time.time() + self.refusal_seconds)

    def _put(self, token: str, outcome: T | str, until: float) -> None:
        key = self.key(token)
        self._entries[key] = (until, outcome)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
