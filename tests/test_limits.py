"""Rate limits on every mutation and the per-user quota of active tasks (DESIGN.md, "Limits,
quotas and error codes"), against real api and worker processes.

``limits_stack`` allows 8 mutations per user and 12 per address in a 2-second window, and 3 active
tasks per user; it has no worker until a test starts one. Addresses come from ``X-Forwarded-For``,
which uvicorn honours from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from redis.asyncio import Redis

from dataport import errors
from dataport.settings import Settings
from tasks.models import TaskStatus
from tasks.store import QuotaExceeded, TaskStore
from tests.client import PAYLOAD, Api
from tests.fixtures.stack import Stack
from tests.task_fields import pending_task

_addresses = (f"198.51.100.{n % 250}" if n < 250 else f"203.0.113.{n % 250}" for n in itertools.count(1))
MUTATIONS = (
    "requestExport",
    "cancelExport",
    "retryExport",
    "deleteExport",
    "requestImport",
    "startImport",
    "cancelImport",
)
EXPORT = f"mutation($i: ExportInput!) {{ requestExport(input: $i) {{ {PAYLOAD} }} }}"


@dataclass
class From(Api):
    """A client whose requests come through a proxy on behalf of ``address``."""

    address: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {**super().headers, "X-Forwarded-For": self.address}


def client(stack: Stack, user: str | None = None, address: str | None = None) -> From:
    return From(stack.url, stack.token(user or f"user-{uuid.uuid4().hex[:8]}"), address or next(_addresses))


def mutation(api: Api, name: str) -> dict[str, Any]:
    """One call of the named mutation with inputs that do nothing (the response body)."""
    if name == "requestExport":
        return api.gql(EXPORT, {"i": {"dataset": "no-such-dataset"}})
    if name == "requestImport":
        query = "mutation($i: ImportInput!) { requestImport(input: $i) { userErrors { code } } }"
        return api.gql(query, {"i": {"dataset": "no-such-dataset", "fileName": "x.csv"}})
    return api.gql(f'mutation {{ {name}(id: "no-such-task") {{ userErrors {{ code }} }} }}')


def refusal(body: dict[str, Any]) -> int | None:
    """retryAfterSeconds when the body is a RATE_LIMITED refusal, else None."""
    for error in body.get("errors") or []:
        if (error.get("extensions") or {}).get("code") == errors.RATE_LIMITED:
            assert body.get("data") is None, body
            return error["extensions"]["retryAfterSeconds"]
    return None


def paced(call, *args: Any) -> Any:
    """``call(*args)``, waiting out rate-limit refusals as told (for tests of something else)."""
    while True:
        try:
            return call(*args)
        except AssertionError as e:
            if "RATE_LIMITED" not in str(e):
                raise
        time.sleep(2)


# -- rate limits ---------------------------------------------------------------------------------


def test_the_defaults_are_the_contracts():
    settings = Settings(_env_file=None)
    assert (
        settings.mutation_rate_per_user,
        settings.mutation_rate_per_ip,
        settings.mutation_rate_window_seconds,
        settings.max_active_tasks_per_user,
    ) == (60, 300, 60.0, 10)


def test_every_mutation_counts_against_its_user(limits):
    for name in MUTATIONS:
        user = f"user-{uuid.uuid4().hex[:8]}"
        for _ in range(8):  # each from another address: only the user's count can run out
            body = mutation(client(limits, user), name)
            assert refusal(body) is None and not body.get("errors"), (name, body)
        body = mutation(client(limits, user), name)
        wait = refusal(body)
        assert wait is not None and 1 <= wait <= 2, (name, body)
        assert body["errors"][0]["message"] == f"Too many requests; try again in {wait} s."


def test_retry_after_is_honest(limits):
    api = client(limits)
    started = time.monotonic()
    while (wait := refusal(mutation(api, "cancelExport"))) is None:
        assert time.monotonic() - started < 10
    time.sleep(wait)
    assert refusal(mutation(api, "cancelExport")) is None
    # a refused request is not counted: hammering while refused does not push the wait out
    while (wait := refusal(mutation(api, "cancelExport"))) is None:
        pass
    for _ in range(20):
        assert refusal(mutation(api, "cancelExport")) is not None
    time.sleep(wait)
    assert refusal(mutation(api, "cancelExport")) is None


def test_every_user_behind_one_address_shares_its_limit(limits):
    address = next(_addresses)
    for _ in range(12):
        assert refusal(mutation(client(limits, address=address), "cancelImport")) is None
    crowded = client(limits, address=address)  # a new user, but the address is used up
    assert refusal(mutation(crowded, "cancelImport")) is not None
    crowded.address = next(_addresses)
    assert refusal(mutation(crowded, "cancelImport")) is None


def test_a_refused_request_queues_nothing(limits, redis_url):
    import redis

    queue = redis.Redis.from_url(redis_url)
    name = limits.env["DATAPORT_QUEUE_NAME"]
    user = f"user-{uuid.uuid4().hex[:8]}"
    for _ in range(8):
        mutation(client(limits, user), "cancelExport")
    depth = queue.zcard(name)
    api = client(limits, user)
    body = api.gql(EXPORT, {"i": {"dataset": "special", "format": "CSV"}})
    assert refusal(body) is not None
    assert queue.zcard(name) == depth
    listed = paced(api.data, "{ exportTasks { totalCount } }")
    assert listed["exportTasks"]["totalCount"] == 0


def test_unauthenticated_mutations_are_refused_before_counting(limits):
    anonymous = From(limits.url, None, next(_addresses))
    body = mutation(anonymous, "cancelExport")
    assert body["errors"][0]["extensions"]["code"] == errors.UNAUTHENTICATED


# -- quota of active tasks ---------------------------------------------------------------------


def _export(api: Api, n: int) -> dict[str, Any]:
    return paced(lambda: api.request_export(dataset="special", format="CSV", limit=n))


def _codes(payload: dict[str, Any]) -> list[str]:
    return [e["code"] for e in payload["userErrors"]]


def test_active_tasks_are_capped_per_user_and_freed_as_they_end(limits):
    api = client(limits)
    tasks = [_export(api, n)["task"] for n in (1, 2, 3)]
    assert [t["status"] for t in tasks] == ["PENDING"] * 3
    refused = _export(api, 4)
    assert refused["task"] is None and _codes(refused) == [errors.QUOTA_EXCEEDED]
    assert refused["userErrors"][0]["field"] == ["input"]
    # asking again for an export already pending returns it, quota or not
    again = _export(api, 1)
    assert again["userErrors"] == [] and again["task"]["id"] == tasks[0]["id"]
    # imports count too, from the moment they wait for their file
    imp = paced(lambda: api.request_import(dataset="imp_sqlite", format="CSV", fileName="rows.csv"))
    assert imp["task"] is None and _codes(imp) == [errors.QUOTA_EXCEEDED]
    # a cancelled task frees its place, and a retry of it needs one
    assert paced(api.mutate, "cancelExport", tasks[0]["id"])["task"]["status"] == "CANCELLED"
    fourth = _export(api, 4)
    assert fourth["userErrors"] == [] and fourth["task"]["status"] == "PENDING"
    retried = paced(api.mutate, "retryExport", tasks[0]["id"])
    assert retried["task"] is None and _codes(retried) == [errors.QUOTA_EXCEEDED]
    assert retried["userErrors"][0]["field"] == ["id"]
    assert paced(api.task, tasks[0]["id"])["status"] == "CANCELLED"  # unchanged
    # another user is not affected
    assert _export(client(limits), 4)["userErrors"] == []
    # finished tasks free their places
    limits.start_worker()
    for t in (tasks[1], tasks[2], fourth["task"]):
        assert paced(api.wait, t["id"])["status"] == "SUCCEEDED"
    assert paced(api.mutate, "retryExport", tasks[0]["id"])["userErrors"] == []
    waiting = [
        paced(lambda: api.request_import(dataset="imp_sqlite", format="CSV", fileName="rows.csv")) for _ in range(2)
    ]
    assert all(p["userErrors"] == [] and p["task"]["status"] == "WAITING_FOR_UPLOAD" for p in waiting)


async def test_the_quota_holds_when_many_requests_race(redis_url):
    """Two api processes' worth of connections asking at once: exactly the quota is created."""
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    stores = [TaskStore(c) for c in clients]
    owner = f"racer-{uuid.uuid4().hex[:8]}"

    async def ask(n: int) -> str:
        tid = f"race{uuid.uuid4().hex[:20]}"
        try:
            await stores[n % 2].request(tid, pending_task(tid, owner), reuse_seconds=600, max_active=5)
        except QuotaExceeded:
            return "refused"
        return tid

    try:
        outcomes = await asyncio.gather(*(ask(n) for n in range(40)))
        created = [o for o in outcomes if o != "refused"]
        assert len(created) == 5 and await stores[0].active_count(owner) == 5
        # a task that ends leaves the set in the same step
        await stores[0].transition(created[0], TaskStatus.CANCELLED, "test")
        assert await stores[0].active_count(owner) == 4
        assert await ask(0) != "refused"
    finally:
        for c in clients:
            await c.aclose()


def test_health_is_not_rate_limited(limits):
    api = client(limits)
    while refusal(mutation(api, "cancelExport")) is None:
        pass
    assert httpx.get(f"{limits.url}/healthz", timeout=10).status_code == 200
    assert "errors" not in api.gql("{ datasets { name } }")
