"""The GraphQL context: the shared services and whoever is asking.

Verifying a token may fetch the identity provider's keys, so it is async and done once, up front:
by the context getter for an HTTP request (api/app.py), and by ``on_ws_connect`` when a WebSocket's
``connection_init`` arrives (api/graphql_view.py). Resolvers then read ``owner``, ``identity`` and
``credentials`` synchronously: the stored result, or the stored refusal raised as ``AuthError``.
"""

from __future__ import annotations

from strawberry.fastapi import BaseContext
from strawberry.types import Info as StrawberryInfo

from api.auth import SIGN_IN, Authenticator, AuthError, Credentials
from api.graphql_limits import QueryLimits
from tasks.access import Identity, Owner
from tasks.services import Services


class Context(BaseContext):
    def __init__(self, services: Services, authenticator: Authenticator):
        super().__init__()
        self.services = services
        self.authenticator = authenticator
        self._verified: Credentials | str = SIGN_IN  # the credentials, or why there are none

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

    async def authenticate(self, verified: Credentials | AuthError | None = None) -> None:
        """Verify the caller's token now (or take ``verified``, a result already had for this
        request) and keep the outcome for the sync properties."""
        if verified is None:
            try:
                verified = await self.authenticator.authenticate(self._authorization())
            except AuthError as e:
                verified = e
        self._verified = str(verified) if isinstance(verified, AuthError) else verified

    @property
    def credentials(self) -> Credentials:
        """The caller and their token's expiry. Raises ``AuthError``."""
        if isinstance(self._verified, str):
            raise AuthError(self._verified)
        return self._verified

    @property
    def identity(self) -> Identity:
        """The caller with their roles and verified claims. Raises ``AuthError``."""
        return self.credentials.identity

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
