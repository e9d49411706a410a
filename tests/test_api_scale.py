"""Several api processes on one port, the cheap request path and admission control (issue 19,
items 4 and 5): real ``dataport api`` processes on the real Redis, and the middleware and caches
in-process where the order of events must be chosen by the test.

Run: ``python -m pytest tests/test_api_scale.py -q`` (needs the test servers of tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest
import redis.asyncio
from starlette.responses import Response

from api import token_cache
from api.admission import Admission
from api.app import create_app
from api.auth import Authenticator, AuthError, issue_token
from api.graphql_cache import DOCUMENTS
from api.graphql_limits import DEFAULT_LIMITS, QueryLimits
from api.graphql_view import GraphQLHTTP, GraphQLView
from dataport.settings import Settings
from schema import schema
from sources.registry import load_registry
from tasks import queue
from tasks.services import Services
from tests.fixtures.stack import Stack, _stack

READ = "query($id: ID!) { exportTask(id: $id) { id status } }"
POLL = "query($id: ID!) { exportTask(id: $id) { id pollAfterSeconds } }"
REQUEST = """mutation($input: ExportInput!) { requestExport(input: $input) {
  task { id } userErrors { code message } } }"""
# What a polling page asks for (bench/api_load.py's READ): the task, its place in the queue and the
# poll hint, answered in one round trip to Redis (tasks/reads.py).
FULL_POLL = """query($id: ID!) { exportTask(id: $id) { id status dataset format run queuePosition
  pollAfterSeconds rowCount fileSize downloadUrl createdAt startedAt finishedAt expiresAt
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds } error { code message } } }"""
POSITION = "query($id: ID!) { exportTask(id: $id) { queuePosition } }"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    """``dataport api`` with DATAPORT_API_WORKERS=2, no worker: tasks stay PENDING."""
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_API_WORKERS": "2"}
    yield from _stack("scale", tmp_path_factory, redis_url, test_data, extra, workers=0)


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    """One request in flight at a time and no waiting: every overlap is refused."""
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_API_MAX_IN_FLIGHT": "1", "DATAPORT_API_QUEUE_SECONDS": "0"}
    yield from _stack("admission", tmp_path_factory, redis_url, test_data, extra, workers=0)


def _gql(client: httpx.Client, token: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/graphql", json={"query": query, "variables": variables}, headers=_auth(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body.get("errors"), body
    return body["data"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _export_input(sample: int) -> dict[str, Any]:
    return {"input": {"dataset": "samples", "filters": [{"field": "sample_id", "op": "EQ", "value": sample}]}}


def _export(client: httpx.Client, token: str, sample: int = 1) -> str:
    payload = _gql(client, token, REQUEST, _export_input(sample))["requestExport"]
    assert not payload["userErrors"], payload
    return payload["task"]["id"]


def _pinned(stack: Stack) -> tuple[httpx.Client, int]:
    """A client on one kept-alive connection, so every request of it reaches the same process; and
    that process's pid."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    client = httpx.Client(base_url=stack.url, limits=limits, timeout=30)
    return client, client.get("/healthz").json()["pid"]


# --- several processes -------------------------------------------------------------------------


def test_two_api_processes_serve_one_port_and_share_tasks(two_processes):
    clients: dict[int, httpx.Client] = {}
    deadline = time.monotonic() + 60
    try:
        while len(clients) < 2:  # the kernel gives each new connection to either process
            assert time.monotonic() < deadline, f"only process {list(clients)} ever answered"
            client, pid = _pinned(two_processes)
            if pid in clients:
                client.close()
                time.sleep(0.02)
            else:
                clients[pid] = client
        (pid_a, a), (pid_b, b) = clients.items()
        supervisor = psutil.Process(two_processes.processes[0].pid)
        assert {pid_a, pid_b} <= {child.pid for child in supervisor.children()}

        token = two_processes.token(f"user-{uuid.uuid4().hex[:8]}")
        task_id = _export(a, token)
        assert _gql(b, token, READ, {"id": task_id})["exportTask"] == {"id": task_id, "status": "PENDING"}
        # Asked again through the other process: the same task (the ids and the store are shared).
        assert _export(b, token) == task_id
        assert [c.get("/healthz").json()["pid"] for c in (a, b)] == [pid_a, pid_b]
    finally:
        for client in clients.values():
            client.close()


def test_a_poll_is_counted_once_with_the_read_and_only_when_asked_for(two_processes):
    token, other = (two_processes.token(f"user-{uuid.uuid4().hex[:8]}") for _ in range(2))
    with httpx.Client(base_url=two_processes.url, timeout=30) as client:
        task_id = _export(client, token, sample=7)
        for _ in range(2):  # reads without pollAfterSeconds count nothing
            _gql(client, token, READ, {"id": task_id})
        # Another user's read is refused as a missing task and counts nothing either.
        assert _gql(client, other, POLL, {"id": task_id})["exportTask"] is None
        hints = [_gql(client, token, POLL, {"id": task_id})["exportTask"]["pollAfterSeconds"] for _ in range(3)]
    base = Settings().poll_base_seconds
    assert hints == pytest.approx([base, base + 0.693, base + 2 * 0.693], abs=0.01)


async def test_a_polled_read_is_one_round_trip_to_redis_and_answers_as_the_queue_does(two_processes, redis_url):
    token = two_processes.token(f"user-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=two_processes.url, timeout=30) as client:
        task_id = _export(client, token, sample=11)
        for _ in range(2):  # each process loads the script once (EVALSHA's first NOSCRIPT)
            _gql(client, token, FULL_POLL, {"id": task_id})
    commands: list[str] = []
    async with redis.asyncio.Redis.from_url(redis_url) as monitoring, redis.asyncio.Redis.from_url(redis_url) as r:
        async with monitoring.monitor() as monitor:

            async def listen() -> None:
                while True:
                    command = await monitor.next_command()
                    if command["client_type"] != "lua":  # not the commands the scripts run inside
                        commands.append(command["command"])
                    if "poll-read-done" in command["command"]:
                        return

            listener = asyncio.create_task(listen())
            async with httpx.AsyncClient(base_url=two_processes.url, timeout=30) as client:
                body = {"query": FULL_POLL, "variables": {"id": task_id}}
                response = await client.post("/graphql", json=body, headers=_auth(token))
            await r.echo("poll-read-done")
            await asyncio.wait_for(listener, 10)
        read = response.json()["data"]["exportTask"]
        mine = [command for command in commands if task_id in command]
        assert len(mine) == 1 and mine[0].startswith("EVALSHA"), mine  # was the read's script, then the queue's
        # The position it answered is the queue's own answer, and a read of the position alone agrees.
        job = f"export:{task_id}:{read['run']}"
        assert read["queuePosition"] == await queue.position(r, two_processes.env["DATAPORT_QUEUE_NAME"], job)
    with httpx.Client(base_url=two_processes.url, timeout=30) as client:
        assert _gql(client, token, POSITION, {"id": task_id})["exportTask"]["queuePosition"] == read["queuePosition"]
    assert read["status"] == "PENDING" and read["queuePosition"] >= 1 and read["pollAfterSeconds"] > 0


def test_at_warning_level_the_api_writes_no_access_line(tmp_path_factory, redis_url, test_data):
    """DATAPORT_LOG_LEVEL is the level of uvicorn's loggers too: at WARNING, no line per request."""
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_LOG_LEVEL": "WARNING"}
    stacks = _stack("quiet", tmp_path_factory, redis_url, test_data, extra, workers=0)
    stack = next(stacks)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
            _export(client, stack.token(f"user-{uuid.uuid4().hex[:8]}"))
    finally:
        with contextlib.suppress(StopIteration):
            next(stacks)  # stops the api: its log is complete
    lines = [json.loads(line) for line in (stack.data_dir / "api.log").read_text().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["logger"] == "uvicorn.access"]
    assert all(line["level"] in ("WARNING", "ERROR", "CRITICAL") for line in lines)


# --- no reference cycles on the request path ----------------------------------------------------

# The packages a request passes through; an object of theirs found by the cyclic collector is a
# cycle the request path made (reference counting would have freed it at once otherwise).
REQUEST_PATH = {"api", "audit", "fastapi", "graphql", "resolvers", "schema", "starlette", "strawberry", "tasks"}


async def _http(
    app: Any, method: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (), query: bytes = b""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request to /graphql through an ASGI app, in this process, without an HTTP client:
    the status, the headers and the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "query_string": query,
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers] + [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    answer = [(k.decode(), v.decode()) for k, v in sent[0]["headers"]]
    return sent[0]["status"], answer, b"".join(m.get("body", b"") for m in sent[1:])


async def _asgi(app: Any, query: str, variables: dict[str, Any], token: str) -> dict[str, Any]:
    """A GraphQL POST through the whole ASGI app; its answer."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    headers = (("content-type", "application/json"), ("authorization", f"Bearer {token}"))
    status, _, answer = await _http(app, "POST", body, headers)
    assert status == 200, answer
    return json.loads(answer)


@pytest.fixture
async def in_process(redis_url, test_data, tmp_path) -> AsyncIterator[tuple[Any, Settings]]:
    """The api in this process (its services started, no lifespan) and its settings."""
    settings = Settings(
        redis_url=redis_url,
        data_dir=tmp_path,
        jwt_secret="in-process-" + "s" * 40,
        storage="local",
        datasets=str(test_data.datasets_file),
        queue_name=f"dataport:queue:in-process:{uuid.uuid4().hex[:6]}",
    )
    registry = load_registry(settings)
    app = create_app(settings, registry)
    app.state.services = await Services.start(settings, registry)
    try:
        yield app, settings
    finally:
        await app.state.services.close()


async def test_a_request_leaves_nothing_for_the_cyclic_collector(in_process):
    """Every request is freed by reference counting as it ends: a polled read, a read refused for
    its token, a missing task and a new export. A cycle left per request made the collector free
    ~20,000 objects at once every 150 reads, a 10-20 ms pause (api/graphql_executor.py)."""
    app, settings = in_process
    token = issue_token(settings, f"user-{uuid.uuid4().hex[:8]}", ttl=600)
    task_id = (await _asgi(app, REQUEST, _export_input(1), token))["data"]["requestExport"]["task"]["id"]
    requests = [
        (FULL_POLL, {"id": task_id}, token),
        (FULL_POLL, {"id": task_id}, "not-a-token"),
        (FULL_POLL, {"id": "no-such-task"}, token),
        (REQUEST, _export_input(2), token),
    ]
    for request in requests:  # once first: documents parsed and validated, scripts loaded
        await _asgi(app, *request)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answers = [await _asgi(app, *request) for request in requests for _ in range(5)]
        gc.collect()
        ours = (o for o in gc.garbage if type(o).__module__.split(".")[0] in REQUEST_PATH)
        left = sorted({type(o).__qualname__ for o in ours})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert answers[0]["data"]["exportTask"]["id"] == task_id
    assert answers[5]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert answers[10]["data"]["exportTask"] is None and answers[15]["data"]["requestExport"]["task"]
    assert left == []


async def test_graphql_over_http_answers_as_through_fastapis_routes(in_process, test_data, tmp_path):
    """``GraphQLHTTP`` takes GET and POST /graphql past FastAPI's routing and dependency injection
    (api/graphql_view.py); an app without it, whose requests take the router's routes, gives the
    same answers, byte for byte, to good requests and to every kind of refusal."""
    app, settings = in_process
    routed = create_app(settings, app.state.services.registry)
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not GraphQLHTTP]
    routed.state.services = app.state.services
    token = issue_token(settings, f"user-{uuid.uuid4().hex[:8]}", ttl=600)
    task_id = (await _asgi(app, REQUEST, _export_input(3), token))["data"]["requestExport"]["task"]["id"]
    signed_in = (("authorization", f"Bearer {token}"),)
    as_json = (*signed_in, ("content-type", "application/json"))

    def body(query: str, **extra: Any) -> bytes:
        return json.dumps({"query": query, **extra}).encode()

    requests: list[tuple[Any, ...]] = [
        ("POST", body(READ, variables={"id": task_id}), as_json),
        ("POST", body(POSITION, variables={"id": task_id}), (("content-type", "application/json"),)),
        ("POST", body("{ noSuchField }"), (*as_json, ("accept", "application/graphql-response+json"))),
        ("POST", body(REQUEST, variables={"input": {"dataset": "no-such-dataset"}}), as_json),
        ("POST", b"{", as_json),
        ("POST", b'[{"query": "{ __typename }"}, {"query": "{ __typename }"}]', as_json),
        ("POST", b"{ __typename }", (*signed_in, ("content-type", "text/plain"))),
        ("GET", b"", (*signed_in, ("accept", "application/json")), b"query=%7B+__typename+%7D"),
        ("GET", b"", (*signed_in, ("accept", "application/json")), b"query=mutation+%7B+__typename+%7D"),
        ("GET", b"", (("accept", "text/html"),)),
    ]
    for request in requests:
        fast, through_routes = await _http(app, *request), await _http(routed, *request)
        assert fast == through_routes, request
    statuses = [(await _http(app, *request))[0] for request in requests]
    assert statuses == [200, 200, 400, 200, 400, 400, 400, 200, 400, 200]


def test_a_response_is_encoded_by_orjson_and_what_it_refuses_by_json():
    view = GraphQLView(schema, Settings())
    data = {"data": {"label": "été", "n": 1}}
    assert view.create_response(data, Response()).body == '{"data":{"label":"été","n":1}}'.encode()
    wide = {"data": {"n": 2**70}}  # past orjson's 64 bits: a JSON scalar may hold one
    response = view.create_response(wide, Response())
    assert json.loads(response.body) == wide and response.headers["content-type"] == "application/json"


# --- admission control against a real api -----------------------------------------------------


async def _burst(url: str, token: str, task_id: str, size: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    body = {"query": READ, "variables": {"id": task_id}}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.post("/graphql", json=body, headers=_auth(token)) for _ in range(size)))


async def test_past_its_capacity_the_api_refuses_at_once_and_serves_what_it_admits(one_slot):
    token = one_slot.token(f"user-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=one_slot.url, timeout=30) as client:
        task_id = _export(client, token)
    responses: list[httpx.Response] = []
    for _ in range(5):  # each request awaits Redis, so overlapping ones meet the one slot taken
        responses += await _burst(one_slot.url, token, task_id, 40)
        if any(r.status_code == 503 for r in responses):
            break
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == len(responses)
    for response in refused:
        error = response.json()["errors"][0]
        assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE", "retryAfterSeconds": 1}
        assert response.headers["retry-after"] == "1"
    assert all(r.json() == {"data": {"exportTask": {"id": task_id, "status": "PENDING"}}} for r in served)
    async with httpx.AsyncClient(base_url=one_slot.url, timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200
        metrics = (await client.get("/metrics")).text
    shed = next(line for line in metrics.splitlines() if line.startswith("dataport_api_requests_shed_total"))
    assert float(shed.split()[-1]) >= len(refused)


# --- the middleware, events in the test's order --------------------------------------------------


class Gate:
    """An ASGI app whose ``/slow`` answers only when ``open`` is set; everything else at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await self.open.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/slow-body":
            await self.open.wait()  # the response has started: the slot is free already
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(app: Admission, path: str, kind: str = "http") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": kind, "path": path, "method": "GET", "headers": []}, receive, send)
    return sent


async def _until(condition: Any) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)


async def test_the_middleware_refuses_with_the_shape_of_the_route_and_exempts_probes():
    gate = Gate()
    app = Admission(gate, Settings(api_max_in_flight=1, api_queue_seconds=0.05))
    slow = asyncio.create_task(_call(app, "/slow"))
    await _until(lambda: app.slots.held == 1)
    graphql, plain = await _call(app, "/graphql"), await _call(app, "/files/x")
    for sent in (graphql, plain):
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b'"code":"SERVICE_UNAVAILABLE","retryAfterSeconds":1' in graphql[1]["body"]
    assert plain[1]["body"].startswith(b'{"error":{"code":"SERVICE_UNAVAILABLE"')
    for path in ("/healthz", "/readyz", "/metrics", "/uploads/t"):
        assert (await _call(app, path))[0]["status"] == 200
    assert (await _call(app, "/graphql", kind="websocket"))[0]["status"] == 200
    gate.open.set()
    assert (await slow)[0]["status"] == 200 and app.slots.held == 0


async def test_waiting_requests_are_admitted_in_order_and_a_started_response_frees_its_slot():
    gate = Gate()
    app = Admission(gate, Settings(api_max_in_flight=1, api_queue_seconds=60))
    app.slots.standing_after = 3600  # a burst, however slowly this machine runs the test
    first = asyncio.create_task(_call(app, "/slow"))
    await _until(lambda: app.slots.held == 1)
    waiting = [asyncio.create_task(_call(app, f"/next/{n}")) for n in range(3)]
    await _until(lambda: app.slots.waiting == 3)
    gate.open.set()
    assert [(await task)[0]["status"] for task in (first, *waiting)] == [200] * 4
    assert app.slots.held == 0

    gate.open.clear()
    streaming = asyncio.create_task(_call(app, "/slow-body"))
    await _until(lambda: app.slots.held == 0 and not streaming.done())  # started, body pending
    assert (await _call(app, "/another"))[0]["status"] == 200
    gate.open.set()
    await streaming


async def test_once_the_queue_stands_newcomers_are_refused_after_a_short_wait():
    gate = Gate()
    app = Admission(gate, Settings(api_max_in_flight=1, api_queue_seconds=3600))
    slow = asyncio.create_task(_call(app, "/slow"))
    await _until(lambda: app.slots.held == 1)
    app.slots.drained_at -= app.slots.standing_after + 1  # no request has found the queue empty since
    assert app.slots.standing()
    # Within its hour-long budget it would wait for /slow; the standing queue refuses it at once.
    assert (await _call(app, "/graphql"))[0]["status"] == 503
    gate.open.set()
    await slow
    assert not app.slots.standing() and (await _call(app, "/graphql"))[0]["status"] == 200


# --- verified tokens, kept --------------------------------------------------------------------


async def test_a_token_is_verified_once_for_its_lifetime_and_a_refusal_for_seconds(monkeypatch):
    settings = Settings(jwt_secret="s" * 40)
    authenticator = Authenticator(settings)
    verified: list[str] = []
    real = Authenticator._verify

    async def counting(self: Authenticator, token: str) -> Any:
        verified.append(token)
        return await real(self, token)

    monkeypatch.setattr(Authenticator, "_verify", counting)
    token = issue_token(settings, "alice", ttl=60)
    first = await authenticator.authenticate(f"Bearer {token}")
    assert await authenticator.authenticate(f"Bearer {token}") is first and len(verified) == 1

    for _ in range(2):
        with pytest.raises(AuthError, match="not valid"):
            await authenticator.authenticate("Bearer not-a-token")
    assert len(verified) == 2  # the refusal was kept

    now = time.time()
    monkeypatch.setattr(token_cache.time, "time", lambda: now + token_cache.REFUSAL_SECONDS + 1)
    with pytest.raises(AuthError):
        await authenticator.authenticate("Bearer not-a-token")
    assert len(verified) == 3  # kept for seconds only
    monkeypatch.setattr(token_cache.time, "time", lambda: first.expires_at)
    await authenticator.authenticate(f"Bearer {token}")
    assert len(verified) == 4  # never past the token's exp


def test_the_token_cache_is_bounded():
    cache: token_cache.TokenCache[str] = token_cache.TokenCache(max_entries=2)
    for n in range(3):
        cache.accepted(f"t{n}", f"c{n}", time.time() + 60)
    assert len(cache) == 2 and cache.get("t0") is None and cache.get("t2") == "c2"


# --- parsed and validated documents, kept ----------------------------------------------------


class _Limited:
    """A context carrying the caller's limits (what api/context.py gives graphql_limits)."""

    def __init__(self, limits: QueryLimits) -> None:
        self.query_limits = limits


async def test_a_document_is_parsed_and_validated_once_yet_every_limit_still_applies():
    query = "{ __typename }"
    await schema.execute(query, context_value=_Limited(DEFAULT_LIMITS))
    hits = DOCUMENTS.hits
    result = await schema.execute(query, context_value=_Limited(DEFAULT_LIMITS))
    assert result.data == {"__typename": "Query"} and not result.errors and DOCUMENTS.hits == hits + 1

    # The same text under a smaller budget (an anonymous caller's) is a document of its own.
    small = QueryLimits(**{**DEFAULT_LIMITS.__dict__, "tokens": 2})
    refused = await schema.execute(query, context_value=_Limited(small))
    assert refused.errors[0].extensions["code"] == "QUERY_TOO_COMPLEX"

    aliased = "{ " + " ".join(f"a{n}: __typename" for n in range(DEFAULT_LIMITS.aliases + 1)) + " }"
    invalid = "{ noSuchField }"
    for _ in range(2):  # cached or not, refused the same way
        result = await schema.execute(aliased, context_value=_Limited(DEFAULT_LIMITS))
        assert result.errors[0].extensions["code"] == "QUERY_TOO_COMPLEX"
        result = await schema.execute(invalid, context_value=_Limited(DEFAULT_LIMITS))
        assert result.errors[0].extensions["code"] == "GRAPHQL_VALIDATION_FAILED"
