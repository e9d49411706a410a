"""The GraphQL context: the shared services and whoever is asking."""

from __future__ import annotations

from strawberry.fastapi import BaseContext
from strawberry.types import Info as StrawberryInfo

from api.auth import AuthError, owner_from_header
from dataport.services import Services
from tasks.exports import Owner


class Context(BaseContext):
    def __init__(self, services: Services):
        super().__init__()
        self.services = services

    @property
    def owner(self) -> Owner:
        """The caller, from the Authorization header or, on a WebSocket, from connection_init's
        payload. Raises ``AuthError``."""
        header = None
        params = self.connection_params
        if isinstance(params, dict):
            header = params.get("authorization") or params.get("Authorization")
        if header is None and self.request is not None:  # an HTTP request or the WebSocket upgrade
            header = self.request.headers.get("authorization")
        return owner_from_header(self.services.settings, header)

    def owner_or_none(self) -> Owner | None:
        try:
            return self.owner
        except AuthError:
            return None


Info = StrawberryInfo[Context, None]
