"""Token verification (api/auth.py, api/oidc.py) against a discovery document and JWKS served over
real HTTP by the test (tests/fixtures/oidc.py's ``KeyServer``): every claim check, signatures,
algorithm confusion, key rotation and its rate limit, and roles from nested claims."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.utils import base64url_encode

from api.auth import Authenticator, AuthError, issue_token
from dataport.settings import Settings
from tests.fixtures.oidc import AUDIENCE, KeyServer, SigningKey, key_server

SECRET = "oidc-test-secret-long-enough-for-hs384-which-wants-48-bytes"


def _settings(server: KeyServer, **overrides) -> Settings:
    return Settings(jwt_secret=SECRET, oidc_issuer=server.issuer, oidc_audience=AUDIENCE, **overrides)


@pytest.fixture
async def server() -> AsyncIterator[KeyServer]:
    async with key_server(SigningKey.make("RS256"), SigningKey.make("ES256")) as s:
        yield s


@pytest.fixture
async def auth(server) -> AsyncIterator[Authenticator]:
    a = Authenticator(_settings(server))
    yield a
    await a.aclose()


async def _verify(auth: Authenticator, token: str):
    return await auth.authenticate(f"Bearer {token}")


async def _refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as e:
        await _verify(auth, token)
    return str(e.value)


@pytest.mark.parametrize("index", [0, 1], ids=["RS256", "ES256"])
async def test_a_good_token_names_the_user_email_and_roles(server, auth, index):
    token = server.keys[index].sign(server.claims(email="u@example.com", roles=["analyst", "admin"]))
    credentials = await _verify(auth, token)
    assert credentials.owner.id == "user-1" and credentials.owner.email == "u@example.com"
    assert credentials.identity.roles == {"analyst", "admin"} and credentials.identity.admin
    assert credentials.identity.claims["aud"] == AUDIENCE
    assert credentials.expires_at == pytest.approx(time.time() + 300, abs=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"iss": "https://evil.example.com"}, "not issued by the identity provider"),
        ({"iss": None}, "lacks a required claim"),
        ({"aud": "https://another-api.example.com"}, "not meant for Dataport"),
        ({"aud": None}, "not meant for Dataport"),
        ({"exp": -60}, "expired"),
        ({"exp": None}, "lacks a required claim"),
        ({"nbf": 120}, "not valid yet"),
        ({"sub": None}, "names no user"),
        ({"sub": ""}, "names no user"),
    ],
    ids=["iss", "no-iss", "aud", "no-aud", "exp", "no-exp", "nbf", "no-sub", "empty-sub"],
)
async def test_each_claim_is_checked(server, auth, overrides, message):
    # Times are offsets from now, taken when the test runs: a whole suite can outlast them.
    now = int(time.time())
    overrides = {k: now + v if k in ("exp", "nbf") and v is not None else v for k, v in overrides.items()}
    assert message in await _refused(auth, server.keys[0].sign(server.claims(**overrides)))


async def test_exp_and_nbf_have_a_leeway(server, auth):
    now = int(time.time())
    await _verify(auth, server.keys[0].sign(server.claims(exp=now - 10, nbf=now + 10)))  # within 30 s
    strict = Authenticator(_settings(server, oidc_leeway_seconds=0))
    try:
        assert "expired" in await _refused(strict, server.keys[0].sign(server.claims(exp=now - 10)))
        assert "not valid yet" in await _refused(strict, server.keys[0].sign(server.claims(nbf=now + 10)))
    finally:
        await strict.aclose()


async def test_a_bad_signature_is_refused(server, auth):
    forger = SigningKey.make("RS256", kid=server.keys[0].kid)  # the published kid, another key
    assert "signature is not valid" in await _refused(auth, forger.sign(server.claims()))
    good = server.keys[0].sign(server.claims())
    head, body, signature = good.split(".")
    tampered = server.keys[0].sign(server.claims(sub="someone-else")).split(".")[1]
    assert "signature is not valid" in await _refused(auth, f"{head}.{tampered}.{signature}")


async def test_alg_none_and_hs256_with_the_public_key_are_refused(server, auth):
    assert "not valid" in await _refused(auth, jwt.encode(server.claims(), None, algorithm="none"))
    # The classic confusion: HS256 whose secret is the provider's public key (PEM or JWK bytes).
    pem = (
        server.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header, body, _ = jwt.encode(server.claims(), SECRET, algorithm="HS256", headers={"kid": server.keys[0].kid}).split(
        "."
    )
    forged = base64url_encode(hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()).decode()
    assert "not valid" in await _refused(auth, f"{header}.{body}.{forged}")
    # An RS256 header naming the EC key (and the other way round): the key's type decides.
    rs_header_ec_key = jwt.encode(server.claims(), server.keys[1].private, algorithm="ES256")
    head = base64url_encode(b'{"alg":"RS256","kid":"%s"}' % server.keys[1].kid.encode()).decode()
    assert "key the identity provider does not publish" in await _refused(
        auth, head + "." + rs_header_ec_key.split(".", 1)[1]
    )
    assert "not valid" in await _refused(auth, jwt.encode(server.claims(), SECRET, algorithm="HS384"))
    assert "not valid" in await _refused(auth, jwt.encode(server.claims(), server.keys[0].private, algorithm="PS256"))


async def test_an_unknown_kid_refreshes_the_keys_once_and_is_then_accepted(server, auth):
    await _verify(auth, server.keys[0].sign(server.claims()))
    assert server.jwks_fetches == 1
    rotated = SigningKey.make("RS256")
    server.keys = [rotated, *server.keys]  # the provider rotates: a new key is published
    tokens = [rotated.sign(server.claims(sub=f"user-{i}")) for i in range(5)]
    results = await asyncio.gather(*(_verify(auth, t) for t in tokens))  # at once: one fetch
    assert [c.owner.id for c in results] == [f"user-{i}" for i in range(5)]
    assert server.jwks_fetches == 2
    await _verify(auth, rotated.sign(server.claims()))
    assert server.jwks_fetches == 2  # cached


async def test_unknown_kids_refresh_at_most_once_per_interval(server):
    auth = Authenticator(_settings(server, oidc_jwks_min_refresh_seconds=3))
    try:
        await _verify(auth, server.keys[0].sign(server.claims()))
        stranger = SigningKey.make("RS256")
        assert "does not publish" in await _refused(auth, stranger.sign(server.claims()))
        assert server.jwks_fetches == 2  # one refresh for the unknown kid
        for n in range(20):  # made-up kids cannot make the api hammer the provider
            await _refused(auth, SigningKey(f"made-up-{n}", "RS256", stranger.private).sign(server.claims()))
        assert server.jwks_fetches == 2
        server.keys = [stranger, *server.keys]  # now it is published: accepted once the interval is over
        token = stranger.sign(server.claims())
        async with asyncio.timeout(10):
            while True:
                try:
                    await _verify(auth, token)
                    break
                except AuthError:
                    await asyncio.sleep(0.1)
        assert server.jwks_fetches == 3
    finally:
        await auth.aclose()


async def test_a_removed_key_stops_working_when_the_keys_age_out(server):
    auth = Authenticator(_settings(server, oidc_jwks_max_age_seconds=0.5))
    try:
        old = server.keys[0]
        await _verify(auth, old.sign(server.claims()))
        server.keys = [SigningKey.make("RS256")]  # the old key is withdrawn
        async with asyncio.timeout(10):
            while True:
                try:
                    await _verify(auth, old.sign(server.claims()))
                    await asyncio.sleep(0.1)
                except AuthError as e:
                    assert "does not publish" in str(e)
                    break
    finally:
        await auth.aclose()


async def test_keys_held_keep_working_while_the_provider_is_down(server, auth):
    await _verify(auth, server.keys[0].sign(server.claims()))
    server.up = False
    await _verify(auth, server.keys[0].sign(server.claims()))
    assert "does not publish" in await _refused(auth, SigningKey.make("RS256").sign(server.claims()))


async def test_an_unreachable_provider_is_a_clear_refusal(server):
    server.up = False
    auth = Authenticator(_settings(server))
    try:
        token = server.keys[0].sign(server.claims())
        assert "cannot be reached" in await _refused(auth, token)
        server.up = True
        await _verify(auth, token)  # the same token, once the provider answers: a refusal not remembered
    finally:
        await auth.aclose()


@pytest.mark.parametrize(
    ("roles_claim", "claims", "roles"),
    [
        ("realm_access.roles", {"realm_access": {"roles": ["analyst", "admin"]}}, {"analyst", "admin"}),
        ("cognito:groups", {"cognito:groups": ["editors"]}, {"editors"}),
        ("roles", {"roles": "analyst editor,admin"}, {"analyst", "editor", "admin"}),
        ("https://example.com/roles", {"https://example.com/roles": ["analyst"]}, {"analyst"}),
        ("roles", {"roles": ["analyst", 7, None, ""]}, {"analyst"}),
        ("realm_access.roles", {"realm_access": "analyst"}, set()),
        ("roles", {}, set()),
    ],
    ids=["keycloak", "cognito", "string", "auth0-url", "non-strings", "not-an-object", "absent"],
)
async def test_roles_from_nested_claims(server, roles_claim, claims, roles):
    auth = Authenticator(_settings(server, roles_claim=roles_claim))
    try:
        credentials = await _verify(auth, server.keys[0].sign(server.claims(**claims)))
        assert credentials.identity.roles == roles
        assert credentials.identity.admin == ("admin" in roles)
    finally:
        await auth.aclose()


async def test_user_and_email_claims_by_settings_and_an_audience_claim_for_cognito(server):
    auth = Authenticator(
        _settings(server, user_id_claim="username", email_claim="profile.mail", oidc_audience_claim="client_id")
    )
    try:
        claims = server.claims(aud=None, client_id=AUDIENCE, username="ann", profile={"mail": "ann@example.com"})
        credentials = await _verify(auth, server.keys[0].sign(claims))
        assert credentials.owner.id == "ann" and credentials.owner.email == "ann@example.com"
        assert "not meant for Dataport" in await _refused(
            auth, server.keys[0].sign(server.claims(client_id="another-app", username="ann"))
        )
    finally:
        await auth.aclose()


async def test_hs256_tokens_keep_working_and_can_be_turned_off(server, auth):
    settings = _settings(server)
    token = issue_token(settings, "dev-user", "d@example.com", roles=["analyst"], claims={"org": "acme"})
    credentials = await _verify(auth, token)
    assert credentials.owner.id == "dev-user" and credentials.identity.roles == {"analyst"}
    assert credentials.identity.claim("org") == "acme"
    assert "not valid" in await _refused(
        auth, jwt.encode(server.claims(), "another-secret-as-long-as-the-right-one-is-long", algorithm="HS256")
    )
    off = Authenticator(_settings(server, local_tokens=False))
    try:
        assert "RS256, ES256" in await _refused(off, token)
    finally:
        await off.aclose()


async def test_without_an_issuer_only_hs256_is_accepted(server):
    auth = Authenticator(Settings(jwt_secret=SECRET))
    assert "HS256" in await _refused(auth, server.keys[0].sign(server.claims()))
    await _verify(auth, issue_token(Settings(jwt_secret=SECRET), "u"))


def test_an_issuer_without_an_audience_is_refused_at_start():
    with pytest.raises(ValueError, match="DATAPORT_OIDC_AUDIENCE"):
        Settings(oidc_issuer="https://idp.example.com")
