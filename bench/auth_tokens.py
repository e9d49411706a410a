"""Token verification cost: ``exportTask`` queries per second with an HS256 token against the same
with an RS256 identity-provider token (issue 17's benchmark; target: within 10 % of each other).

Command (from the repository root)::

    python bench/auth_tokens.py                  # 16 concurrent clients, 7 rounds of 3 s per token
    python bench/auth_tokens.py --seconds 10 --rounds 5 --concurrency 32

What it does:

1. Serves a discovery document and a JWKS (one RSA key the bench makes) over real HTTP on a
   loopback port (tests/fixtures/oidc.py's ``KeyServer``, run by uvicorn in a thread).
2. Starts ``dataport api`` + ``dataport worker`` on an embedded Redis with ``DATAPORT_OIDC_ISSUER``
   pointing there, and the SQLite demo dataset of 1,000 rows.
3. Makes one export with each token (an HS256 one from ``issue_token`` and an RS256 one signed with
   the key, roles at ``realm_access.roles``), then, the two tokens taking turns round by round,
   ``--concurrency`` clients on kept-alive connections send ``exportTask(id)`` for their own task
   for ``--seconds`` each round. Every answer is checked (status 200, the task, no errors).

How to read the result: requests per second, the median of the rounds, for each token, and
``RS256 / HS256``. The api verifies the RS256 token with the key it fetched once (the JWKS is
fetched at most once in the whole run: ``jwks fetches`` says so); what is left is an RSA signature
check (tens of microseconds) against an HMAC, next to the milliseconds of a GraphQL request.
Client and api share the machine's cores, so absolute numbers are the pair's, not the api's; the
rounds alternate so that a busy machine weighs on both tokens alike. The cost of the verification
alone (microseconds per ``Authenticator.authenticate``, in the bench's process) is printed beside. Exits
1 when a check fails; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import uvicorn
from _common import OUT_DIR, REPO_DIR, Stack, console, median_of, note_load, stack_env, write_json
from rich.table import Table

from api.auth import Authenticator, issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port, wait_for_port
from dataport.settings import Settings

sys.path.insert(0, str(REPO_DIR))  # tests/ is not an installed package
from tests.fixtures.oidc import AUDIENCE, KeyServer, SigningKey  # noqa: E402

QUERY = "query($id: ID!) { exportTask(id: $id) { id status dataset } }"


@dataclass
class Series:
    token: str
    rounds: list[float] = field(default_factory=list)  # requests per second
    requests: int = 0
    failures: int = 0


def serve_keys(server: KeyServer) -> uvicorn.Server:
    """The key server in a thread of its own (the bench's event loop is busy sending requests)."""
    uv = uvicorn.Server(uvicorn.Config(server._app(), host="127.0.0.1", port=server.port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    wait_for_port("127.0.0.1", server.port, timeout=15)
    return uv


async def one_round(url: str, token: str, task_id: str, seconds: float, concurrency: int, series: Series) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    body = {"query": QUERY, "variables": {"id": task_id}}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await http.post(f"{url}/graphql", json=body, headers=headers)
            ok = response.status_code == 200 and (response.json().get("data") or {}).get("exportTask", {}) is not None
            ok = ok and response.json()["data"]["exportTask"]["id"] == task_id
            series.failures += 0 if ok else 1
            done += 1

    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    series.rounds.append(done / elapsed)
    series.requests += done


async def verify_cost(settings: Settings, tokens: dict[str, str], n: int = 2_000) -> dict[str, float]:
    """Microseconds per ``Authenticator.authenticate`` of each token in this process, keys cached:
    the verification alone, free of the HTTP round trip's noise."""
    auth = Authenticator(settings)
    try:
        cost = {}
        for name, token in tokens.items():
            await auth.authenticate(f"Bearer {token}")  # the JWKS fetch, for RS256
            started = time.perf_counter()
            for _ in range(n):
                await auth.authenticate(f"Bearer {token}")
            cost[name] = (time.perf_counter() - started) / n * 1e6
        return cost
    finally:
        await auth.aclose()


async def measure(stack: Stack, tokens: dict[str, str], args) -> list[Series]:
    task_ids = {}
    for name, token in tokens.items():  # one task each, owned by that token's user
        task = await DataportClient(stack.url, token).request_export({"dataset": "samples", "format": "CSV"})
        task_ids[name] = task["id"]
    series = {name: Series(name) for name in tokens}
    for name, token in tokens.items():  # warm-up: connections, caches, the JWKS fetch
        await one_round(stack.url, token, task_ids[name], 1.0, args.concurrency, Series(name))
    for i in range(args.rounds):
        order = list(tokens) if i % 2 == 0 else list(reversed(tokens))
        for name in order:
            await one_round(stack.url, tokens[name], task_ids[name], args.seconds, args.concurrency, series[name])
        console.print(f"  round {i + 1}/{args.rounds} done")
    return list(series.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "auth_tokens.json")
    args = parser.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    scratch = Path(tempfile.mkdtemp(prefix="auth_tokens-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    secret = secrets.token_urlsafe(32)
    key = SigningKey.make("RS256")
    keys = KeyServer([key], port=free_port())
    key_uv = serve_keys(keys)
    port = free_port()
    stack: Stack | None = None
    series: list[Series] = []
    cost: dict[str, float] = {}
    error = None
    try:
        redis.start()
        env = stack_env(
            scratch / "data",
            scratch / "files",
            redis.url,
            secret,
            port,
            demo_rows="1000",
            oidc_issuer=keys.issuer,
            oidc_audience=AUDIENCE,
            roles_claim="realm_access.roles",
            mutation_rate_per_user="100000",
            mutation_rate_per_ip="100000",
        )
        stack = Stack(env, port, OUT_DIR / "logs" / "auth_tokens")
        stack.start()
        now = int(time.time())
        claims = keys.claims(sub="bench-idp", exp=now + 3600, realm_access={"roles": ["analyst"]})
        tokens = {
            "HS256": issue_token(Settings(jwt_secret=secret, roles_claim="realm_access.roles"), "bench-local"),
            "RS256": key.sign(claims),
        }
        series = asyncio.run(measure(stack, tokens, args))
        local = Settings(jwt_secret=secret, oidc_issuer=keys.issuer, oidc_audience=AUDIENCE)
        cost = asyncio.run(verify_cost(local, tokens))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()
        key_uv.should_exit = True
        shutil.rmtree(scratch, ignore_errors=True)

    by = {s.token: s for s in series}
    ratio = median_of(by["RS256"].rounds) / median_of(by["HS256"].rounds) if len(by) == 2 else None
    checks = {
        "every answer right": bool(series) and all(s.failures == 0 for s in series),
        "JWKS fetched once by the api": keys.jwks_fetches == 2,  # and once by verify_cost
        "within 10 %": ratio is not None and ratio >= 0.9,
    }
    if series:
        table = Table(
            title=f"exportTask over HTTP, {args.concurrency} clients, {args.rounds} rounds of {args.seconds:g} s"
        )
        for column in ("token", "req/s (median)", "rounds", "requests", "failures"):
            table.add_column(column, justify="left" if column == "token" else "right")
        for s in series:
            rounds = ", ".join(f"{r:.0f}" for r in s.rounds)
            table.add_row(s.token, f"{median_of(s.rounds):.0f}", rounds, f"{s.requests:,}", str(s.failures))
        console.print(table)
        console.print(f"RS256 / HS256 = {ratio:.3f}; jwks fetches: {keys.jwks_fetches} (the api's and verify_cost's)")
    if cost:
        console.print("verification alone, in-process: " + ", ".join(f"{k} {v:.0f} µs" for k, v in cost.items()))
    if error:
        console.print(f"[red]error:[/red] {error} (logs in {OUT_DIR / 'logs' / 'auth_tokens'})")
    failed = [name for name, ok in checks.items() if not ok]
    console.print("checks: " + ("[green]ok[/green]" if not failed else f"[red]FAILED: {', '.join(failed)}[/red]"))
    write_json(
        args.out,
        "auth_tokens",
        load_average_at_start=load,
        settings={"seconds": args.seconds, "rounds": args.rounds, "concurrency": args.concurrency},
        series=[{**asdict(s), "median_rps": median_of(s.rounds) if s.rounds else None} for s in series],
        ratio_rs256_to_hs256=ratio,
        verify_microseconds=cost,
        jwks_fetches=keys.jwks_fetches,
        checks=checks,
        error=error,
    )
    console.print(f"numbers in {args.out}")
    return 0 if not failed and error is None else 1


if __name__ == "__main__":
    sys.exit(main())
