"""Which GraphQL errors are ours to log with a traceback, and which describe the client's request.

Strawberry logs every error of a response with its traceback (``strawberry.execution``, at ERROR),
so each request without a token, each typo in a query and each refused document used to leave a
traceback in the api log. Only an unexpected error (one that is masked for the client) is a bug
worth a traceback; the rest are the client's, and get one line without a traceback: at INFO when a
limit refused the request (an operator wants to see those), at DEBUG otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from graphql import GraphQLError

from dataport import errors

log = logging.getLogger("strawberry.execution")

# Refusals an operator wants to see at the default log level.
_LIMITS = frozenset({errors.QUERY_TOO_COMPLEX, errors.PAYLOAD_TOO_LARGE, errors.RATE_LIMITED,
                     errors.QUOTA_EXCEEDED, errors.SERVICE_UNAVAILABLE})


def is_unexpected(error: GraphQLError) -> bool:
    """Errors we raise on purpose carry a code; anything else is masked, so that no internal
    detail or stack trace reaches a client (it is logged instead)."""
    original = error.original_error
    if original is None:
        return False  # validation and parsing errors describe the client's query
    return not (error.extensions or {}).get("code") and not isinstance(original, GraphQLError)


def log_errors(graphql_errors: Iterable[GraphQLError]) -> None:
    for error in graphql_errors:
        if is_unexpected(error):
            log.error("%s", error.message, exc_info=error.original_error)
            continue
        code = (error.extensions or {}).get("code")
        level = logging.INFO if code in _LIMITS else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "GraphQL request refused (%s): %s", code or "invalid", error.message[:500])
