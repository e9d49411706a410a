"""A small GraphQL client of Dataport, for the CLI: request an export, follow it, download it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
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
        payload = (await self.execute(REQUEST_EXPORT, {"input": export_input}))["requestExport"]
        if payload["userErrors"]:
            raise ClientError("; ".join(f"{e['message']} [{e['code']}]" for e in payload["userErrors"]))
        return payload["task"]

    async def follow(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """Snapshots from the exportProgress subscription (graphql-transport-ws)."""
        ws_url = self.url.replace("http", "ws", 1) + "/graphql"
        async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init",
                                      "payload": {"authorization": f"Bearer {self.token}"}}))
            ack = json.loads(await ws.recv())
            if ack.get("type") != "connection_ack":
                raise ClientError(f"the server refused the connection: {ack}")
            await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": EXPORT_PROGRESS, "variables": {"id": task_id}}}))
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "next":
                    if message["payload"].get("errors"):
                        raise ClientError(message["payload"]["errors"][0]["message"])
                    yield message["payload"]["data"]["exportProgress"]
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


