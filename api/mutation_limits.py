"""The rate limits every mutation passes first: so many per window per user and per client address.

A refusal is a top-level GraphQL error with ``extensions.code`` ``RATE_LIMITED`` and
``extensions.retryAfterSeconds`` (DESIGN.md, "Limits, quotas and error codes"): waiting that long
lets the next mutation through. A refused mutation is not counted and does nothing else, so a
client that keeps asking does not push its own wait further out. The address is the one uvicorn
reports, which honours ``X-Forwarded-For`` from trusted proxies (127.0.0.1 unless
``FORWARDED_ALLOW_IPS`` says otherwise).
"""

from __future__ import annotations

from graphql import GraphQLError

from api.context import Info
from api.ratelimit import retry_after_all
from audit.outbox import Outbox, actor_of
from audit.records import RATE_LIMITED, pending
from dataport import errors
from tasks.access import Identity


def client_address(info: Info) -> str:
    request = info.context.request  # the HTTP request, or the WebSocket a mutation came over
    client = getattr(request, "client", None)
    return client.host if client else "unknown"


def refusal(outbox: Outbox, identity: Identity) -> tuple[str, dict[str, str]] | None:
    """The audit record of a refused mutation, for the rate-limit script to append (or None when
    the audit log is off): the check and the record are one Redis command."""
    if not outbox.enabled:
        return None
    return outbox.key, pending(RATE_LIMITED, actor_of(identity), limit="mutations").outbox_fields()


async def check_mutation(info: Info) -> None:
    """Count this mutation against its user and address; raises ``GraphQLError`` (RATE_LIMITED)
    when either has used up its window."""
    ctx = info.context
    settings = ctx.services.settings
    wait = await retry_after_all(
        ctx.services.redis,
        [
            ("mutation:user", ctx.owner.id, settings.mutation_rate_per_user),
            ("mutation:ip", client_address(info), settings.mutation_rate_per_ip),
        ],
        settings.mutation_rate_window_seconds,
        refusal(ctx.services.audit, ctx.identity),
    )
    if wait is not None:
        raise GraphQLError(
            f"Too many requests; try again in {wait} s.",
            extensions={"code": errors.RATE_LIMITED, "retryAfterSeconds": wait},
        )
