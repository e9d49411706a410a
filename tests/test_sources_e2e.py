"""Exports from every source through the real api and worker, and through the streaming route:
the same rows as SQLite, with progress totals from each source."""

from __future__ import annotations

import csv
import io
import json
import uuid

import httpx
import pytest

from tests.fixtures.stack import SPECIAL_COLUMNS, SPECIAL_ROWS

SOURCES = ["special", "special_pg", "special_os"]
NAMES = [c.name for c in SPECIAL_COLUMNS]


def _cells(content: bytes, fmt: str) -> list[dict]:
    """Rows as dicts of text, however the format spells them, to compare sources by value."""
    if fmt == "CSV":
        rows = list(csv.reader(io.StringIO(content.decode(), newline="")))
        return [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    parsed = json.loads(content) if fmt == "JSON" else [json.loads(line) for line in content.splitlines()]
    return [
        {k: "" if v is None else json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in parsed
    ]


@pytest.mark.parametrize("fmt", ["CSV", "JSON", "NDJSON"])
def test_every_source_exports_the_same_rows_through_the_worker(local_stack, fmt):
    api = local_stack.api()
    files = {}
    for dataset in SOURCES:
        task, content = api.run_export(dataset=dataset, format=fmt)
        assert task["rowCount"] == len(SPECIAL_ROWS), dataset
        assert task["progress"]["totalRows"] == len(SPECIAL_ROWS) and task["progress"]["percent"] == 100.0
        files[dataset] = _cells(content, fmt)
    assert files["special_pg"] == files["special"]
    assert files["special_os"] == files["special"]


def test_filters_and_sorts_mean_the_same_everywhere(local_stack):
    api = local_stack.api()
    request = {
        "format": "NDJSON",
        "columns": ["id", "name", "score"],
        "filters": [{"field": "score", "op": "GTE", "value": 0}, {"field": "name", "op": "NE", "value": "plain"}],
        "sort": [{"field": "score", "direction": "DESC"}],
    }
    results = {d: api.run_export(dataset=d, **request)[1] for d in SOURCES}
    assert results["special_pg"] == results["special"] == results["special_os"]
    assert [json.loads(line)["id"] for line in results["special"].splitlines()] == [6, 7, 4, 5]


def test_jsonb_documents_are_discovered_as_dotted_columns(local_stack):
    api = local_stack.api()
    datasets = api.data("{ datasets { name source columns { name type filterable sortable } } }")["datasets"]
    docs = next(d for d in datasets if d["name"] == "special_docs")
    types = {c["name"]: c["type"] for c in docs["columns"]}
    assert docs["source"] == "postgres"
    assert types["id"] == "integer" and types["data.name"] == "string" and types["data.score"] == "float"
    assert types["data.active"] == "boolean" and types["data.born"] == "date" and types["data.seen_at"] == "datetime"
    _, content = api.run_export(
        dataset="special_docs",
        format="NDJSON",
        columns=["id", "data.name", "data.seen_at"],
        sort=[{"field": "data.seen_at", "direction": "DESC"}],
    )
    rows = [json.loads(line) for line in content.splitlines()]
    assert rows[0] == {"id": 3, "data.name": 'say "hello", world', "data.seen_at": None}  # nulls first, descending
    assert [r["id"] for r in rows[1:]] == [6, 4, 1, 7, 5, 2]


@pytest.mark.parametrize("dataset", SOURCES)
def test_the_streaming_route_serves_every_source(local_stack, dataset):
    token = local_stack.token("stream-sources")
    for fmt in ("CSV", "NDJSON"):
        streamed = httpx.get(
            f"{local_stack.url}/exports/stream",
            params={"dataset": dataset, "format": fmt},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert streamed.status_code == 200, streamed.text
        _, from_worker = local_stack.api().run_export(dataset=dataset, format=fmt)
        assert streamed.content == from_worker, (dataset, fmt)


EVIL_NAMES = ['id"; DROP TABLE special; --', "name') OR 1=1 --", "data->>'x'", "*", "_id"]
EVIL_VALUES = ["x' OR '1'='1", 'x" OR "1"="1', "'; DROP TABLE special; --", "*", "?", "\\", "%", "_", "a*b"]


@pytest.mark.parametrize("dataset", SOURCES)
def test_injection_in_names_is_refused_and_in_values_is_bound(local_stack, dataset):
    api = local_stack.api()
    for name in EVIL_NAMES:
        for attempt in (
            {"columns": ["id", name]},
            {"sort": [{"field": name}]},
            {"filters": [{"field": name, "op": "EQ", "value": "x"}]},
        ):
            errors = api.request_export(dataset=dataset, **attempt)["userErrors"]
            assert [e["code"] for e in errors] == ["UNKNOWN_COLUMN"], (name, attempt)
        streamed = httpx.get(
            f"{local_stack.url}/exports/stream", params={"dataset": dataset, "sort": f"-{name}"}, headers=api.headers
        )
        assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "UNKNOWN_COLUMN"
    for op in ("EQ", "CONTAINS", "PREFIX"):  # the streaming route runs the same compiled query, faster
        headers = {
            "Authorization": f"Bearer {local_stack.token(f'evil-{dataset}-{op}')}",  # within rate limits
            "X-Forwarded-For": f"198.51.100.{uuid.uuid4().int % 250}",
        }
        for value in EVIL_VALUES:
            streamed = httpx.get(
                f"{local_stack.url}/exports/stream",
                headers=headers,
                params={"dataset": dataset, "format": "ndjson", "columns": "id", "filter": f"name:{op}:{value}"},
            )
            assert streamed.status_code == 200 and streamed.content == b"", (value, op, streamed.text)
    task, _ = api.run_export(dataset=dataset, format="CSV", columns=["id"])
    assert task["rowCount"] == len(SPECIAL_ROWS), "the table is intact"
