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

import redis.exceptions
from graphql import GraphQLError
from strawberry.extensions import MaskErrors

from dataport import errors

log = logging.getLogger("strawberry.execution")

# Refusals an operator wants to see at the default log level.
_LIMITS = frozenset(
    {
        errors.QUERY_TOO_COMPLEX,
        errors.PAYLOAD_TOO_LARGE,
        errors.RATE_LIMITED,
        errors.QUOTA_EXCEEDED,
        errors.SERVICE_UNAVAILABLE,
    }
)


def is_unexpected(error: GraphQLError) -> bool:
    """Errors we raise on purpose carry a code; anything else is masked, so that no internal
    detail or stack trace reaches a client (it is logged instead)."""
    original = error.original_error
    if original is None:
        return False  # validation and parsing errors describe the client's query
    return not (error.extensions or {}).get("code") and not isinstance(original, GraphQLError)


# Redis (the task store and queue) not answering, after redis-py's own retries (tasks/services.py).
STORE_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RETRY_AFTER_SECONDS = 5
GRAPHQL_VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
STORE_DOWN_MESSAGE = "Dataport's task store is not answering; try again in a few seconds."


def is_outage(error: GraphQLError) -> bool:
    return isinstance(error.original_error, STORE_DOWN)


class MaskUnexpectedErrors(MaskErrors):
    """Strawberry's masking, except that an outage of the task store is told as it is: a client
    that read "Internal error" (or a null task) would take the task for lost."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=is_unexpected, error_message="Internal error; it has been logged.")

    def _process_result(self, result: object) -> None:
        """Strawberry's, without its ``isinstance`` against a runtime-checkable Protocol: that check
        ran for every subscription result pushed (~15 % of the api's CPU with 1,000 subscribers,
        bench/subscribers.py), and nearly every result has no errors to mask."""
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = self._process_errors(errors)  # type: ignore[attr-defined]

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        if not is_outage(error):
            masked = super().anonymise_error(error)
            masked.extensions = {"code": "INTERNAL_ERROR"}
            return masked
        return GraphQLError(
            STORE_DOWN_MESSAGE,
            nodes=error.nodes,
            source=error.source,
            positions=error.positions,
            path=error.path,
            extensions={"code": errors.SERVICE_UNAVAILABLE, "retryAfterSeconds": RETRY_AFTER_SECONDS},
        )


def code_client_errors(graphql_errors: Iterable[GraphQLError]) -> None:
    """graphql-core's own parse, validation and variable errors (a syntax error, an unknown field,
    an Int beyond 32 bits) carry no code; clients branch on codes, so they get
    ``GRAPHQL_VALIDATION_FAILED``. In place: some of them (variables) reach no extension."""
    for error in graphql_errors:
        # No path: raised before any resolver ran; graphql-core wraps a variable's own error.
        before_execution = error.path is None and (
            error.original_error is None or isinstance(error.original_error, GraphQLError)
        )
        if before_execution and not (error.extensions or {}).get("code"):
            error.extensions = {**(error.extensions or {}), "code": GRAPHQL_VALIDATION_FAILED}


def log_errors(graphql_errors: Iterable[GraphQLError]) -> None:
    for error in graphql_errors:
        if is_outage(error):
            log.warning(
                "GraphQL request failed: the task store is down (%s: %s)",
                type(error.original_error).__name__,
                error.original_error,
            )
            continue
        if is_unexpected(error):
            log.error("%s", error.message, exc_info=error.original_error)
            continue
        code = (error.extensions or {}).get("code")
        level = logging.INFO if code in _LIMITS else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "GraphQL request refused (%s): %s", code or "invalid", error.message[:500])


def forget_tracebacks(graphql_errors: Iterable[GraphQLError]) -> None:
    """Once ``log_errors`` has run, a traceback is of no further use, and it holds the frames that
    raised the error, which often hold the error itself (Strawberry's permission check keeps its
    refusal in a local): a cycle that only the cyclic collector frees, ~110 objects for each request
    refused for its token. Dropping the tracebacks lets reference counting free them at once."""
    for error in graphql_errors:
        error.__traceback__ = None
        if error.original_error is not None:
            error.original_error.__traceback__ = None
