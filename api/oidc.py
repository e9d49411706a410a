"""Tokens from an OpenID Connect identity provider: RS256/ES256 JWTs checked against the issuer's keys.

The discovery document (``{issuer}/.well-known/openid-configuration``) names the JWKS; both are
fetched with httpx and kept. Keys are fetched again when they are older than
``oidc_jwks_max_age_seconds`` and, for a token whose ``kid`` is not among them (the provider
rotated its keys), at once, but at most once every ``oidc_jwks_min_refresh_seconds``: tokens with
made-up ``kid`` values cannot make the api hammer the provider. While the provider cannot be
reached, the keys already held keep working.

The algorithm is never the token's choice alone: only RS256 and ES256 come here, and the key that
checks a token must be of that algorithm's type (an RSA key for RS256, a P-256 key for ES256).
HS256 and ``none`` never reach this module (api/auth.py), so a public key can never serve as an
HMAC secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
import jwt

from api.auth import AuthError, AuthUnavailable
from dataport.settings import Settings
from tasks.access import claim_at

log = logging.getLogger("dataport.api.oidc")

ALGORITHMS = ("RS256", "ES256")


class OidcVerifier:
    """One issuer's keys, fetched lazily and shared by every request of the process."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None):
        self.settings = settings
        self.client = client or httpx.AsyncClient(timeout=settings.oidc_timeout_seconds)
        self.issuer = settings.oidc_issuer
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = float("-inf")  # monotonic time of the last fetch attempt that succeeded
        self.forced_at = float("-inf")  # ... and of the last fetch for an unknown kid, successful or not
        self.jwks_uri: str | None = None
        self.lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def verify(self, token: str, alg: str, kid: str | None) -> dict[str, Any]:
        """The token's claims once its signature, issuer, audience and times are checked; else
        ``AuthError``."""
        key = await self._key(kid, alg)
        s = self.settings
        check_aud = s.oidc_audience_claim == "aud"
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=s.oidc_audience if check_aud else None,
                leeway=s.oidc_leeway_seconds,
                options={"require": ["exp", "iss"], "verify_aud": check_aud},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("The token has expired; sign in again.") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("The token is not valid yet (nbf or iat is in the future).") from None
        except jwt.InvalidIssuerError:
            raise AuthError("The token was not issued by the identity provider Dataport trusts.") from None
        except jwt.MissingRequiredClaimError as e:
            if e.claim != "aud":
                raise AuthError(f"The token lacks a required claim: {e.claim}.") from None
            raise AuthError("The token is not meant for Dataport (it names no audience).") from None
        except jwt.InvalidAudienceError:
            raise AuthError("The token is not meant for Dataport (its audience is another).") from None
        except jwt.InvalidSignatureError:
            raise AuthError("The token's signature is not valid.") from None
        except jwt.InvalidTokenError:
            raise AuthError("The token is not valid.") from None
        if not check_aud and claim_at(claims, s.oidc_audience_claim) != s.oidc_audience:
            raise AuthError("The token is not meant for Dataport (its audience is another).")
        return claims

    async def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        if time.monotonic() - self.fetched_at > self.settings.oidc_jwks_max_age_seconds:
            await self._refresh(self.fetched_at)
        key = self._find(kid, alg)
        if key is None and kid is not None and kid not in self.keys:
            await self._refresh(self.fetched_at, rate_limited=True)  # the provider may have rotated
            key = self._find(kid, alg)
        if key is None:
            raise AuthError("The token was signed with a key the identity provider does not publish.")
        return key

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key named by ``kid`` (or the only one of its type when the token names none), if it is
        a key for ``alg``."""
        if kid is not None:
            candidates = [self.keys[kid]] if kid in self.keys else []
        else:
            candidates = [k for k in self.keys.values() if k.algorithm_name == alg]
            candidates = candidates if len(candidates) == 1 else []
        return next((k for k in candidates if k.algorithm_name == alg), None)

    async def _refresh(self, seen: float, rate_limited: bool = False) -> None:
        """Fetch the JWKS again, unless another request did since ``seen`` or, for an unknown kid,
        the last attempt was too recent."""
        async with self.lock:
            if self.fetched_at != seen:
                return  # fetched while this request waited for the lock
            now = time.monotonic()
            if rate_limited:
                if now - self.forced_at < self.settings.oidc_jwks_min_refresh_seconds:
                    return
                self.forced_at = now
            try:
                self.keys = await self._fetch_keys()
                self.fetched_at = time.monotonic()
            except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as e:
                log.warning("The identity provider's keys could not be fetched from %s: %s", self.issuer, e)
                if not self.keys:
                    raise AuthUnavailable(
                        "The identity provider cannot be reached to check the token; try again."
                    ) from None

    async def _fetch_keys(self) -> dict[str, jwt.PyJWK]:
        if self.jwks_uri is None:
            discovery = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if discovery.get("issuer") != self.issuer:
                raise ValueError(f"the discovery document names the issuer {discovery.get('issuer')!r}")
            if not isinstance(discovery.get("jwks_uri"), str):
                raise ValueError("the discovery document has no jwks_uri")
            self.jwks_uri = discovery["jwks_uri"]
        jwks = await self._get_json(self.jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for index, data in enumerate(jwks.get("keys") or []):
            if not isinstance(data, Mapping) or data.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(dict(data))
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type or algorithm Dataport does not use
            if key.algorithm_name in ALGORITHMS:
                keys[str(data.get("kid", f"#{index}"))] = key
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        response = await self.client.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError(f"{url} did not answer with a JSON object")
        return body
