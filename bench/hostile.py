"""Hostile-input benchmark (issue 15): the hostile corpus and hostile requests against a running
Dataport, and the fairness run. Targets: every input handled with a coded error, the worker's peak
RSS under 400 MiB for every input, no process restart; B's wait under one full-size job.

Command (from the repository root)::

    python bench/hostile.py                    # files, requests, then the fairness run (~5 minutes)
    python bench/hostile.py --only files       # or: requests, fairness
    python bench/hostile.py --strict           # exit 1 when a target is missed

What it does:

1. Starts ``dataport api`` + one ``dataport worker`` on an embedded Redis as ``dataport dev`` runs
   them (dev mode, text logs, local storage), with a datasets file it writes: ``imp``, an empty
   importable SQLite table with the columns tests/hostile_corpus.py expects (``COLUMNS``). Every
   limit is at its default except the mutation rates and the quota of active tasks, raised so that
   the bench's own volume is not refused.
2. Files: each case of ``tests.hostile_corpus.cases()`` goes the real way, one after another:
   ``requestImport`` (its ``maxErrors``, the file's size) -> PUT to the signed upload URL ->
   ``startImport`` -> the ``importProgress`` subscription until a final status (120 s at most, else
   HUNG). Outcome: the task's error code, ``ROW_ERRORS (n)`` when it succeeded with failed rows
   (their reasons are read from the error report), or ``SUCCEEDED``. Meanwhile a thread samples the
   worker's RSS, children included (its fork server and helpers), every 10 ms. A last ``control``
   import (three good rows) shows the worker still takes work.
3. Requests: hostile GraphQL documents and bodies, WebSockets, stream-route parameters, filter
   values, file names and uploads (the shapes of tests/test_hostile_api.py and
   tests/test_hostile_edges.py), each answered with its HTTP status and code (or a WebSocket close
   code); the RSS column is the api's, sampled the same way.
4. Processes: the api and the worker must still be the processes started in step 1 (same pid and
   start time, no in-place restart in the worker log) and neither log may hold a ``Traceback``.
   The stack is then stopped.
5. Fairness: ``bench/fairness.py``'s run on a stack of its own (user A queues 30 full-size exports
   of the 100,000-row demo dataset, user B then asks for 10 rows): B's wait against the median
   duration of one of A's jobs.

How to read the tables: ``outcome`` is what the client got (``<HTTP status> <code>`` for requests),
``expected`` what the corpus or the tests name (a dash when they agree). An input is *handled* when
it ended in a coded error (a code in the answer, or a 4xx status that says what was wrong, as the
upload route answers) or the expected success: never a 5xx, an "Internal error", a traceback in a
log, a worker restart or a hang. A coded outcome other than the expected one is still handled and
shown in yellow; a clean refusal without a code (GraphQL's own validation of variables) is not, and
shown in red. The RSS column is the peak of the tree while the input ran; ``grew`` is that peak over
the tree's RSS just before it, since memory once taken is rarely given back and a peak carries on
into the rows below. The summary line counts inputs tried, handled and as expected, and gives the
worst worker RSS and the input that added the most. A missed target prints MISS (and exits 1 with
``--strict``); the numbers go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fairness as fairness_bench
import httpx
import psutil
import websockets
from _common import (
    FINAL,
    OUT_DIR,
    REPO_DIR,
    MiB,
    PeakRss,
    Stack,
    console,
    mib,
    note_load,
    stack_env,
    tree_rss,
    write_json,
)
from rich.table import Table
from websockets.exceptions import ConnectionClosed

from api.auth import issue_token
from dataport.client import IMPORT_PROGRESS, IMPORT_TASK, ClientError, DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

sys.path.insert(0, str(REPO_DIR))  # tests/ is not an installed package
from tests.hostile_corpus import COLUMNS, ROW_ERRORS, Case, cases  # noqa: E402
from tests.test_hostile_api import _raw_post  # noqa: E402

RSS_TARGET = 400 * MiB  # the worker's peak, per input
IMPORT_TIMEOUT = 120.0  # an import with no final status by then is HUNG
DATASET = "imp"
RAISED = "100000"  # mutation rates and active tasks: out of the bench's reach
TRANSPORT, LEGACY = "graphql-transport-ws", "graphql-ws"
EXPORT_FIELD = 'requestExport(input: {dataset: "imp", format: CSV}) { task { id } userErrors { code } }'
REQUEST_EXPORT = "mutation($i: ExportInput!) { requestExport(input: $i) { task { id } userErrors { code } } }"
REQUEST_IMPORT = (
    "mutation($i: ImportInput!) { requestImport(input: $i) { task { id upload { url method headers } } "
    "userErrors { code } } }"
)


@dataclass
class Result:
    """One input: what the client got against what was expected, and what it cost."""

    section: str  # files | requests
    name: str
    expected: str
    outcome: str = ""
    handled: bool = False
    peak_rss: int = 0  # the worker's tree for files, the api's for requests
    start_rss: int = 0  # the same tree just before: memory is rarely given back, so peaks carry over
    seconds: float = 0.0
    note: str = ""

    @property
    def as_expected(self) -> bool:  # "A / B": either will do
        return self.handled and self.outcome.split(" (")[0] in self.expected.split(" / ")


# --- the stack ---------------------------------------------------------------------------------


def write_datasets(data_dir: Path) -> Path:
    """An empty SQLite table ``imp`` and a datasets file that makes it importable, with the corpus's
    columns."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "imports.sqlite3"
    types = {"integer": "INTEGER", "float": "REAL", "boolean": "INTEGER"}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            f"CREATE TABLE {DATASET} ("
            + ", ".join(
                f"{c.name} {types.get(c.type, 'TEXT')}" + (" PRIMARY KEY" if c.name == "id" else "") for c in COLUMNS
            )
            + ")"
        )
        conn.commit()

    def spec(c) -> str:
        extra = (", required = true" if c.required else "") + (f", max_length = {c.max_length}" if c.max_length else "")
        return (
            f'{c.name} = {{ type = "{c.type}", filterable = {str(c.filterable).lower()}, '
            f"sortable = {str(c.sortable).lower()}{extra} }}"
        )

    path = data_dir / "datasets.toml"
    path.write_text(
        f'[datasets.{DATASET}]\nsource = "sqlite"\nurl = "{db}"\ntable = "{DATASET}"\nkey = ["id"]\n'
        f"importable = true\n\n[datasets.{DATASET}.columns]\n" + "\n".join(map(spec, COLUMNS)) + "\n"
    )
    return path


def rows_in_table(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / "imports.sqlite3")) as conn:
        return conn.execute(f"SELECT count(*) FROM {DATASET}").fetchone()[0]


class Logs:
    """What the api and worker logged since the last look."""

    ALARMS = ("Traceback", "worker restarting in the same process", "crashed")

    def __init__(self, stack: Stack):
        self.paths = [stack.logs / "api.log", stack.logs / "worker.log"]
        self.seen = {p: 0 for p in self.paths}

    def new_alarms(self) -> list[str]:
        found = []
        for path in self.paths:
            text = path.read_text(errors="replace")
            found += [f"{alarm} in {path.name}" for alarm in self.ALARMS if alarm in text[self.seen[path] :]]
            self.seen[path] = len(text)
        return found


def measured(pid: int, logs: Logs, result: Result, run: Callable[[], tuple[str, bool, str]]) -> Result:
    """Run one input with ``pid``'s tree sampled; its outcome, handled or not, and the log alarms."""
    result.start_rss = tree_rss(pid)
    sampler = PeakRss(pid)
    sampler.start()
    started = time.perf_counter()
    try:
        result.outcome, result.handled, result.note = run()
    except Exception as e:  # the bench's own failure to ask is not a verdict on Dataport
        result.outcome, result.handled, result.note = "BENCH ERROR", False, f"{type(e).__name__}: {e}"[:300]
    finally:
        result.seconds = time.perf_counter() - started
        result.peak_rss = sampler.stop()
    time.sleep(0.05)  # a log line written as the answer went out
    if alarms := logs.new_alarms():
        result.handled = False
        result.note = "; ".join([*alarms, result.note] if result.note else alarms)
    return result


# --- files ----------------------------------------------------------------------------------------


async def import_and_follow(client: DataportClient, case: Case, path: Path, size: int) -> dict | None:
    """requestImport, upload, startImport, follow: the final task (None if it never got there)."""
    task = await client.request_import(
        {
            "dataset": DATASET,
            "format": case.format,
            "fileName": case.file_name,
            "maxErrors": case.max_errors,
            "fileSize": size,
        }
    )
    await asyncio.to_thread(client.upload, task["upload"], path)
    task = await client.start_import(task["id"])
    try:
        async with asyncio.timeout(IMPORT_TIMEOUT):
            async with contextlib.aclosing(client.follow(task["id"], IMPORT_PROGRESS)) as snapshots:
                async for snapshot in snapshots:
                    if snapshot["status"] in FINAL:
                        break
    except TimeoutError:
        return None
    return (await client.execute(IMPORT_TASK, {"id": task["id"]}))["importTask"]


def run_file(client: DataportClient, case: Case, scratch: Path, data_dir: Path) -> tuple[str, bool, str]:
    path = scratch / case.file_name
    size = path.write_bytes(case.build())
    try:
        task = asyncio.run(import_and_follow(client, case, path, size))
    except ClientError as e:  # refused before the worker saw it: coded, but the file was not tried
        return f"refused: {e}"[:60], False, "the file never reached the worker"
    finally:
        path.unlink()
    if task is None:
        return "HUNG", False, f"no final status in {IMPORT_TIMEOUT:.0f} s"
    if task["status"] not in FINAL:
        return task["status"], False, "the subscription ended before a final status"
    notes = []
    if task["status"] == "SUCCEEDED":  # rows that fail each carry their reason: coded too
        outcome = f"{ROW_ERRORS} ({task['rowsFailed']:,})" if task["rowsFailed"] else "SUCCEEDED"
        handled = bool(task["rowsFailed"]) or case.outcome == "SUCCEEDED"
        if task["rowsFailed"] and task["errorReportUrl"]:
            report = httpx.get(task["errorReportUrl"], timeout=60).text
            if case.says not in report:
                notes.append(f"the report does not say {case.says!r}")
    else:
        error = task["error"] or {}
        outcome = error.get("code") or f"{task['status']} without a code"
        handled = bool(error.get("code")) and error["code"] != "INTERNAL_ERROR"
        if case.says not in (error.get("message") or ""):
            notes.append(f"message: {(error.get('message') or '')[:80]!r}")
    if task["attempts"] != 1:
        notes.append(f"{task['attempts']} attempts")
    if (rows := rows_in_table(data_dir)) and case.name != "control":
        notes.append(f"{rows} rows in the table")
    return outcome, handled, "; ".join(notes)


def control_case() -> Case:
    rows = "".join(f"{i},row {i}\r\n" for i in (1, 2, 3))
    return Case("control", "CSV", lambda: f"id,name\r\n{rows}".encode(), "SUCCEEDED", "")


def run_files(stack: Stack, secret: str, logs: Logs, scratch: Path, data_dir: Path) -> list[Result]:
    assert stack.worker is not None
    client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), "bench-hostile-files"))
    results = []
    for case in [*cases(), control_case()]:
        result = measured(
            stack.worker.pid,
            logs,
            Result("files", case.name, case.outcome),
            lambda case=case: run_file(client, case, scratch, data_dir),
        )
        results.append(result)
        console.print(
            f"  {case.name}: {result.outcome} ({result.seconds:.1f} s, {mib(result.peak_rss)} MiB)", highlight=False
        )
    return results


# --- requests -------------------------------------------------------------------------------------


def code_in(body: Any) -> str:
    """The code of a refusal: a top-level GraphQL error's, the stream route's, or a user error's."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("error"), dict):  # the stream route's
        return str(body["error"].get("code") or "")
    if body.get("errors"):
        first = body["errors"][0]
        return str((first.get("extensions") or {}).get("code") or "") if isinstance(first, dict) else ""
    for payload in (body.get("data") or {}).values():
        if isinstance(payload, dict) and payload.get("userErrors"):
            return str(payload["userErrors"][0]["code"])
    return ""


def answer(response: httpx.Response) -> tuple[str, bool, str]:
    """``"<status> <code>"``. Handled when coded: a code in the body, or a 4xx status that says what
    was wrong (the upload route's answers are plain HTTP); never with a 5xx, "Internal" or a traceback."""
    try:
        code = code_in(response.json())
    except ValueError:
        code = ""
    bad = response.status_code >= 500 or "Internal" in response.text or "Traceback" in response.text
    if code:
        return f"{response.status_code} {code}", not bad, ""
    if response.is_client_error and not bad:
        return str(response.status_code), True, response.text[:120]
    return f"{response.status_code} (no code)", False, response.text[:120]


class Requests:
    """The hostile requests, each a method returning (outcome, handled, note)."""

    def __init__(self, stack: Stack, secret: str):
        self.stack, self.secret = stack, secret
        self.url = stack.url
        self.ws_url = stack.url.replace("http", "ws", 1) + "/graphql"

    def token(self) -> str:  # a fresh user per request: no request borrows another's budget
        return issue_token(Settings(jwt_secret=self.secret), f"bench-hostile-{secrets.token_hex(4)}")

    def post(self, body: bytes | str, token: str | None = None, **headers: str) -> httpx.Response:
        headers = {"content-type": "application/json", **headers}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return httpx.post(f"{self.url}/graphql", content=body, headers=headers, timeout=30)

    def gql(self, query: str, token: str | None = None, variables: dict | None = None) -> httpx.Response:
        return self.post(json.dumps({"query": query, "variables": variables or {}}), token)

    def exports_of(self, token: str) -> int:
        return self.gql("{ exportTasks { totalCount } }", token).json()["data"]["exportTasks"]["totalCount"]

    def cases(self) -> list[tuple[str, str, Callable[[], tuple[str, bool, str]]]]:
        """(name, expected outcome, run)."""
        too_complex, too_large, bad = "200 QUERY_TOO_COMPLEX", "413 PAYLOAD_TOO_LARGE", "400 BAD_REQUEST"
        filt = "200 INVALID_FILTER_VALUE"
        return [
            ("900 aliased requestExport", too_complex, self.aliased_exports),
            (
                "1,000 aliases of __typename",
                too_complex,
                lambda: answer(self.gql("{" + " ".join(f"a{i}: __typename" for i in range(1000)) + "}", self.token())),
            ),
            (
                "depth bomb (datasets x12)",
                too_complex,
                lambda: answer(self.gql("{ " + "datasets { " * 12 + "name" + " }" * 12 + " }", self.token())),
            ),
            ("doubling fragment chain (2^39)", too_complex, self.fragment_chain),
            ("0.8 MB aliased __schema, anonymous, x20", too_large, self.anonymous_schema_flood),
            (
                "0.8 MB aliased __schema, signed in",
                too_complex,
                lambda: answer(
                    self.gql(
                        "{" + " ".join(f"s{i}: __schema {{ types {{ name }} }}" for i in range(25_000)) + "}",
                        self.token(),
                    )
                ),
            ),
            ("100 MB body, no token", too_large, self.hundred_mb_body),
            ("endless chunked body, signed in", f"{too_large} / reset", self.endless_body),
            ("body: a JSON string", bad, lambda: answer(self.post(b'"just a string"', self.token()))),
            ("body: null", bad, lambda: answer(self.post(b"null", self.token()))),
            ("body: not UTF-8", bad, lambda: answer(self.post(b'{"query": "{ __typename }"\xff\xfe}', self.token()))),
            ("body: a 4,301-digit number", bad, lambda: answer(self.post(b"1" * 4301, self.token()))),
            (
                "body: nested 100,000 deep",
                bad,
                lambda: answer(self.post(b"[" * 100_000 + b"]" * 100_000, self.token())),
            ),
            ("1,000 anonymous WebSockets", "close 4401", self.anonymous_sockets),
            ("graphql-ws init without a token", "close 4401 UNAUTHENTICATED", lambda: self.refused_init(LEGACY, {})),
            (
                "init with authorization 12345",
                "close 4401",
                lambda: self.refused_init(TRANSPORT, {"authorization": 12345}),
            ),
            ("2 MiB WebSocket message", "close 1009", self.big_ws_message),
            ("filter id = 2^64", filt, lambda: self.export_with([{"field": "id", "op": "EQ", "value": 2**64}])),
            (
                "filter seen_at > 0001-01-01T00:00:00+01:00",
                filt,
                lambda: self.export_with([{"field": "seen_at", "op": "GT", "value": "0001-01-01T00:00:00+01:00"}]),
            ),
            (
                "filter seen_at < 9999-12-31T23:59:59-01:00",
                filt,
                lambda: self.export_with([{"field": "seen_at", "op": "LT", "value": "9999-12-31T23:59:59-01:00"}]),
            ),
            (
                "5,000 filters",
                "200 TOO_MANY_VALUES",
                lambda: self.export_with([{"field": "id", "op": "GTE", "value": i} for i in range(5000)]),
            ),
            ("requestExport limit 2^63", "200 GRAPHQL_VALIDATION_FAILED", self.limit_beyond_int),
            ("stream limit 2^63", "400 INVALID_LIMIT", lambda: self.stream(limit=str(2**63))),
            ("stream filter id:eq:2^64", "400 INVALID_FILTER_VALUE", lambda: self.stream(filter=f"id:eq:{2**64}")),
            (
                "stream filter seen_at 9999-12-31T23:59:59-01:00",
                "400 INVALID_FILTER_VALUE",
                lambda: self.stream(filter="seen_at:lt:9999-12-31T23:59:59-01:00"),
            ),
            ("fileName x.partial-1.csv", "200 INVALID_FILE_NAME", lambda: self.import_named("x.partial-1.csv")),
            ("fileName of 607 bytes", "200 INVALID_FILE_NAME", lambda: self.import_named("東" * 201 + ".csv")),
            ("maxErrors over its maximum", "200 INVALID_MAX_ERRORS", self.max_errors_over),
            ("PUT larger than the declared fileSize", "413", self.upload_too_large),
            ("PUT after the import started", "409", self.upload_after_start),
        ]

    # GraphQL documents

    def aliased_exports(self) -> tuple[str, bool, str]:
        token = self.token()
        outcome = answer(self.gql("mutation {" + " ".join(f"e{i}: {EXPORT_FIELD}" for i in range(900)) + "}", token))
        queued = self.exports_of(token)
        return outcome[0], outcome[1] and queued == 0, f"{queued} tasks queued"

    def fragment_chain(self) -> tuple[str, bool, str]:
        fragments = ["fragment F0 on Query { __typename }"]
        fragments += [f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, 40)]
        return answer(self.gql(" ".join(fragments) + " { ...F39 }", self.token()))

    def anonymous_schema_flood(self) -> tuple[str, bool, str]:
        query = "{" + " ".join(f"s{i}: __schema {{ types {{ name fields {{ name }} }} }}" for i in range(17_000)) + "}"
        body = json.dumps({"query": query}).encode()

        async def scenario() -> tuple[list[httpx.Response], list[float]]:
            async with httpx.AsyncClient(timeout=30) as http:

                async def health() -> float:
                    started = time.monotonic()
                    (await http.get(f"{self.url}/healthz")).raise_for_status()
                    return time.monotonic() - started

                attacks = [
                    http.post(f"{self.url}/graphql", content=body, headers={"content-type": "application/json"})
                    for _ in range(20)
                ]
                done = await asyncio.gather(*attacks, *(health() for _ in range(5)))
                return done[:20], done[20:]

        responses, health = asyncio.run(scenario())
        outcomes = {answer(r) for r in responses}
        outcome, handled, _ = sorted(outcomes)[0]
        return (
            outcome if len(outcomes) == 1 else " / ".join(sorted(o for o, _, _ in outcomes)),
            all(h for _, h, _ in outcomes),
            f"/healthz meanwhile: at most {max(health) * 1000:.0f} ms",
        )

    # request bodies over a raw socket

    async def raw_post(self, headers: str, chunks: Iterator[bytes]) -> tuple[bytes | None, int]:
        """Send while reading (the tests' ``_raw_post``); the response (None if reset), bytes sent."""
        return await _raw_post(self.stack, headers, chunks)

    @staticmethod
    def raw_answer(head: bytes | None) -> tuple[str, bool]:
        if not head:
            return "reset", False
        status = head.split(b" ", 2)[1].decode()
        body = head.partition(b"\r\n\r\n")[2]
        try:
            code = code_in(json.loads(body))
        except ValueError:
            code = ""
        return f"{status} {code or '(no code)'}", bool(code) and not status.startswith("5")

    def hundred_mb_body(self) -> tuple[str, bool, str]:
        headers = (
            f"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * MiB}\r\n\r\n"
        )
        head, _ = asyncio.run(self.raw_post(headers, iter(())))  # the headers alone get the answer
        return (*self.raw_answer(head), "answered on the headers alone" if head else "")

    def endless_body(self) -> tuple[str, bool, str]:
        headers = (
            f"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {self.token()}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = f"{65536:x}\r\n".encode() + b" " * 65536 + b"\r\n"
        head, sent = asyncio.run(self.raw_post(headers, (chunk for _ in range(1_000_000))))
        outcome, handled = self.raw_answer(head)
        if head is None:  # a reset while the client still sends is a refusal too, if it came early
            outcome, handled = "reset", sent < 40 * MiB
        return outcome, handled, f"{sent / MiB:.0f} MiB sent before the answer"

    # WebSockets

    async def init_and_wait(
        self, protocol: str, payload: Any, *raw: str | bytes, token: str | None = None, within: float = 10
    ) -> tuple[int | None, list[dict]]:
        received: list[dict] = []
        async with (
            asyncio.timeout(within),
            websockets.connect(self.ws_url, subprotocols=[protocol], max_size=None) as ws,
        ):
            if token:
                await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
                if json.loads(await ws.recv())["type"] != "connection_ack":
                    raise RuntimeError("a valid token was not acknowledged")
            else:
                await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
            for message in raw:
                await ws.send(message)
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    received.append(json.loads(message))
            return ws.close_code, received

    def refused_init(self, protocol: str, payload: Any) -> tuple[str, bool, str]:
        code, received = asyncio.run(self.init_and_wait(protocol, payload))
        acked = any(m.get("type") == "connection_ack" for m in received)
        said = [
            m["payload"].get("extensions", {}).get("code")
            for m in received
            if m.get("type") == "connection_error" and isinstance(m.get("payload"), dict)
        ]
        outcome = f"close {code}" + (f" {said[0]}" if said else "")
        return outcome, code in (4401, 4403) and not acked, "acknowledged!" if acked else ""

    def anonymous_sockets(self) -> tuple[str, bool, str]:
        async def all_of_them() -> list[int | None]:
            codes: list[int | None] = []
            for _ in range(5):  # 5 x 200 at once keeps the client's own descriptors comfortable
                done = await asyncio.gather(*(self.init_and_wait(TRANSPORT, {}, within=30) for _ in range(200)))
                codes += [code for code, _ in done]
            return codes

        codes = asyncio.run(all_of_them())
        kinds = sorted({str(c) for c in codes})
        return (
            f"close {' / '.join(kinds)}",
            all(c == 4401 for c in codes),
            f"{codes.count(4401)} of {len(codes)} closed with 4401",
        )

    def big_ws_message(self) -> tuple[str, bool, str]:
        message = json.dumps({"type": "ping", "payload": {"x": "y" * (2 * MiB)}})
        code, _ = asyncio.run(self.init_and_wait(TRANSPORT, None, message, token=self.token()))
        return f"close {code}", code in (1009, 4400, 4413), ""

    # edge values

    def export_with(self, filters: list[dict]) -> tuple[str, bool, str]:
        token = self.token()
        outcome = answer(
            self.gql(REQUEST_EXPORT, token, {"i": {"dataset": DATASET, "format": "CSV", "filters": filters}})
        )
        queued = self.exports_of(token)
        return outcome[0], outcome[1] and queued == 0, outcome[2] or f"{queued} tasks queued"

    def limit_beyond_int(self) -> tuple[str, bool, str]:
        response = self.gql(REQUEST_EXPORT, self.token(), {"i": {"dataset": DATASET, "format": "CSV", "limit": 2**63}})
        outcome, handled, note = answer(response)
        errors = response.json().get("errors") or [{}]
        if handled or response.status_code >= 500 or "Internal" in response.text:
            return outcome, handled, note
        # GraphQL's own validation of variables: refused before any resolver, and by design without a
        # code (api/graphql_errors.py); clean, but not the coded error the issue asks for.
        return (f"{response.status_code} validation error (no code)", False, errors[0].get("message", "")[:100])

    def stream(self, **params: str) -> tuple[str, bool, str]:
        return answer(
            httpx.get(
                f"{self.url}/exports/stream",
                params={"dataset": DATASET, "columns": "id", **params},
                headers={"Authorization": f"Bearer {self.token()}"},
                timeout=30,
            )
        )

    # imports and uploads

    def request_import(self, token: str, **extra: Any) -> httpx.Response:
        return self.gql(
            REQUEST_IMPORT, token, {"i": {"dataset": DATASET, "format": "CSV", "fileName": "rows.csv", **extra}}
        )

    def import_named(self, file_name: str) -> tuple[str, bool, str]:
        return answer(self.request_import(self.token(), fileName=file_name))

    def max_errors_over(self) -> tuple[str, bool, str]:
        return answer(self.request_import(self.token(), maxErrors=Settings().import_max_errors_limit + 1))

    def upload_too_large(self) -> tuple[str, bool, str]:
        content = b"id,name\r\n1,a\r\n"
        task = self.request_import(self.token(), fileSize=len(content) - 1).json()["data"]["requestImport"]["task"]
        upload = task["upload"]
        return answer(httpx.put(upload["url"], content=content, headers=upload["headers"], timeout=30))

    def upload_after_start(self) -> tuple[str, bool, str]:
        token = self.token()
        content = b"id,name\r\n"  # no rows: the table stays empty
        task = self.request_import(token).json()["data"]["requestImport"]["task"]
        upload = task["upload"]
        httpx.put(upload["url"], content=content, headers=upload["headers"], timeout=30).raise_for_status()
        started = self.gql(
            "mutation($id: ID!) { startImport(id: $id) { userErrors { code } } }", token, {"id": task["id"]}
        ).json()["data"]["startImport"]
        if started["userErrors"]:
            raise RuntimeError(f"startImport: {started['userErrors']}")
        return answer(httpx.put(upload["url"], content=content, headers=upload["headers"], timeout=30))


def run_requests(stack: Stack, secret: str, logs: Logs) -> list[Result]:
    assert stack.api is not None
    requests = Requests(stack, secret)
    results = []
    for name, expected, run in requests.cases():
        result = measured(stack.api.pid, logs, Result("requests", name, expected), run)
        results.append(result)
        console.print(f"  {name}: {result.outcome} ({result.seconds:.2f} s)", highlight=False)
    return results


# --- report ---------------------------------------------------------------------------------------


def print_results(results: list[Result], title: str, rss_label: str) -> None:
    table = Table(title=title)
    for column in ("input", "outcome", "expected", rss_label, "grew", "seconds", "note"):
        table.add_column(
            column, justify="right" if column in (rss_label, "grew", "seconds") else "left", overflow="fold"
        )
    for r in results:
        style = "green" if r.as_expected else "yellow" if r.handled else "red"
        over = r.section == "files" and r.peak_rss >= RSS_TARGET
        table.add_row(
            r.name,
            f"[{style}]{r.outcome}[/{style}]",
            "-" if r.as_expected else r.expected,
            f"[red]{mib(r.peak_rss)}[/red]" if over else mib(r.peak_rss),
            f"{max(0, r.peak_rss - r.start_rss) / MiB:+.1f}",
            f"{r.seconds:.2f}",
            r.note,
        )
    console.print(table)


def process_check(stack: Stack, started: dict[str, float]) -> dict[str, bool]:
    """The api and the worker are the processes started at first, alive; no traceback in their logs."""
    checks = {}
    for name, process in (("api", stack.api), ("worker", stack.worker)):
        try:
            same = (
                process is not None
                and process.poll() is None
                and psutil.Process(process.pid).create_time() == started[name]
            )
        except psutil.NoSuchProcess:
            same = False
        checks[f"{name} alive, same pid"] = same
    for log in ("api.log", "worker.log"):
        text = (stack.logs / log).read_text(errors="replace")
        checks[f"no Traceback in {log}"] = "Traceback" not in text
    checks["no in-place worker restart"] = "worker restarting in the same process" not in (
        stack.logs / "worker.log"
    ).read_text(errors="replace")
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("files", "requests", "fairness"), help="one part only")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "hostile.json")
    args = parser.parse_args()
    parts = [args.only] if args.only else ["files", "requests", "fairness"]

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    scratch = Path(tempfile.mkdtemp(prefix="hostile-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    files: list[Result] = []
    requests: list[Result] = []
    checks: dict[str, bool] = {}
    idle_rss = None
    fair: fairness_bench.Outcome | None = None
    error = None
    try:
        redis.start()
        if "files" in parts or "requests" in parts:
            data_dir = scratch / "data"
            env = stack_env(
                data_dir,
                scratch / "files",
                redis.url,
                secret,
                port,
                datasets=write_datasets(data_dir),
                dev_mode="true",
                log_format="text",
                mutation_rate_per_user=RAISED,
                mutation_rate_per_ip=RAISED,
                max_active_tasks_per_user=RAISED,
            )
            stack = Stack(env, port, OUT_DIR / "logs" / "hostile")
            try:
                stack.start()
                assert stack.api is not None and stack.worker is not None
                started = {
                    name: psutil.Process(p.pid).create_time()
                    for name, p in (("api", stack.api), ("worker", stack.worker))
                }
                idle_rss = tree_rss(stack.worker.pid)
                logs = Logs(stack)
                logs.new_alarms()
                if "files" in parts:
                    console.print(f"files: {len(cases())} hostile files and a control import, one at a time")
                    files = run_files(stack, secret, logs, scratch, data_dir)
                if "requests" in parts:
                    console.print("requests:")
                    requests = run_requests(stack, secret, logs)
                checks = process_check(stack, started)
            finally:
                stack.stop()
        if "fairness" in parts:
            console.print("fairness: A queues 30 full-size exports, then B asks for 10 rows (about a minute)")
            fair = fairness_bench.fairness(redis.url, scratch, label="fair")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    if files:
        print_results(
            files,
            "Hostile files: requestImport -> PUT -> startImport -> final status (1 worker)",
            "worker peak RSS MiB",
        )
    if requests:
        print_results(requests, "Hostile requests", "api peak RSS MiB")
    if fair is not None:
        fairness_bench.print_table([fair])

    tried = files + requests
    handled = [r for r in tried if r.handled]
    worst = max(files, key=lambda r: r.peak_rss, default=None)
    grew = max(files, key=lambda r: r.peak_rss - r.start_rss, default=None)
    targets: dict[str, bool] = {}
    if tried:
        targets["every input handled with a coded error"] = len(handled) == len(tried)
    if files:
        targets["worker peak RSS < 400 MiB for every input"] = all(r.peak_rss < RSS_TARGET for r in files)
    if checks:
        targets["no process restart, no traceback"] = all(checks.values())
    if fair is not None:
        targets["B waits under one full-size job"] = fair.ratio is not None and fair.ratio < 1
    if tried:
        console.print(
            f"inputs tried {len(tried)} ({len(files)} files, {len(requests)} requests), "
            f"handled {len(handled)}, as expected {sum(r.as_expected for r in tried)}, "
            + (
                f"worst worker RSS {mib(worst.peak_rss)} MiB (idle {mib(idle_rss)} MiB; the most added by "
                f"one input: {(grew.peak_rss - grew.start_rss) / MiB:+.1f} MiB, {grew.name})"
                if worst and grew
                else "no files"
            ),
            highlight=False,
        )
    for r in tried:
        if not r.handled:
            console.print(f"[red]not handled:[/red] {r.name}: {r.outcome} {r.note}", highlight=False)
    if checks:
        console.print("processes: " + ", ".join(f"{name} {'ok' if ok else 'NO'}" for name, ok in checks.items()))
    if fair is not None:
        console.print(
            f"fairness: B waited {fair.b_wait_seconds:.2f} s, one full-size job took "
            f"{fair.job_seconds:.2f} s: {fair.ratio:.2f} of a job"
            if fair.ratio is not None
            else f"fairness: no figure: {fair.error}",
            highlight=False,
        )
    for name, ok in targets.items():
        console.print(f"{name}: " + ("[green]met[/green]" if ok else "[red]MISS[/red]"))
    if error:
        console.print(f"[red]error:[/red] {error} (logs in {OUT_DIR / 'logs'})")

    write_json(
        args.out,
        "hostile",
        load_average_at_start=load,
        parts=parts,
        error=error,
        idle_worker_rss=idle_rss,
        results=[{**asdict(r), "as_expected": r.as_expected} for r in tried],
        processes=checks,
        fairness={**asdict(fair), "ratio": fair.ratio} if fair else None,
        targets=targets,
    )
    console.print(f"numbers in {args.out}")
    if error:
        return 1
    return 1 if args.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
