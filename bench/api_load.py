"""Open-loop load on the api: ``exportTask`` reads and ``requestExport`` at fixed rates, with a bare
Starlette route reading the same task hash from the same Redis as the floor (issue 19's benchmark).

Command (from the repository root)::

    python bench/api_load.py                              # 200, 400, 800 reads/s; 100 exports/s; 10 s each
    python bench/api_load.py --workers 2 --seconds 20     # two api processes on one port
    python bench/api_load.py --rates 200 --export-rate 0 --profile /tmp/api.prof   # cProfile the api

What it does:

1. Starts a Redis-compatible server (``dataport.embedded_redis``), ``dataport api --workers N`` on
   it (no worker: every task stays PENDING, as a task being polled is, so ``queuePosition`` and
   ``pollAfterSeconds`` do their Redis reads) and the floor, a Starlette app in its own uvicorn
   process whose one route does ``HGETALL dataport:task:{id}`` and returns it as JSON.
2. Signs ``--users`` tokens and makes one export for each (the tasks the reads poll).
3. For each rate, the floor then the api: a load generator, its own process (``--generate``), sends
   requests on a fixed schedule (request i is due at t0 + i / rate, whether or not earlier ones
   have answered) over kept-alive connections (a new one whenever none is idle), users taking
   turns; a request's latency runs from when it was due, so a stalled server or generator counts
   against it (no coordinated omission). The generator speaks HTTP/1.1 on asyncio streams itself
   (``RawClient``): httpx cost ~1-2 ms of CPU a request here, more than a core at 800/s, taken
   from the api being measured; httpx still makes the setup requests.
4. ``requestExport`` at ``--export-rate`` of distinct small exports (each filters on its own
   ``sample_id``), the users taking turns; the mutation limits and the active-task quota are
   raised out of reach, since one generator speaks for every user from one address.

How to read the table: per phase, p50/p95/p99 latency (ms) of the answered requests, the rate served
(good answers per second of the phase), errors (anything but a good answer, timeouts included),
``shed`` (503 with ``Retry-After``: admission control refusing work past capacity, counted apart
from errors), the generator's CPU share (near 100 % means the generator, not the api, is the limit)
and the machine's 1-minute load average when the phase ended. The target line compares the api at
200/s with the floor at 200/s in the same run. The JSON goes to ``--out``.

``server CPU/req`` is the server's CPU over the phase divided by the requests sent. The same code
costs more per request the sparser the requests: between requests 5 ms apart the process sleeps
and wakes to cold caches, so at 200/s a read costs about twice what back-to-back reads do, and
~1.5x what it costs at 400-800/s; the floor shows the same. Compare CPU figures at one rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import OUT_DIR, console, note_load, stack_env, write_json
from rich.table import Table

from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port, wait_for_port
from dataport.processes import stop

READ = """query ExportTask($id: ID!) { exportTask(id: $id) { id status dataset format run queuePosition
  pollAfterSeconds rowCount fileSize downloadUrl createdAt startedAt finishedAt expiresAt
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds } error { code message } } }"""
REQUEST = """mutation RequestExport($input: ExportInput!) { requestExport(input: $input) {
  task { id status queuePosition } userErrors { field message code } } }"""
TIMEOUT_SECONDS = 10.0
IDLE_SECONDS = 3.0  # an idle connection older than this is not reused
SECRET = "bench-api-load-" + os.urandom(8).hex()


@dataclass
class Phase:
    name: str  # "floor", "exportTask" or "requestExport"
    rate: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    shed: int = 0
    first_error: str | None = None
    generator_cpu: float = 0.0  # the generator's CPU seconds over the phase's wall seconds
    server_cpu_ms: float = 0.0  # the server's CPU (all its processes) per request sent
    load: float = 0.0

    def percentile(self, p: float) -> float:
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")

    @property
    def served(self) -> float:
        return len(self.latencies_ms) / self.seconds


# --- the floor: its own process ----------------------------------------------------------------


def serve_floor(port: int, redis_url: str) -> None:
    """The stack's floor: one Starlette route, one HGETALL, orjson out; nothing else."""
    import orjson
    import redis.asyncio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)

    async def task(request: Request) -> Response:
        fields = await client.hgetall(f"dataport:task:{request.path_params['id']}")
        return Response(orjson.dumps(fields), media_type="application/json", status_code=200 if fields else 404)

    app = Starlette(routes=[Route("/task/{id}", task)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the generator: its own process --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """HTTP/1.1 over kept-alive asyncio connections, a fresh one whenever none is idle: tens of
    microseconds of CPU a request, where httpx spends ~1-2 ms on this machine (at 800 requests/s
    that is more than a core, taken from the api it measures). Enough HTTP for these servers: every
    answer has a Content-Length."""

    def __init__(self, url: str) -> None:
        address = httpx.URL(url)
        self.host, self.port = address.host, address.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        reader = writer = None
        while self.idle and reader is None:
            reader, writer, since = self.idle.pop()
            if time.monotonic() - since > IDLE_SECONDS:  # the server may have closed it (uvicorn: 5 s)
                writer.close()
                reader = writer = None
        if reader is None or writer is None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened.append(writer)
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:] if line)}
        answer = Answer(int(head[0].split()[1]), fields, await reader.readexactly(int(fields["content-length"])))
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return answer

    async def aclose(self) -> None:
        for writer in self.opened:
            writer.close()


def _check(kind: str, response: Answer, expected: str | None) -> str | None:
    """None for a good answer, else what was wrong."""
    if response.status != 200:
        return f"HTTP {response.status}: {response.body[:200]!r}"
    body = response.json()
    if kind == "floor":
        return None if body.get("id") == expected else f"wrong body {str(body)[:200]}"
    if body.get("errors"):
        return f"errors {str(body['errors'])[:200]}"
    if kind == "exportTask":
        return None if (body["data"]["exportTask"] or {}).get("id") == expected else f"wrong task {body}"
    payload = body["data"]["requestExport"]
    return None if payload["task"] and not payload["userErrors"] else f"user errors {payload['userErrors']}"


async def _generate(spec: dict[str, Any]) -> dict[str, Any]:
    phase = Phase(spec["name"], spec["rate"], spec["seconds"])
    targets: list[list[str]] = spec["targets"]  # [token, task id] per user
    loop = asyncio.get_running_loop()
    client = RawClient(spec["url"])
    read_bodies = [json.dumps({"query": READ, "variables": {"id": task_id}}).encode() for _, task_id in targets]

    async def one(i: int, due: float) -> None:
        token, task_id = targets[i % len(targets)]
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        expected: str | None = task_id
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                if phase.name == "floor":
                    response = await client.request("GET", f"/task/{task_id}", {})
                elif phase.name == "exportTask":
                    response = await client.request("POST", "/graphql", headers, read_bodies[i % len(targets)])
                else:
                    value = spec["first_value"] + i
                    filters = [{"field": "sample_id", "op": "EQ", "value": value}]
                    body = {"query": REQUEST, "variables": {"input": {"dataset": "samples", "filters": filters}}}
                    response = await client.request("POST", "/graphql", headers, json.dumps(body).encode())
                    expected = None
            if response.status == 503 and response.headers.get("retry-after"):
                phase.shed += 1
                return
            problem = _check(phase.name, response, expected)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            phase.latencies_ms.append((loop.time() - due) * 1000)
        else:
            phase.errors += 1
            phase.first_error = phase.first_error or problem

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        count = int(phase.rate * phase.seconds)
        start = loop.time() + 0.05
        pending: list[asyncio.Task[None]] = []
        for i in range(count):
            due = start + i / phase.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*pending)
    finally:
        await client.aclose()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    phase.generator_cpu = cpu / max(phase.seconds, 1e-9)
    return asdict(phase)


def _cpu(pid: int) -> float:
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def run_generator(spec: dict[str, Any], server: int | None = None) -> Phase:
    """One phase, generated by a process of its own; its result comes back as JSON on stdout.
    ``server``: the pid whose CPU (with its children's) the phase is charged."""
    before = _cpu(server) if server else 0.0
    done = subprocess.run(
        [sys.executable, __file__, "--generate", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the generator failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    phase = Phase(**{k: v for k, v in result.items() if k != "latencies_ms"})
    phase.latencies_ms = result["latencies_ms"]
    phase.load = os.getloadavg()[0]
    if server:
        phase.server_cpu_ms = (_cpu(server) - before) * 1000 / max(1, int(phase.rate * phase.seconds))
    return phase


# --- the orchestrator ----------------------------------------------------------------------------


def make_tasks(url: str, tokens: list[str]) -> list[list[str]]:
    """One export per user, to be polled; [token, task id] each."""
    targets = []
    with httpx.Client(timeout=30) as client:
        for n, token in enumerate(tokens):
            variables = {
                "input": {"dataset": "samples", "filters": [{"field": "sample_id", "op": "EQ", "value": n + 1}]}
            }
            body = client.post(
                f"{url}/graphql",
                json={"query": REQUEST, "variables": variables},
                headers={"Authorization": f"Bearer {token}"},
            ).json()
            targets.append([token, body["data"]["requestExport"]["task"]["id"]])
    return targets


def start_api(env: dict[str, str], port: int, workers: int, profile: Path | None, log: Path) -> subprocess.Popen:
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "dataport.cli", "api", "--port", str(port)]
    if workers != 1:  # without the option, the bench also runs against trees that predate it
        command += ["--workers", str(workers)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
    except TimeoutError:
        stop(process)
        raise RuntimeError(f"the api did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
    return process


def report(phases: list[Phase], workers: int) -> bool:
    table = Table(title=f"api load, {workers} api process(es), open loop, latency from the due time")
    for column in (
        "phase",
        "offered/s",
        "served/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "shed (503)",
        "server CPU/req",
        "gen CPU",
        "load",
    ):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for p in phases:
        table.add_row(
            p.name,
            f"{p.rate:.0f}",
            f"{p.served:.0f}",
            f"{p.percentile(50):.1f}",
            f"{p.percentile(95):.1f}",
            f"{p.percentile(99):.1f}",
            str(p.errors),
            str(p.shed),
            f"{p.server_cpu_ms:.2f} ms",
            f"{p.generator_cpu:.0%}",
            f"{p.load:.2f}",
        )
    console.print(table)
    for p in phases:
        if p.first_error:
            console.print(f"[yellow]{p.name} at {p.rate:.0f}/s, first error:[/yellow] {p.first_error}")
    floor = next((p for p in phases if p.name == "floor" and p.rate == 200), None)
    api = next((p for p in phases if p.name == "exportTask" and p.rate == 200), None)
    if floor is None or api is None:
        return True
    ratio = api.percentile(99) / floor.percentile(99)
    met = api.percentile(99) < 50 and ratio <= 3 and api.errors == 0 and api.shed == 0
    console.print(
        f"exportTask at 200/s: p99 {api.percentile(99):.1f} ms, floor p99 {floor.percentile(99):.1f} ms "
        f"({ratio:.2f}x), errors {api.errors}, shed {api.shed}, load {api.load:.2f}: "
        + ("[green]met[/green]" if met else "[red]MISS[/red]")
        + " (target: p99 < 50 ms, within 3x of the floor, no errors)"
    )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 400, 800], help="exportTask reads/s")
    parser.add_argument("--export-rate", type=float, default=100, help="requestExport/s (0: skip)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="api processes (dataport api --workers)")
    parser.add_argument("--profile", type=Path, help="run the api (one process) under cProfile, stats here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "api_load.json")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "REDIS_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(asyncio.run(_generate(json.loads(args.generate)))))
        return 0
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1])
        return 0
    if args.profile is not None and args.workers != 1:
        parser.error("--profile profiles one api process: leave --workers at 1")

    note_load()
    from api.auth import issue_token
    from dataport.settings import Settings

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        api_port, floor_port = free_port(), free_port()
        env = stack_env(
            Path(tmp) / "data",
            Path(tmp) / "files",
            server.url,
            SECRET,
            api_port,
            demo_rows="2000",
            mutation_rate_per_user="100000000",
            mutation_rate_per_ip="100000000",
            max_active_tasks_per_user="100000000",
            log_format="text",
        )
        env["DATAPORT_LOG_LEVEL"] = "WARNING"  # no access line per request
        try:
            processes.append(start_api(env, api_port, args.workers, args.profile, Path(tmp) / "api.log"))
            floor = subprocess.Popen(
                [sys.executable, __file__, "--serve-floor", str(floor_port), server.url], stdin=subprocess.DEVNULL
            )
            processes.append(floor)
            wait_for_port("127.0.0.1", floor_port, timeout=30)
            settings = Settings(jwt_secret=SECRET)
            tokens = [issue_token(settings, f"load-{n}", ttl=3600) for n in range(args.users)]
            targets = make_tasks(f"http://127.0.0.1:{api_port}", tokens)
            api_url, floor_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{floor_port}"
            # Warm-up: imports, the first connections, the caches; not reported.
            run_generator({"name": "exportTask", "rate": 100, "seconds": 2, "url": api_url, "targets": targets})
            run_generator({"name": "floor", "rate": 100, "seconds": 1, "url": floor_url, "targets": targets})
            phases: list[Phase] = []
            for rate in args.rates:
                for name, url, pid in (("floor", floor_url, floor.pid), ("exportTask", api_url, processes[0].pid)):
                    spec = {"name": name, "rate": rate, "seconds": args.seconds, "url": url, "targets": targets}
                    phases.append(run_generator(spec, pid))
                    console.print(f"{name} at {rate:.0f}/s done (load {phases[-1].load:.2f})")
            if args.export_rate:
                spec = {
                    "name": "requestExport",
                    "rate": args.export_rate,
                    "seconds": args.seconds,
                    "url": api_url,
                    "targets": targets,
                    "first_value": 10_000,
                }
                phases.append(run_generator(spec, processes[0].pid))
        finally:
            if args.profile is not None and processes:
                # uvicorn re-raises SIGTERM after shutting down, which would end cProfile unwritten;
                # SIGINT ends it with a KeyboardInterrupt, and cProfile writes its stats on the way out.
                processes[0].send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    processes[0].wait(timeout=30)
            for process in reversed(processes):
                stop(process)
    met = report(phases, args.workers)
    write_json(args.out, "api_load", workers=args.workers, phases=[asdict(p) for p in phases], target_met=met)
    if args.profile is not None:
        stats = f"pstats.Stats('{args.profile}').sort_stats('cumtime').print_stats(40)"
        console.print(f'profile: python -c "import pstats; {stats}"')
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
