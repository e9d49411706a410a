"""The GraphQL context: the shared services and whoever is asking."""

from __future__ import annotations

from strawberry.fastapi import BaseContext
from strawberry.types import Info as StrawberryInfo

from api.auth import AuthError, Credentials, credentials_from_header
from api.graphql_limits import QueryLimits
from dataport.services import Services
from tasks.access import Owner


class Context(BaseContext):
    def __init__(self, services: Services):
        super().__init__()
        self.services = services

    def _authorization(self) -> object:
        """connection_init's ``authorization`` on a WebSocket (any JSON value a client sent), else
        the request's header (an HTTP request or the WebSocket upgrade)."""
        header = None
        params = self.connection_params
        if isinstance(params, dict):
            header = params.get("authorization") or params.get("Authorization")
        if header is None and self.request is not None:
            header = self.request.headers.get("authorization")
        return header

    @property
    def credentials(self) -> Credentials:
        """The caller and their token's expiry. Raises ``AuthError``."""
        return credentials_from_header(self.services.settings, self._authorization())

    @property
    def owner(self) -> Owner:
        """The caller, from the Authorization header or, on a WebSocket, from connection_init's
        payload. Raises ``AuthError``."""
        return self.credentials.owner

    def owner_or_none(self) -> Owner | None:
        try:
            return self.owner
        except AuthError:
            return None

    @property
    def query_limits(self) -> QueryLimits:
        """The document limits for this caller: a request without a valid token gets the smaller
        anonymous token budget (all it can do is introspect)."""
        return QueryLimits.from_settings(self.services.settings, anonymous=self.owner_or_none() is None)


Info = StrawberryInfo[Context, None]
