"""Hostile requests to the GraphQL api (issue 15: GraphQL limits, request bodies, WebSockets): real
api processes, real Redis. Every refusal is asserted by its exact code and HTTP status or close
code, refusals change nothing, the event loop keeps answering, and the api log has no traceback."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from api.auth import issue_token
from dataport.net import free_port, wait_for_port
from dataport.processes import stop
from tests.client import Api
from tests.fixtures.stack import Stack, _stack

MiB = 1024 * 1024
TRANSPORT, LEGACY = "graphql-transport-ws", "graphql-ws"
EXPORT = 'requestExport(input: {dataset: "special", format: CSV}) { task { id } userErrors { code } }'


# -- helpers ------------------------------------------------------------------------------------


def post(stack: Stack, body: bytes | str, token: str | None = None, **headers: str) -> httpx.Response:
    headers = {"content-type": "application/json", **headers}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(f"{stack.url}/graphql", content=body, headers=headers, timeout=60)


def gql(stack: Stack, query: str, token: str | None = None, variables: dict | None = None, **headers: str):
    return post(stack, json.dumps({"query": query, "variables": variables or {}}), token, **headers)


def top_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body.get("errors"), body
    return body["errors"][0]


def code_of(response: httpx.Response) -> str:
    return top_error(response)["extensions"]["code"]


def export_count(stack: Stack, token: str) -> int:
    body = gql(stack, "{ exportTasks { totalCount } }", token).json()
    return body["data"]["exportTasks"]["totalCount"]


def ws_url(stack: Stack) -> str:
    return stack.url.replace("http", "ws", 1) + "/graphql"


async def refused_init(stack: Stack, protocol: str, payload: Any, within: float = 5) -> tuple[int, list[dict]]:
    """Send connection_init with ``payload``; the close code and every message before the close."""
    received = []
    async with asyncio.timeout(within), websockets.connect(ws_url(stack), subprotocols=[protocol]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        try:
            async for raw in ws:
                received.append(json.loads(raw))
        except ConnectionClosed:
            pass
        return ws.close_code, received


async def close_code_after(
    stack: Stack, protocol: str, token: str | None, *raw_messages: str | bytes, within: float = 5
) -> tuple[int, list[dict]]:
    """Connect (with a token when given), send the raw messages, and wait for the close."""
    received = []
    async with asyncio.timeout(within), websockets.connect(ws_url(stack), subprotocols=[protocol], max_size=None) as ws:
        if token:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
        for raw in raw_messages:
            try:
                await ws.send(raw)
            except ConnectionClosed:  # the api may close (1009) while a big message is still going out
                break
        try:
            async for message in ws:
                received.append(json.loads(message))
        except ConnectionClosed:
            pass
        return ws.close_code, received


def tracebacks(stack: Stack) -> list[str]:
    log = (stack.data_dir / "api.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "Traceback" in line]


@pytest.fixture(scope="module")
def token(local_stack) -> str:
    return local_stack.token(f"hostile-{uuid.uuid4().hex[:8]}")


# -- GraphQL document limits -----------------------------------------------------------------------


def test_900_aliased_request_exports_are_refused_and_queue_nothing(local_stack):
    user = local_stack.token(f"aliases-{uuid.uuid4().hex[:8]}")
    query = "mutation {" + " ".join(f"e{i}: {EXPORT}" for i in range(900)) + "}"
    response = gql(local_stack, query, user)
    assert response.status_code == 200
    error = top_error(response)
    assert error["extensions"] == {"code": "QUERY_TOO_COMPLEX", "limit": 5000}  # 900 of them pass 5,000 tokens
    assert response.json()["data"] is None
    # Within the token budget the alias limit refuses: 21 aliased mutations, nothing queued either.
    query = "mutation {" + " ".join(f"e{i}: {EXPORT}" for i in range(21)) + "}"
    assert top_error(gql(local_stack, query, user))["extensions"] == {"code": "QUERY_TOO_COMPLEX", "limit": 20}
    assert export_count(local_stack, user) == 0


def test_a_thousand_aliases_are_refused_not_a_recursion_error(local_stack, token):
    response = gql(local_stack, "{" + " ".join(f"a{i}: __typename" for i in range(1000)) + "}", token)
    assert response.status_code == 200
    assert code_of(response) == "QUERY_TOO_COMPLEX"
    assert "recursion" not in response.text
    response = gql(local_stack, "{" + " ".join(f"a{i}: __typename" for i in range(20)) + "}", token)
    assert response.json()["data"]["a19"] == "Query", "20 aliases are allowed"


def test_depth_over_twelve_is_refused(local_stack, token):
    # Selections on a leaf are invalid anyway; the depth check runs first, before validation.
    nested = "datasets { " * 12 + "name" + " }" * 12
    response = gql(local_stack, "{ " + nested + " }", token)
    assert (response.status_code, top_error(response)["extensions"]) == (
        200,
        {"code": "QUERY_TOO_COMPLEX", "limit": 12},
    )
    assert "13 deep" in top_error(response)["message"]
    deep_ok = "{ exportTasks { edges { node { progress { processedRows } } } } }"
    assert "errors" not in gql(local_stack, deep_ok, token).json()


def test_a_doubling_fragment_chain_is_refused_in_linear_time(local_stack, token):
    fragments = ["fragment F0 on Query { __typename }"]
    fragments += [f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, 40)]
    started = time.monotonic()
    response = gql(local_stack, " ".join(fragments) + " { ...F39 }", token)
    assert time.monotonic() - started < 2  # Strawberry's own depth/alias limiters take 2^39 steps here
    assert (response.status_code, code_of(response)) == (200, "QUERY_TOO_COMPLEX")
    assert "fields" in top_error(response)["message"]


def test_too_many_fields_operations_and_nesting_are_refused(local_stack, token):
    fields = "{" + " datasets { name }" * 151 + " }"  # 302 fields, no aliases: the overlap check's worst
    operations = " ".join(f"query Q{i} {{ __typename }}" for i in range(6))
    nested = "{a" * 300 + "}" * 300
    for query, limit in ((fields, 300), (operations, 5), (nested, 200)):
        response = gql(local_stack, query, token)
        assert (response.status_code, top_error(response)["extensions"]) == (
            200,
            {"code": "QUERY_TOO_COMPLEX", "limit": limit},
        ), query[:40]


def test_graphql_response_json_clients_get_400_for_a_refused_document(local_stack, token):
    accept = "application/graphql-response+json, application/json;q=0.9"
    response = gql(local_stack, "{" + " ".join(f"a{i}: __typename" for i in range(30)) + "}", token, accept=accept)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/graphql-response+json")
    assert "data" not in response.json() and code_of(response) == "QUERY_TOO_COMPLEX"
    fine = gql(local_stack, "{ __typename }", token, accept=accept)
    assert (fine.status_code, fine.json()) == (200, {"data": {"__typename": "Query"}})


# -- anonymous requests --------------------------------------------------------------------------


def test_anonymous_requests_get_a_small_budget_and_can_still_introspect(local_stack):
    from graphql import get_introspection_query

    introspection = gql(local_stack, get_introspection_query(descriptions=True))
    assert introspection.status_code == 200 and introspection.json()["data"]["__schema"]["queryType"]

    aliased = gql(local_stack, "{ a: __schema { types { name } } b: __schema { types { name } } }")
    assert (aliased.status_code, top_error(aliased)["extensions"]) == (200, {"code": "QUERY_TOO_COMPLEX", "limit": 0})
    assert "sign in" in top_error(aliased)["message"]
    many_tokens = gql(local_stack, "{" + " __typename" * 1_200 + " }")  # 1,200 tokens: over 1,000, under 16 KiB
    assert (many_tokens.status_code, top_error(many_tokens)["extensions"]) == (
        200,
        {"code": "QUERY_TOO_COMPLEX", "limit": 1000},
    )
    unauthenticated = gql(local_stack, "{ datasets { name } }")
    assert code_of(unauthenticated) == "UNAUTHENTICATED"


def test_a_large_anonymous_query_is_refused_at_once_and_healthz_keeps_answering(local_stack):
    query = "{" + " ".join(f"s{i}: __schema {{ types {{ name fields {{ name }} }} }}" for i in range(17_000)) + "}"
    body = json.dumps({"query": query}).encode()
    assert 0.75 * MiB < len(body) < MiB

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def health() -> float:
                started = time.monotonic()
                assert (await client.get(f"{local_stack.url}/healthz")).status_code == 200
                return time.monotonic() - started

            attacks = [
                client.post(f"{local_stack.url}/graphql", content=body, headers={"content-type": "application/json"})
                for _ in range(20)
            ]
            results = await asyncio.gather(*attacks, *(health() for _ in range(5)))
            return results[:20], results[20:]

    started = time.monotonic()
    responses, health_times = asyncio.run(scenario())
    assert time.monotonic() - started < 10
    assert {(r.status_code, code_of(r)) for r in responses} == {(413, "PAYLOAD_TOO_LARGE")}
    assert top_error(responses[0])["extensions"]["limit"] == 16 * 1024
    assert max(health_times) < 1.0, health_times


def test_a_large_signed_in_query_is_cut_off_by_the_token_limit_without_blocking(local_stack, token):
    query = "{" + " ".join(f"s{i}: __schema {{ types {{ name }} }}" for i in range(25_000)) + "}"
    assert 0.75 * MiB < len(query) < MiB
    started = time.monotonic()
    response = gql(local_stack, query, token)
    assert time.monotonic() - started < 1.5
    assert (response.status_code, top_error(response)["extensions"]) == (
        200,
        {"code": "QUERY_TOO_COMPLEX", "limit": 5000},
    )


# -- request bodies ------------------------------------------------------------------------------


async def _raw_post(stack: Stack, headers: str, chunks: Iterator[bytes]) -> tuple[bytes | None, int]:
    """Send a request over a raw socket while reading; the response (None if the server reset the
    connection while the body was still coming), and how many body bytes had been sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(headers.encode())
    sent = 0

    async def send_body() -> None:
        nonlocal sent
        for chunk in chunks:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        async with asyncio.timeout(10):
            head = await reader.read()  # the refusal closes the connection
    except ConnectionResetError:
        head = None
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return head, sent


def _chunked(size: int, count: int) -> Iterator[bytes]:
    chunk = b" " * size
    for _ in range(count):
        yield f"{size:x}\r\n".encode() + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def test_a_100_mb_body_without_a_token_is_refused_before_a_byte_of_it_is_read(local_stack):
    headers = (
        f"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {100 * MiB}\r\n\r\n"
    )
    started = time.monotonic()
    head, _ = asyncio.run(_raw_post(local_stack, headers, iter(())))  # the headers alone get the answer
    assert time.monotonic() - started < 2
    assert head is not None and head.startswith(b"HTTP/1.1 413"), head
    assert b'"PAYLOAD_TOO_LARGE"' in head and b"connection: close" in head.lower()


def test_a_chunked_body_over_a_mebibyte_is_refused_while_it_streams(local_stack, token):
    headers = (
        f"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    # 4 MiB, sent whole before reading as most clients do: read and dropped, then a clean 413.
    head, _ = asyncio.run(_raw_post(local_stack, headers, _chunked(65536, 64)))
    assert head is not None and head.startswith(b"HTTP/1.1 413"), head
    assert b'"limit":1048576' in head
    # An endless body: the server stops after 8 MiB (a 413, or a reset if the client is still sending).
    started = time.monotonic()
    head, sent = asyncio.run(_raw_post(local_stack, headers, _chunked(65536, 1_000_000)))
    assert head is None or head.startswith(b"HTTP/1.1 413"), head
    assert sent < 40 * MiB and time.monotonic() - started < 10, sent


def test_a_signed_in_body_under_a_mebibyte_is_served(local_stack, token):
    query = "query($x: String!) { __type(name: $x) { name } }"
    response = gql(local_stack, query, token, variables={"x": "y" * 900_000})
    assert response.status_code == 200 and response.json() == {"data": {"__type": None}}
    over = gql(local_stack, query, token, variables={"x": "y" * MiB})
    assert (over.status_code, code_of(over)) == (413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'"just a string"', id="json-string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"42", id="number"),
        pytest.param(b'{"query": "{ __typename }"\xff\xfe}', id="not-utf8"),
        pytest.param(b"\xff\xfe\x00{", id="binary"),
        pytest.param(b"1" * 4301, id="4301-digits"),
        pytest.param(
            b'{"query": "{ __typename }", "variables": {"n": ' + b"9" * 4301 + b"}}", id="4301-digit-variable"
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100k"),
        pytest.param(
            b'{"query": "{ __typename }", "variables": {"v": ' + b"[" * 100 + b"]" * 100 + b"}}",
            id="variables-nested-100",
        ),
        pytest.param(b'{"query": "{ __typename }", "variables": {"s": "\\ud800"}}', id="lone-surrogate"),
        pytest.param(b'[{"query": "{ __typename }"}, {"query": "{ __typename }"}]', id="batch"),
        pytest.param(b'{"query": 42}', id="query-not-a-string"),
        pytest.param(b'{"query": "{ __typename }", "operationName": 7}', id="operation-name-not-a-string"),
        pytest.param(b'{"query": "{ __typename }", "variables": [1]}', id="variables-a-list"),
        pytest.param(b'{"variables": {}}', id="no-query"),
        pytest.param(b"{", id="truncated"),
    ],
)
def test_bodies_that_are_not_graphql_requests_get_400(local_stack, token, body):
    response = post(local_stack, body, token)
    assert response.status_code == 400, response.text
    assert code_of(response) == "BAD_REQUEST"
    assert "Internal" not in response.text and "Traceback" not in response.text


def test_other_transport_refusals_are_coded_too(local_stack, token):
    text = post(local_stack, b"{ __typename }", token, **{"content-type": "text/plain"})
    assert (text.status_code, code_of(text)) == (400, "BAD_REQUEST")
    mutation_over_get = httpx.get(
        f"{local_stack.url}/graphql",
        params={"query": f"mutation {{ {EXPORT} }}"},
        headers={"authorization": f"Bearer {token}", "accept": "application/json"},
    )
    assert (mutation_over_get.status_code, code_of(mutation_over_get)) == (400, "BAD_REQUEST")
    long_get = httpx.get(
        f"{local_stack.url}/graphql",
        params={"query": "{" + " __typename" * 2000 + "}"},
        headers={"accept": "application/json"},
    )
    assert (long_get.status_code, code_of(long_get)) == (413, "PAYLOAD_TOO_LARGE")


# -- WebSockets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"authorization": "Bearer not-a-jwt"}, id="bad-token"),
        pytest.param({"authorization": 12345}, id="number"),
        pytest.param({"authorization": {"Bearer": "x"}}, id="object"),
        pytest.param({"authorization": ["Bearer", "x"]}, id="list"),
        pytest.param({"authorization": True}, id="true"),
    ],
)
@pytest.mark.parametrize("protocol", [TRANSPORT, LEGACY])
async def test_connection_init_without_a_valid_token_gets_no_ack_and_4401(local_stack, protocol, payload):
    code, received = await refused_init(local_stack, protocol, payload)
    assert code == 4401
    assert all(m["type"] != "connection_ack" for m in received)
    if protocol == LEGACY:
        assert received[0]["type"] == "connection_error"
        assert received[0]["payload"]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_an_expired_token_gets_no_ack(local_stack):
    expired = issue_token(local_stack.settings, "expired-user", ttl=-60)
    code, received = await refused_init(local_stack, TRANSPORT, {"authorization": f"Bearer {expired}"})
    assert code == 4401 and received == []


async def test_a_thousand_anonymous_sockets_are_all_closed(local_stack):
    async def one() -> int:
        code, received = await refused_init(local_stack, TRANSPORT, {}, within=30)
        assert received == []
        return code

    started = time.monotonic()
    codes = []
    for _ in range(5):  # 5 x 200 at once: the client's own file-descriptor limit stays comfortable
        codes += await asyncio.gather(*(one() for _ in range(200)))
    assert codes == [4401] * 1000
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "raw, code",
    [
        pytest.param('"hello"', 4400, id="a-string"),
        pytest.param("[1, 2]", 4400, id="a-list"),
        pytest.param('{"type": 7}', 4400, id="type-not-a-string"),
        pytest.param('{"type": "subscribe", "id": "1"}', 4400, id="subscribe-without-payload"),
        pytest.param('{"type": "subscribe", "id": 1, "payload": {"query": "{ __typename }"}}', 4400, id="id-a-number"),
        pytest.param('{"type": "subscribe", "id": "1", "payload": {"query": ["x"]}}', 4400, id="query-a-list"),
        pytest.param(
            '{"type": "subscribe", "id": "1", "payload": {"query": "{ __typename }", "variables": 3}}',
            4400,
            id="variables-a-number",
        ),
        pytest.param("{not json", 4400, id="not-json"),
        pytest.param(b"\x00\x01binary", 4400, id="binary"),
        pytest.param(json.dumps({"type": "ping", "payload": {"x": "y" * (2 * MiB)}}), 1009, id="2-mib-message"),
    ],
)
async def test_malformed_websocket_messages_close_the_socket(local_stack, token, raw, code):
    closed, _ = await close_code_after(local_stack, TRANSPORT, token, raw)
    assert closed == code


async def test_an_oversized_connection_init_is_refused_before_the_ack(local_stack):
    big = json.dumps({"type": "connection_init", "payload": {"padding": "x" * 20_000}})
    closed, received = await close_code_after(local_stack, TRANSPORT, None, big)
    assert closed == 1009 and received == []


async def test_legacy_malformed_start_closes_the_socket(local_stack, token):
    closed, _ = await close_code_after(local_stack, LEGACY, token, '{"type": "start", "id": "1", "payload": 5}')
    assert closed == 4400


async def test_a_subscription_ends_with_unauthenticated_when_its_token_expires(local_stack):
    user = f"expiring-{uuid.uuid4().hex[:8]}"
    api = Api(local_stack.url, local_stack.token(user))
    task = _waiting_import(api)  # waits for its upload: a subscription to it stays open
    short = issue_token(local_stack.settings, user, ttl=3)
    expires_at = time.time() + 3
    messages, code = await _follow(local_stack, short, task, within=15)
    ended = time.time()
    assert (
        messages[0]["type"] == "next"
        and messages[0]["payload"]["data"]["importProgress"]["status"] == "WAITING_FOR_UPLOAD"
    )
    errors = [e for m in messages if m["type"] == "next" for e in m["payload"].get("errors") or []]
    assert [e["extensions"]["code"] for e in errors] == ["UNAUTHENTICATED"]
    assert messages[-1]["type"] == "complete"
    assert expires_at - 1 < ended < expires_at + 2.5, (expires_at, ended)
    assert code == 4401  # and then the socket, whose token it was, is closed


def _waiting_import(api: Api) -> str:
    payload = api.request_import(dataset="imp_sqlite", format="CSV", fileName="rows.csv")
    assert payload["userErrors"] == [], payload
    return payload["task"]["id"]


IMPORT_SUBSCRIPTION = "subscription($id: ID!) { importProgress(id: $id) { status } }"


async def _follow(stack: Stack, token: str, task_id: str, within: float) -> tuple[list[dict], int | None]:
    """One importProgress subscription until the socket closes; its messages and the close code."""
    messages: list[dict] = []
    async with asyncio.timeout(within), websockets.connect(ws_url(stack), subprotocols=[TRANSPORT]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": IMPORT_SUBSCRIPTION, "variables": {"id": task_id}},
                }
            )
        )
        try:
            async for raw in ws:
                messages.append(json.loads(raw))
        except ConnectionClosed:
            pass
        return messages, ws.close_code


# -- the per-user subscription cap, across api processes -------------------------------------------

CAP = 3
LEASE = 3.0


@pytest.fixture(scope="module")
def capped_stack(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    """A stack of its own (no worker: imports wait for their upload) with a cap of 3 subscriptions
    per user and 3-second leases, so the cap and a killed process's lapse are quick to see."""
    yield from _stack(
        "capped",
        tmp_path_factory,
        redis_url,
        test_data,
        {
            "DATAPORT_STORAGE": "local",
            "DATAPORT_MAX_SUBSCRIPTIONS_PER_USER": str(CAP),
            "DATAPORT_SUBSCRIPTION_LEASE_SECONDS": str(LEASE),
        },
        workers=0,
    )


class Subscriber:
    """One socket holding subscriptions to one task."""

    def __init__(self, url: str, token: str, task_id: str):
        self.url, self.token, self.task_id = url, token, task_id
        self.next_id = 0

    async def __aenter__(self) -> Subscriber:
        self.ws = await websockets.connect(self.url.replace("http", "ws", 1) + "/graphql", subprotocols=[TRANSPORT])
        await self.ws.send(
            json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {self.token}"}})
        )
        assert json.loads(await self.ws.recv())["type"] == "connection_ack"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def subscribe(self) -> tuple[str, dict]:
        """Start one more; its id and first message (the snapshot, or the refusal)."""
        self.next_id += 1
        op = str(self.next_id)
        await self.ws.send(
            json.dumps(
                {
                    "id": op,
                    "type": "subscribe",
                    "payload": {"query": IMPORT_SUBSCRIPTION, "variables": {"id": self.task_id}},
                }
            )
        )
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == op:
                    return op, message

    async def end(self, op: str) -> None:
        await self.ws.send(json.dumps({"id": op, "type": "complete"}))


def _refusal(message: dict) -> str | None:
    errors = message["payload"] if message["type"] == "error" else message["payload"].get("errors")
    return errors[0]["extensions"]["code"] if errors else None


async def test_the_subscription_cap_holds_across_sockets_and_api_processes(capped_stack):
    user = f"subscriber-{uuid.uuid4().hex[:8]}"
    token = capped_stack.token(user)
    task_id = _waiting_import(Api(capped_stack.url, token))
    second_port = free_port()
    second_api = capped_stack._spawn("api", "--port", str(second_port), log="api-2.log")
    try:
        wait_for_port("127.0.0.1", second_port, timeout=30)
        second_url = f"http://127.0.0.1:{second_port}"
        async with (
            Subscriber(capped_stack.url, token, task_id) as first,
            Subscriber(second_url, token, task_id) as other,
        ):
            held = [await first.subscribe(), await first.subscribe(), await other.subscribe()]
            assert [_refusal(m) for _, m in held] == [None, None, None]
            for socket in (first, other):  # the fourth is refused, whichever process it comes to
                _, refused = await socket.subscribe()
                assert _refusal(refused) == "QUOTA_EXCEEDED"
                errors = refused["payload"] if refused["type"] == "error" else refused["payload"]["errors"]
                assert errors[0]["extensions"]["limit"] == CAP
            await first.end(held[0][0])
            await asyncio.sleep(0.3)
            _, again = await first.subscribe()
            assert _refusal(again) is None, "ending one frees its slot"
            # Another user is not affected by this one's cap.
            stranger = capped_stack.token(f"stranger-{uuid.uuid4().hex[:8]}")
            stranger_task = _waiting_import(Api(capped_stack.url, stranger))
            async with Subscriber(capped_stack.url, stranger, stranger_task) as theirs:
                assert _refusal((await theirs.subscribe())[1]) is None

            # The second process dies holding a slot: it lapses with its lease, within LEASE seconds.
            capped_stack.kill(second_api)
            _, full = await first.subscribe()
            assert _refusal(full) == "QUOTA_EXCEEDED"
            await asyncio.sleep(LEASE + 0.5)
            _, freed = await first.subscribe()
            assert _refusal(freed) is None
    finally:
        stop(second_api)
    assert not tracebacks(capped_stack)


# -- logs ----------------------------------------------------------------------------------------


def test_refused_input_left_no_traceback_in_the_api_log(local_stack):
    """Runs after the tests above (file order): none of their refusals logged a traceback."""
    assert local_stack.data_dir.joinpath("api.log").exists()
    assert tracebacks(local_stack) == []
