"""Bearer tokens, one verification for HTTP, WebSockets and the streaming route.

Two kinds of token are accepted, told apart by the header's ``alg`` before anything is trusted:
HS256 tokens Dataport signs itself (``dataport token``, ``dataport dev``; iss ``jwt_issuer``), and
RS256/ES256 tokens from the OpenID Connect issuer in ``oidc_issuer`` (api/oidc.py). Any other
``alg`` (``none`` among them) is refused, and each kind is checked with its own key only: the
provider's public keys are never tried as an HMAC secret. Either way the verified claims become a
``tasks.access.Identity`` through the same settings (user id, email and roles claims).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from api.token_cache import TokenCache
from dataport.settings import Settings
from tasks.access import Identity, Owner, claim_at

SIGN_IN = "Sign in: send an Authorization: Bearer <token> header."


class AuthError(Exception):
    """Missing or bad credentials. The message is safe to show to the client."""


class AuthUnavailable(AuthError):
    """The token could not be checked right now (the identity provider is unreachable): refused,
    but never remembered, so the same token works as soon as the provider answers again."""


@dataclass(frozen=True)
class Credentials:
    """Who is asking, and until when (the token's ``exp``, seconds since the epoch)."""

    identity: Identity
    expires_at: float

    @property
    def owner(self) -> Owner:
        return self.identity.owner


def _put(claims: dict[str, Any], path: str, value: Any) -> None:
    """Set a claim where ``claim_at`` reads it: nested for a dotted path (``realm_access.roles``),
    whole for a key that is a URL (``https://example.com/roles``) or has no dots."""
    steps = [path] if "/" in path else path.split(".")
    for step in steps[:-1]:
        claims = claims.setdefault(step, {})
    claims[steps[-1]] = value


def claim_value(text: str) -> Any:
    """A claim given as text (``dataport token --claim``, ``/dev/token``): JSON when it parses as a
    number, true/false/null, a list, an object or a quoted string (``org_id=42`` is the number 42,
    as an integer tenant column needs; ``org="042"`` the string 042); else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def issue_token(
    settings: Settings,
    user: str,
    email: str | None = None,
    ttl: int | None = None,
    roles: Iterable[str] = (),
    claims: Mapping[str, Any] | None = None,
) -> str:
    """An HS256 token for ``user``, with roles and claims where the api reads them."""
    now = int(time.time())
    body: dict[str, Any] = dict(claims or {})
    body.update({"sub": user, "iat": now, "exp": now + (ttl or settings.token_ttl_seconds), "iss": settings.jwt_issuer})
    if settings.user_id_claim != "sub":
        _put(body, settings.user_id_claim, user)
    if email:
        _put(body, settings.email_claim, email)
    if roles:
        _put(body, settings.roles_claim, list(roles))
    return jwt.encode(body, settings.signing_secret, algorithm="HS256")


def bearer_token(authorization: object) -> str:
    """The token of an ``Authorization: Bearer <JWT>`` value. The value comes from a header or a
    WebSocket's ``connection_init`` payload, where it can be any JSON value: anything but a string
    is refused like a missing token."""
    if not authorization:
        raise AuthError(SIGN_IN)
    if not isinstance(authorization, str):
        raise AuthError("The authorization value must be a string: 'Bearer <token>'.")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("The Authorization header must be 'Bearer <token>'.")
    return token.strip()


def roles_from(value: Any) -> frozenset[str]:
    """A roles claim: a list of strings, or one string of names separated by spaces or commas."""
    if isinstance(value, str):
        return frozenset(name for name in value.replace(",", " ").split() if name)
    if isinstance(value, list | tuple):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def identity_from_claims(settings: Settings, claims: dict[str, Any]) -> Identity:
    user = claim_at(claims, settings.user_id_claim)
    if not isinstance(user, str) or not user:
        raise AuthError(f"The token names no user (no '{settings.user_id_claim}' claim).")
    email = claim_at(claims, settings.email_claim)
    roles = roles_from(claim_at(claims, settings.roles_claim))
    owner = Owner(user, email if isinstance(email, str) else None)
    return Identity(owner, roles, claims=claims, admin=settings.admin_role in roles)


def _verify_local(settings: Settings, token: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            settings.signing_secret,
            algorithms=["HS256"],
            issuer=settings.jwt_issuer,
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("The token has expired; get a new one.") from None
    except jwt.InvalidTokenError:
        raise AuthError("The token is not valid.") from None


class Authenticator:
    """The api's one verifier (``app.state.authenticator``): it holds the provider's cached keys."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokens: TokenCache[Credentials] = TokenCache()
        self.oidc = None
        if settings.oidc_issuer:
            from api.oidc import OidcVerifier

            self.oidc = OidcVerifier(settings)

    async def aclose(self) -> None:
        if self.oidc is not None:
            await self.oidc.aclose()

    async def authenticate(self, authorization: object) -> Credentials:
        """The caller an ``Authorization`` value names, or ``AuthError`` saying what was wrong.
        Each token is verified once for its lifetime, a refusal kept for seconds (api/token_cache.py)."""
        token = bearer_token(authorization)
        cached = self.tokens.get(token)
        if isinstance(cached, Credentials):
            return cached
        if isinstance(cached, str):
            raise AuthError(cached)
        try:
            credentials = await self._verify(token)
        except AuthUnavailable:
            raise
        except AuthError as e:
            self.tokens.refused(token, str(e))
            raise
        self.tokens.accepted(token, credentials, credentials.expires_at)
        return credentials

    async def _verify(self, token: str) -> Credentials:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("The token is not valid.") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg == "HS256" and self.settings.local_tokens:
            claims = _verify_local(self.settings, token)
        elif alg in ("RS256", "ES256") and self.oidc is not None and isinstance(kid, str | None):
            claims = await self.oidc.verify(token, alg, kid)
        else:
            accepted = (["HS256"] if self.settings.local_tokens else []) + (["RS256", "ES256"] if self.oidc else [])
            raise AuthError(f"The token is not valid: tokens signed with {', '.join(accepted) or 'no'} algorithm.")
        return Credentials(identity_from_claims(self.settings, claims), float(claims["exp"]))
