"""A small GraphQL client of Dataport, for the CLI: request an export or an import, upload, follow
progress over the subscription, download."""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

TASK_FIELDS = """
  id status dataset format run attempts rowCount fileSize checksumSha256 downloadUrl queuePosition fileName
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds }
  error { code message }
"""

REQUEST_EXPORT = f"""
mutation($input: ExportInput!) {{
  requestExport(input: $input) {{ task {{ {TASK_FIELDS} }} userErrors {{ field message code }} }}
}}"""

EXPORT_TASK = f"query($id: ID!) {{ exportTask(id: $id) {{ {TASK_FIELDS} }} }}"

EXPORT_PROGRESS = f"subscription($id: ID!) {{ exportProgress(id: $id) {{ {TASK_FIELDS} }} }}"

IMPORT_FIELDS = """
  id status dataset format mode dryRun attempts rowsImported rowsFailed errorReportUrl outcome
  upload { url method headers fields expiresAt }
  progress { processedRows percent bytes rowsPerSecond etaSeconds }
  error { code message }
"""

REQUEST_IMPORT = f"""
mutation($input: ImportInput!) {{
  requestImport(input: $input) {{ task {{ {IMPORT_FIELDS} }} userErrors {{ field message code }} }}
}}"""

START_IMPORT = f"""
mutation($id: ID!) {{ startImport(id: $id) {{ task {{ {IMPORT_FIELDS} }} userErrors {{ field message code }} }} }}"""

IMPORT_TASK = f"query($id: ID!) {{ importTask(id: $id) {{ {IMPORT_FIELDS} }} }}"

IMPORT_PROGRESS = f"subscription($id: ID!) {{ importProgress(id: $id) {{ {IMPORT_FIELDS} }} }}"


FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"})
# Errors that pass by themselves: the client waits and asks again.
PASSING_CODES = frozenset({"SERVICE_UNAVAILABLE", "RATE_LIMITED"})
# WebSocket closes that waiting cannot fix: bad token (4401), forbidden, malformed.
REFUSED_CLOSE_CODES = frozenset({4400, 4401, 4403})


class FileFormat(enum.StrEnum):
    """``dataport export|import --format``: the contract's ``FileFormat`` (tests/test_first_hour.py keeps
    them equal); a Typer enum, so a wrong value is refused with the choices listed, in any case."""

    CSV = "CSV"
    JSON = "JSON"
    NDJSON = "NDJSON"
    XLSX = "XLSX"
    PARQUET = "PARQUET"


class Compression(enum.StrEnum):
    """``dataport export --compression``: the contract's ``Compression``."""

    NONE = "NONE"
    GZIP = "GZIP"
    ZSTD = "ZSTD"


class ImportMode(enum.StrEnum):
    """``dataport import --mode``: the contract's ``ImportMode``."""

    INSERT = "INSERT"
    UPSERT = "UPSERT"
    UPDATE = "UPDATE"


class ClientError(Exception):
    """A refusal or failure to show the user in one line; ``code`` is the GraphQL error code, if any."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class PassingError(ClientError):
    """Dataport is briefly unavailable; the same request can succeed a little later."""


class Unreachable(ClientError):
    """Nothing answers at the URL (refused, unknown host, timed out): one line naming the URL, the
    CLI's replacement for httpx's traceback."""


def _error(errors: list[dict[str, Any]]) -> ClientError:
    first = errors[0] if errors else {}
    code = (first.get("extensions") or {}).get("code")
    kind = PassingError if code in PASSING_CODES else ClientError
    return kind(first.get("message") or "the server reported an error", code)


def unreachable(url: str, error: BaseException) -> Unreachable:
    """The one-line message for a server that does not answer at ``url``."""
    reason = str(error) or type(error).__name__
    return Unreachable(f"cannot reach Dataport at {url} ({reason}); is it running? (--url or DATAPORT_URL)")


@dataclass
class DataportClient:
    url: str  # e.g. http://127.0.0.1:8000
    token: str
    token_source: str = "the caller"  # where the token came from, for the message when it is refused

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def execute(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                response = await http.post(
                    f"{self.url}/graphql", json={"query": query, "variables": variables}, headers=self.headers
                )
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        try:
            body = response.json()
        except ValueError:
            raise ClientError(
                f"{self.url}/graphql answered HTTP {response.status_code} without a GraphQL body; is that Dataport?"
            ) from None
        if body.get("errors"):
            raise _error(body["errors"])
        return body["data"]

    async def request_export(self, export_input: dict[str, Any]) -> dict[str, Any]:
        return await self._payload(REQUEST_EXPORT, {"input": export_input}, "requestExport")

    async def request_import(self, import_input: dict[str, Any]) -> dict[str, Any]:
        return await self._payload(REQUEST_IMPORT, {"input": import_input}, "requestImport")

    async def start_import(self, task_id: str) -> dict[str, Any]:
        return await self._payload(START_IMPORT, {"id": task_id}, "startImport")

    async def _payload(self, query: str, variables: dict[str, Any], name: str) -> dict[str, Any]:
        payload = (await self.execute(query, variables))[name]
        if payload["userErrors"]:
            raise ClientError("; ".join(f"{e['message']} [{e['code']}]" for e in payload["userErrors"]))
        return payload["task"]

    def upload(self, target: dict[str, Any], path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Send the file where requestImport said, as a browser would, streamed from disk. Blocking:
        run it in a thread."""

        class Counted:  # a file whose reads are reported, so the upload can show progress
            def __init__(self, f):
                self.f = f

            def read(self, n: int = -1) -> bytes:
                chunk = self.f.read(n)
                if on_bytes and chunk:
                    on_bytes(len(chunk))
                return chunk

        def chunks(f) -> Iterator[bytes]:
            while chunk := f.read(1024 * 1024):
                yield chunk

        with path.open("rb") as f, httpx.Client(timeout=None) as http:
            if target["method"] == "PUT":
                response = http.put(
                    target["url"],
                    content=chunks(Counted(f)),
                    headers={**target["headers"], "Content-Length": str(path.stat().st_size)},
                )
            else:  # a presigned POST: the policy's fields first, the file last
                response = http.post(target["url"], data=target["fields"], files={"file": (path.name, Counted(f))})
        if response.status_code not in (200, 201, 204):
            raise ClientError(f"the upload was refused: HTTP {response.status_code} {response.text[:300]}")

    async def follow(
        self, task_id: str, subscription: str = EXPORT_PROGRESS, give_up_after: float = 600.0
    ) -> AsyncIterator[dict[str, Any]]:
        """Snapshots from the exportProgress (or importProgress) subscription until a final status.

        A dropped connection, an api restart or a ``SERVICE_UNAVAILABLE`` (Redis down) does not end
        it: it subscribes again after a pause that doubles from 1 s up to 30 s (with jitter), the
        current snapshot coming first, until the task ends or Dataport has been unreachable for
        ``give_up_after`` seconds. Refusals that waiting cannot fix (no such task, a bad token)
        raise ``ClientError`` at once."""
        failures = 0
        lost_since: float | None = None
        while True:
            try:
                async for snapshot in self._subscription(task_id, subscription):
                    failures, lost_since = 0, None
                    yield snapshot
                    if snapshot["status"] in FINAL_STATUSES:
                        return
                reason = "the subscription ended before the task did"
            except (PassingError, OSError, websockets.ConnectionClosed) as e:
                reason = str(e) or type(e).__name__
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > give_up_after:
                raise ClientError(f"lost touch with Dataport for {give_up_after:.0f} s: {reason}")
            await asyncio.sleep(min(30.0, 2.0**failures) * random.uniform(0.5, 1.0))
            failures += 1

    async def _subscription(self, task_id: str, subscription: str) -> AsyncIterator[dict[str, Any]]:
        """One subscription (graphql-transport-ws), from connection_init to its end."""
        field = "importProgress" if subscription is IMPORT_PROGRESS else "exportProgress"
        ws_url = self.url.replace("http", "ws", 1) + "/graphql"
        async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {self.token}"}}))
            try:
                ack = json.loads(await ws.recv())
            except websockets.ConnectionClosed as e:
                if e.rcvd is not None and e.rcvd.code in REFUSED_CLOSE_CODES:
                    raise ClientError(f"the server refused the connection: {e.rcvd.reason or e.rcvd.code}") from None
                raise
            if ack.get("type") != "connection_ack":
                raise ClientError(f"the server refused the connection: {ack}")
            await ws.send(
                json.dumps(
                    {"id": "1", "type": "subscribe", "payload": {"query": subscription, "variables": {"id": task_id}}}
                )
            )
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "next":
                    if message["payload"].get("errors"):
                        raise _error(message["payload"]["errors"])
                    yield message["payload"]["data"][field]
                elif message["type"] == "error":
                    raise _error(message["payload"])
                elif message["type"] == "complete":
                    return

    async def download(self, url: str, out: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        partial = out.with_name(out.name + ".partial")
        async with httpx.AsyncClient(timeout=None) as http, http.stream("GET", url) as response:
            if response.status_code != 200:
                raise ClientError(f"download refused: HTTP {response.status_code}")
            with partial.open("wb") as f:
                async for chunk in response.aiter_bytes():
                    f.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        partial.replace(out)
