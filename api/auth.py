"""Bearer tokens: HS256 JWTs whose ``sub`` is the owner of every task made with them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from dataport.settings import Settings
from tasks.access import Owner


class AuthError(Exception):
    """Missing or bad credentials. The message is safe to show to the client."""


def issue_token(settings: Settings, user: str, email: str | None = None, ttl: int | None = None) -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + (ttl or settings.token_ttl_seconds), "iss": settings.jwt_issuer}
    if email:
        claims["email"] = email
    return jwt.encode(claims, settings.signing_secret, algorithm="HS256")


@dataclass(frozen=True)
class Credentials:
    """Who is asking, and until when (the token's ``exp``, seconds since the epoch)."""

    owner: Owner
    expires_at: float


def owner_from_header(settings: Settings, authorization: object) -> Owner:
    """The owner named by an ``Authorization: Bearer <JWT>`` value, or ``AuthError``."""
    return credentials_from_header(settings, authorization).owner


def credentials_from_header(settings: Settings, authorization: object) -> Credentials:
    """The owner and expiry of an ``Authorization: Bearer <JWT>`` value, or ``AuthError``. The value
    comes from a header or from a WebSocket's ``connection_init`` payload, where it can be any JSON
    value: anything but a string is refused like a missing token."""
    if not authorization:
        raise AuthError("Sign in: send an Authorization: Bearer <token> header.")
    if not isinstance(authorization, str):
        raise AuthError("The authorization value must be a string: 'Bearer <token>'.")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("The Authorization header must be 'Bearer <token>'.")
    try:
        claims = jwt.decode(
            token.strip(),
            settings.signing_secret,
            algorithms=["HS256"],
            issuer=settings.jwt_issuer,
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("The token has expired; get a new one.") from None
    except jwt.InvalidTokenError:
        raise AuthError("The token is not valid.") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("The token names no user.")
    email = claims.get("email")
    return Credentials(Owner(subject, email if isinstance(email, str) else None), float(claims["exp"]))
