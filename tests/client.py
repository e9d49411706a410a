"""A test client of Dataport's GraphQL API over real HTTP and WebSockets."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import websockets

TASK = """
  id status dataset format run attempts queuePosition pollAfterSeconds
  rowCount fileSize checksumSha256 downloadUrl createdAt startedAt finishedAt expiresAt
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds }
  error { code message }
  events { at status message }
"""
# Subscriptions carry the snapshot only (events and poll hints are for queries).
SNAPSHOT = """
  id status run attempts rowCount fileSize checksumSha256
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds }
  error { code message }
"""
PAYLOAD = f"task {{ {TASK} }} userErrors {{ field message code }}"
IMPORT_TASK = """
  id status dataset format mode dryRun attempts rowsImported rowsFailed errorReportUrl pollAfterSeconds
  createdAt startedAt finishedAt
  upload { url method headers fields expiresAt }
  progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds }
  error { code message }
  events { at status message }
"""
IMPORT_SNAPSHOT = """
  id status attempts rowsImported rowsFailed
  progress { processedRows percent bytes }
  error { code message }
"""
IMPORT_PAYLOAD = f"task {{ {IMPORT_TASK} }} userErrors {{ field message code }}"


@dataclass
class Api:
    url: str
    token: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def gql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole response body (data and errors)."""
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, headers=self.headers, timeout=60
        )
        assert response.status_code == 200, response.text
        return response.json()

    def data(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.gql(query, variables)
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def request_export(self, **export_input: Any) -> dict[str, Any]:
        """The requestExport payload: {task, userErrors}."""
        query = f"mutation($i: ExportInput!) {{ requestExport(input: $i) {{ {PAYLOAD} }} }}"
        return self.data(query, {"i": export_input})["requestExport"]

    def export(self, **export_input: Any) -> dict[str, Any]:
        payload = self.request_export(**export_input)
        assert payload["userErrors"] == [], payload["userErrors"]
        return payload["task"]

    def mutate(self, name: str, task_id: str) -> dict[str, Any]:
        return self.data(f"mutation($id: ID!) {{ {name}(id: $id) {{ {PAYLOAD} }} }}", {"id": task_id})[name]

    def task(self, task_id: str) -> dict[str, Any] | None:
        return self.data(f"query($id: ID!) {{ exportTask(id: $id) {{ {TASK} }} }}", {"id": task_id})["exportTask"]

    def wait(self, task_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
        statuses = statuses or ("SUCCEEDED", "FAILED", "CANCELLED")
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task and task["status"] in statuses:
                return task
            assert time.monotonic() < deadline, f"task {task_id} still {task and task['status']}"
            time.sleep(0.1)

    def download(self, url: str) -> httpx.Response:
        # S3 files in clear: the api redirects to a fresh presigned URL (api/downloads.py).
        return httpx.get(url, timeout=60, follow_redirects=True)

    def run_export(self, timeout: float = 120, **export_input: Any) -> tuple[dict[str, Any], bytes]:
        task = self.export(**export_input)
        task = self.wait(task["id"], timeout=timeout)
        assert task["status"] == "SUCCEEDED", task
        response = self.download(task["downloadUrl"])
        assert response.status_code == 200, response.text
        return task, response.content

    async def subscribe(
        self,
        task_id: str,
        protocol: str = "graphql-transport-ws",
        authorization: str | None = "default",
        within: float = 120,
        field: str = "exportProgress",
    ) -> list[dict[str, Any]]:
        """All messages of one exportProgress (or importProgress) subscription until it completes or errors."""
        auth = f"Bearer {self.token}" if authorization == "default" else authorization
        init = {"type": "connection_init", "payload": {"authorization": auth} if auth else {}}
        snapshot = IMPORT_SNAPSHOT if field == "importProgress" else SNAPSHOT
        query = f"subscription($id: ID!) {{ {field}(id: $id) {{ {snapshot} }} }}"
        legacy = protocol == "graphql-ws"
        url = self.url.replace("http", "ws", 1) + "/graphql"
        messages: list[dict[str, Any]] = []
        async with asyncio.timeout(within), websockets.connect(url, subprotocols=[protocol]) as ws:
            await ws.send(json.dumps(init))
            ack = json.loads(await ws.recv())
            assert ack["type"] == "connection_ack", ack
            await ws.send(
                json.dumps(
                    {
                        "id": "1",
                        "type": "start" if legacy else "subscribe",
                        "payload": {"query": query, "variables": {"id": task_id}},
                    }
                )
            )
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "ka":
                    continue
                messages.append(message)
                if message["type"] in ("complete", "error"):
                    break
        return messages

    # -- imports ----------------------------------------------------------------------------------

    def request_import(self, **import_input: Any) -> dict[str, Any]:
        """The requestImport payload: {task, userErrors}."""
        query = f"mutation($i: ImportInput!) {{ requestImport(input: $i) {{ {IMPORT_PAYLOAD} }} }}"
        return self.data(query, {"i": import_input})["requestImport"]

    def import_mutation(self, name: str, task_id: str) -> dict[str, Any]:
        query = f"mutation($id: ID!) {{ {name}(id: $id) {{ {IMPORT_PAYLOAD} }} }}"
        return self.data(query, {"id": task_id})[name]

    def import_task(self, task_id: str) -> dict[str, Any] | None:
        query = f"query($id: ID!) {{ importTask(id: $id) {{ {IMPORT_TASK} }} }}"
        return self.data(query, {"id": task_id})["importTask"]

    def wait_import(self, task_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
        statuses = statuses or ("SUCCEEDED", "FAILED", "CANCELLED")
        deadline = time.monotonic() + timeout
        while True:
            task = self.import_task(task_id)
            if task and task["status"] in statuses:
                return task
            assert time.monotonic() < deadline, f"import {task_id} still {task and task['status']}"
            time.sleep(0.1)

    @staticmethod
    def upload(target: dict[str, Any], content: bytes | Any, file_name: str = "upload") -> httpx.Response:
        """Send the file as a browser would, to the target requestImport gave: a PUT with the given
        headers, or a multipart POST with the given fields first and the file last."""
        if target["method"] == "PUT":
            return httpx.put(target["url"], content=content, headers=target["headers"], timeout=120)
        return httpx.post(target["url"], data=target["fields"], files={"file": (file_name, content)}, timeout=120)

    def start_import(
        self, dataset: str, content: bytes, file_format: str = "CSV", file_name: str = "rows.csv", **import_input: Any
    ) -> dict[str, Any]:
        """Request, upload and start an import; the task as startImport returned it."""
        payload = self.request_import(dataset=dataset, format=file_format, fileName=file_name, **import_input)
        assert payload["userErrors"] == [], payload["userErrors"]
        task = payload["task"]
        assert task["status"] == "WAITING_FOR_UPLOAD", task
        response = self.upload(task["upload"], content, file_name)
        assert response.status_code in (200, 204), response.text
        started = self.import_mutation("startImport", task["id"])
        assert started["userErrors"] == [], started["userErrors"]
        return started["task"]

    def run_import(self, dataset: str, content: bytes, timeout: float = 120, **kwargs: Any) -> dict[str, Any]:
        """An import from request to its final status."""
        task = self.start_import(dataset, content, **kwargs)
        return self.wait_import(task["id"], timeout=timeout)
