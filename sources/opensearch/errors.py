"""What a failed OpenSearch request means: whether a later try may mend it (``is_transient``), what
the message says (``error_reason``, ``explain_error``: what went wrong and what to change, the
url without its credentials, ``redact``), and when an answer is partial (``_shard_problem``: a
failed shard or a timed-out search is never exported). The OpenSearch sink uses them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from opensearchpy.exceptions import (
    ConnectionError as OSConnectionError,
)
from opensearchpy.exceptions import (
    ConnectionTimeout,
    TransportError,
)

from sources.base import SourceError, TransientSourceError

# Shard failures that a later try can get past.
_TRANSIENT_FAILURES = ("rejected", "node_not_connected", "no_shard_available", "node_disconnected",
                       "circuit_breaking", "timeout")  # fmt: skip


def redact(url: str) -> str:
    """``url`` without its credentials, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _error_type(e: TransportError) -> str:
    info = e.info if isinstance(e.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        return str(error.get("type") or "")
    return str(e.error or "")


def error_reason(e: TransportError) -> str:
    if isinstance(e, ConnectionTimeout):
        return "no answer in time"
    if isinstance(e, OSConnectionError):
        return f"connection failed: {e.info}" if e.info else "connection failed"
    info = e.info if isinstance(e.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        causes = error.get("root_cause") or []
        cause = causes[0] if causes and isinstance(causes[0], dict) else error
        return f"{cause.get('type') or error.get('type')}: {cause.get('reason') or error.get('reason')}"
    if isinstance(error, str):
        return error
    return str(e.error or info or e.status_code)


def is_transient(e: TransportError) -> bool:
    if isinstance(e, OSConnectionError):  # includes timeouts
        return True
    return isinstance(e.status_code, int) and (e.status_code == 429 or e.status_code >= 500)


def _never_reached(e: TransportError) -> bool:
    """True when the cluster cannot have acted on the request: it said "too many requests", or
    no connection was made."""
    if e.status_code == 429:
        return True
    return (
        isinstance(e, OSConnectionError)
        and not isinstance(e, ConnectionTimeout)
        and isinstance(e.info, aiohttp.ClientConnectorError)
    )


def _context_gone(e: TransportError) -> bool:
    text = f"{_error_type(e)} {error_reason(e)}"
    return e.status_code == 404 and ("search_context_missing" in text or "No search context found" in text)


def explain_error(e: TransportError, what: str, index: str, url: str) -> str:
    """A message for a failure that a retry will not mend: what went wrong and what to change."""
    where = redact(url)
    kind = _error_type(e)
    if isinstance(e, OSConnectionError):
        return f"OpenSearch at {where} could not be reached while {what} ({error_reason(e)})."
    if "index_not_found" in kind:
        return (f"Index '{index}' does not exist at {where}. Check `index` in the datasets file, or create "
                f"the index.")  # fmt: skip
    if e.status_code == 401:
        return f"OpenSearch at {where} refused the credentials (401). Check the user and password in the dataset's url."
    if e.status_code == 403:
        return f"OpenSearch at {where} does not allow {what} (403: {error_reason(e)}). Grant the user read access."
    if e.status_code == 400:
        return f"OpenSearch refused the request while {what} ({error_reason(e)})."
    return f"OpenSearch at {where} answered {e.status_code} while {what} ({error_reason(e)})."


def _shard_problem(response: Mapping[str, Any], what: str) -> SourceError | None:
    """Partial answers are never exported: a failed shard or a timed-out search is an error."""
    shards = response.get("_shards") or {}
    if response.get("timed_out"):
        return TransientSourceError(f"OpenSearch timed out while {what}; the answer would be incomplete.")
    if not shards.get("failed"):
        return None
    reasons = []
    for failure in shards.get("failures") or []:
        reason = failure.get("reason") if isinstance(failure, dict) else None
        if isinstance(reason, dict):
            reasons.append(f"{reason.get('type')}: {reason.get('reason')}")
    text = "; ".join(dict.fromkeys(reasons)) or "no reason given"
    message = f"{shards['failed']} shard(s) failed while {what} ({text}); the answer would be incomplete."
    if not reasons or any(any(t in r for t in _TRANSIENT_FAILURES) for r in reasons):
        return TransientSourceError(message)
    return SourceError(message)
