"""Identity-provider tokens end to end: a real OpenID provider (npm's oidc-provider, tests/oidc)
issues JWT access tokens, and one token works the same over HTTP GraphQL, a WebSocket's
``connection_init`` and the streaming route; HS256 tokens keep working beside them; and
``dataport token --role --claim`` and a token file reach the api as the CLI's users send them."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jwt
import pytest
import websockets

from api.app import create_app
from dataport.settings import Settings
from tests.client import Api
from tests.fixtures.oidc import AUDIENCE, WEB_CLIENT_ID

DATASETS = "{ datasets { name } }"


def _names(api: Api) -> set[str]:
    return {d["name"] for d in api.data(DATASETS)["datasets"]}


async def _init(stack, token: str) -> tuple[str | None, int | None]:
    """connection_init with ``token``: the first message's type, and the close code if closed."""
    url = stack.url.replace("http", "ws", 1) + "/graphql"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"], open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
        try:
            return json.loads(await ws.recv())["type"], None
        except websockets.ConnectionClosed as e:
            return None, e.rcvd.code if e.rcvd else None


def _stream(stack, token: str) -> httpx.Response:
    params = {"dataset": "samples", "format": "csv", "limit": "5"}
    return httpx.get(
        f"{stack.url}/exports/stream", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


@pytest.mark.parametrize("client", ["analyst", "es-analyst"])
async def test_a_provider_token_works_over_http_websockets_and_the_stream(oidc_stack, oidc_provider, client):
    token = oidc_provider.token(client)
    assert jwt.get_unverified_header(token)["alg"] == ("ES256" if client.startswith("es") else "RS256")
    api = Api(oidc_stack.url, token)
    assert _names(api) == {"samples", "analysts_only"}  # the analyst role, from realm_access.roles
    assert api.data('{ exportTask(id: "no-such-task") { id } }') == {"exportTask": None}
    assert await _init(oidc_stack, token) == ("connection_ack", None)
    streamed = _stream(oidc_stack, token)
    assert streamed.status_code == 200, streamed.text
    assert len(streamed.text.strip().splitlines()) == 6  # header and five rows


async def test_a_token_without_the_role_sees_only_what_everyone_may(oidc_stack, oidc_provider):
    assert _names(Api(oidc_stack.url, oidc_provider.token("nobody"))) == {"samples"}


async def test_a_tampered_provider_token_is_refused_on_every_path(oidc_stack, oidc_provider):
    head, body, signature = oidc_provider.token("analyst").split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["sub"] = "someone-else"
    forged = f"{head}.{jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()}.{signature}"
    errors = Api(oidc_stack.url, forged).gql(DATASETS)["errors"]
    assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert "signature" in errors[0]["message"]
    assert await _init(oidc_stack, forged) == (None, 4401)
    refused = _stream(oidc_stack, forged)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED"


async def test_hs256_tokens_work_beside_the_providers(oidc_stack):
    token = oidc_stack.token("local-user")
    assert _names(Api(oidc_stack.url, token)) == {"samples"}
    assert await _init(oidc_stack, token) == ("connection_ack", None)
    assert _stream(oidc_stack, token).status_code == 200


async def test_auth_config_advertises_the_provider(oidc_stack, oidc_provider):
    async with httpx.AsyncClient(timeout=30) as client:
        config = (await client.get(f"{oidc_stack.url}/auth/config")).json()
    assert config == {
        "issuer": oidc_provider.issuer,
        "clientId": WEB_CLIENT_ID,
        "audience": AUDIENCE,
        "scopes": "openid profile email",
    }
    app = create_app(Settings(jwt_secret="not-used-here"))  # no provider configured; no lifespan needed
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as client:
        none = (await client.get("/auth/config")).json()
    assert none == {"issuer": None, "clientId": None, "audience": None, "scopes": None}


def _dataport(stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataport.cli", *args],
        env={**stack.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dataport_token_roles_and_claims_round_trip(oidc_stack):
    made = _dataport(
        oidc_stack,
        "token",
        "carol",
        "--email",
        "c@example.com",
        "--role",
        "analyst",
        "--role",
        "editor",
        "--claim",
        "org=acme",
        "--claim",
        "org_id=42",
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    claims = jwt.decode(token, oidc_stack.settings.signing_secret, algorithms=["HS256"], issuer="dataport")
    assert claims["realm_access"] == {"roles": ["analyst", "editor"]}  # where DATAPORT_ROLES_CLAIM points
    assert (claims["org"], claims["org_id"], claims["email"]) == ("acme", 42, "c@example.com")
    assert _names(Api(oidc_stack.url, token)) == {"samples", "analysts_only"}
    bad = _dataport(oidc_stack, "token", "carol", "--claim", "exp=1")
    assert bad.returncode == 2 and "set by the command" in bad.stderr


def test_the_cli_exports_with_a_provider_token_from_a_file(oidc_stack, oidc_provider, tmp_path):
    worker = oidc_stack.start_worker()
    try:
        token_file = tmp_path / "token"
        token_file.write_text(oidc_provider.token("analyst") + "\n")
        out = tmp_path / "out.csv"
        done = _dataport(
            oidc_stack,
            "export",
            "analysts_only",
            "--limit",
            "7",
            "--out",
            str(out),
            DATAPORT_URL=oidc_stack.url,
            DATAPORT_TOKEN_FILE=str(token_file),
        )
        assert done.returncode == 0, done.stderr
        assert len(out.read_text().strip().splitlines()) == 8
        token_file.write_text("")
        empty = _dataport(oidc_stack, "export", "samples", "--token-file", str(token_file))
        assert empty.returncode == 2 and "is empty" in empty.stderr
    finally:
        oidc_stack.stop_workers()
        assert worker.poll() is not None
