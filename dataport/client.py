"""A small GraphQL client of Dataport, for the CLI: request an export or an import, upload, follow
progress over the subscription, download."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

TASK_FIELDS = """
  id status dataset format run attempts rowCount fileSize checksumSha256 downloadUrl queuePosition
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
  id status dataset format mode dryRun attempts rowsImported rowsFailed errorReportUrl
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


class ClientError(Exception):
    pass


@dataclass
class DataportClient:
    url: str  # e.g. http://127.0.0.1:8000
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def execute(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(f"{self.url}/graphql", json={"query": query, "variables": variables},
                                       headers=self.headers)
        body = response.json()
        if body.get("errors"):
            raise ClientError("; ".join(e["message"] for e in body["errors"]))
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
                response = http.put(target["url"], content=chunks(Counted(f)),
                                    headers={**target["headers"], "Content-Length": str(path.stat().st_size)})
            else:  # a presigned POST: the policy's fields first, the file last
                response = http.post(target["url"], data=target["fields"], files={"file": (path.name, Counted(f))})
        if response.status_code not in (200, 201, 204):
            raise ClientError(f"the upload was refused: HTTP {response.status_code} {response.text[:300]}")

    async def follow(self, task_id: str, subscription: str = EXPORT_PROGRESS) -> AsyncIterator[dict[str, Any]]:
        """Snapshots from the exportProgress (or importProgress) subscription (graphql-transport-ws)."""
        field = "importProgress" if subscription is IMPORT_PROGRESS else "exportProgress"
        ws_url = self.url.replace("http", "ws", 1) + "/graphql"
        async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init",
                                      "payload": {"authorization": f"Bearer {self.token}"}}))
            ack = json.loads(await ws.recv())
            if ack.get("type") != "connection_ack":
                raise ClientError(f"the server refused the connection: {ack}")
            await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": subscription, "variables": {"id": task_id}}}))
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "next":
                    if message["payload"].get("errors"):
                        raise ClientError(message["payload"]["errors"][0]["message"])
                    yield message["payload"]["data"][field]
                elif message["type"] == "error":
                    raise ClientError(message["payload"][0]["message"])
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


