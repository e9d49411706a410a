"""Authentication for every resolver: a Strawberry permission that reports UNAUTHENTICATED."""

from __future__ import annotations

from typing import Any

from strawberry.permission import BasePermission

from api.auth import AuthError


class IsAuthenticated(BasePermission):
    message = "Sign in: send an Authorization: Bearer <token> header."
    error_extensions = {"code": "UNAUTHENTICATED"}

    def has_permission(self, source: Any, info: Any, **kwargs: Any) -> bool:
        try:
            _ = info.context.owner  # reading it checks the token
        except AuthError as e:
            self.message = str(e)
            return False
        return True
