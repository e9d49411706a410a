"""Authentication for every resolver: a Strawberry permission that reports UNAUTHENTICATED."""

from __future__ import annotations

from typing import Any

from strawberry.permission import BasePermission

from api.auth import AuthError
from audit.records import ACCESS_DENIED


class IsAuthenticated(BasePermission):
    message = "Sign in: send an Authorization: Bearer <token> header."
    error_extensions = {"code": "UNAUTHENTICATED"}

    async def has_permission(self, source: Any, info: Any, **kwargs: Any) -> bool:
        try:
            _ = info.context.owner  # reading it checks the token
        except AuthError as e:
            self.message = str(e)
            await _record_refusal(info)
            return False
        return True


async def _record_refusal(info: Any) -> None:
    """One ``access.denied`` record per refused request, however many of its fields were refused."""
    context = info.context
    if getattr(context, "audited_unauthenticated", False):
        return
    context.audited_unauthenticated = True
    await context.services.audit.record(ACCESS_DENIED, reason="UNAUTHENTICATED", field=info.field_name)
