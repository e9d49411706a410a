"""UPSERT of some columns, UPDATE, previews, column mapping and results files (issue 20, items
1-4), on SQLite, PostgreSQL and OpenSearch.

The import job runs in process (``workers.imports.run_import``, as tests/test_scoped_imports.py
does) against real Redis, real local storage and the real stores. Every dataset here is
``assays``: ``id`` (the key), ``site`` (required), ``au_ppm`` (float) and ``lab``; rows 1-3 are
stored before each test. What each import wrote is read straight from the store.
"""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from opensearchpy import OpenSearch

from dataport.errors import UserErrors
from dataport.settings import Settings
from tasks.ids import random_task_id
from tasks.imports import column_map_problems
from tasks.models import Task, TaskStatus
from tasks.services import Services
from tests.import_jobs import csv_file, read_csv, run_import_task

pytestmark = pytest.mark.timeout(120)

SOURCES = ("sqlite", "postgres", "opensearch")
SEED = [(1, "North", 1.5, "A"), (2, "South", 2.0, "B"), (3, "East", None, "C")]


@dataclass
class World:
    services: Services
    sqlite_path: Path
    postgres_url: str
    pg_table: str
    opensearch_url: str
    os_index: str

    def rows(self, source: str) -> dict[int, tuple[Any, ...]]:
        """Every stored row: id → (site, au_ppm, lab)."""
        if source == "sqlite":
            with sqlite3.connect(self.sqlite_path) as conn:
                return {r[0]: tuple(r[1:]) for r in conn.execute("SELECT id, site, au_ppm, lab FROM assays")}
        if source == "postgres":
            with psycopg.connect(self.postgres_url) as conn:
                found = conn.execute(f'SELECT id, site, au_ppm, lab FROM "{self.pg_table}"').fetchall()
                return {r[0]: tuple(r[1:]) for r in found}
        client = OpenSearch(self.opensearch_url)
        try:
            client.indices.refresh(index=self.os_index)
            hits = client.search(index=self.os_index, body={"size": 1000})["hits"]["hits"]
            return {
                h["_source"]["id"]: (h["_source"].get("site"), h["_source"].get("au_ppm"), h["_source"].get("lab"))
                for h in hits
            }
        finally:
            client.close()


@pytest.fixture
async def world(tmp_path, redis_url, postgres_db, opensearch_url, pg_table) -> AsyncIterator[World]:
    db = tmp_path / "assays.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE assays (id INTEGER PRIMARY KEY, site TEXT NOT NULL, au_ppm REAL, lab TEXT)")
        conn.executemany("INSERT INTO assays VALUES (?, ?, ?, ?)", SEED)
    table = pg_table("assays")
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{table}" (id integer PRIMARY KEY, site text NOT NULL, au_ppm double precision, lab text)'
        )
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{table}" VALUES (%s, %s, %s, %s)', SEED)
    index = f"assays_{uuid.uuid4().hex[:8]}"
    client = OpenSearch(opensearch_url)
    mapping = {
        "properties": {
            "id": {"type": "long"},
            "site": {"type": "keyword"},
            "au_ppm": {"type": "double"},
            "lab": {"type": "keyword"},
        }
    }
    client.indices.create(index=index, body={"mappings": mapping})
    for i, site, au, lab in SEED:
        client.index(index=index, id=str(i), body={"id": i, "site": site, "au_ppm": au, "lab": lab})
    client.indices.refresh(index=index)
    client.close()
    toml = []
    for source, where in (
        ("sqlite", f'url = "{db}"\ntable = "assays"'),
        ("postgres", f'url = "{postgres_db}"\ntable = "{table}"'),
        ("opensearch", f'url = "{opensearch_url}"\nindex = "{index}"'),
    ):
        toml.append(f"""
[datasets.assays_{source}]
source = "{source}"
{where}
key = ["id"]
importable = true

[datasets.assays_{source}.columns]
id = {{ type = "integer", required = true }}
site = {{ type = "string", required = true }}
au_ppm = {{ type = "float" }}
lab = {{ type = "string" }}
""")
    datasets = tmp_path / "datasets.toml"
    datasets.write_text("".join(toml))
    settings = Settings(
        redis_url=redis_url,
        datasets=datasets,
        data_dir=tmp_path / "data",
        jwt_secret="import-modes",
        queue_name=f"dataport:queue:modes-{uuid.uuid4().hex[:6]}",
    )
    services = await Services.start(settings)
    try:
        yield World(services, db, postgres_db, table, opensearch_url, index)
    finally:
        await services.close()
        client = OpenSearch(opensearch_url)
        client.indices.delete(index=index, ignore_unavailable=True)
        client.close()


@dataclass
class Ran:
    task: Task
    report: list[dict[str, str]]
    results: list[dict[str, str]]

    @property
    def preview(self) -> dict[str, Any]:
        assert self.task.preview is not None
        found: dict[str, Any] = orjson.loads(self.task.preview)
        return found


async def run(
    world: World,
    source: str,
    content: bytes,
    *,
    mode: str = "UPSERT",
    dry_run: bool = False,
    results: bool = False,
    column_map: dict[str, str] | None = None,
    file_format: str = "CSV",
) -> Ran:
    """One import task, made as ``request_import`` makes it and run to its end by the worker's job."""
    services = world.services
    identifier = random_task_id()
    file_name = f"assays.{file_format.lower()}"
    key = f"imports/modes/{identifier}/{file_name}"
    request: dict[str, Any] = {"mode": mode, "dryRun": dry_run, "maxErrors": None, "fileName": file_name}
    if results:
        request["results"] = True
    if column_map:
        request["columnMap"] = column_map
    task = await run_import_task(
        services,
        identifier,
        owner="modes-user",
        dataset=f"assays_{source}",
        file_format=file_format,
        key=key,
        content=content,
        request=request,
    )
    return Ran(task, await read_csv(services, task.report_key), await read_csv(services, task.results_key))


def succeeded(ran: Ran) -> None:
    assert ran.task.status is TaskStatus.SUCCEEDED, (ran.task.error_code, ran.task.error_message)


# -- item 1: UPSERT of some columns, UPDATE ----------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_upsert_of_some_columns_changes_only_those(world: World, source: str):
    # The file has id and au_ppm only: site and lab of rows 1 and 2 keep their values.
    ran = await run(world, source, csv_file(["id", "au_ppm"], [[1, 9.5], [2, 2.0]]))
    succeeded(ran)
    assert (ran.task.rows_imported, ran.task.rows_failed) == (2, 0)
    assert world.rows(source) == {1: ("North", 9.5, "A"), 2: ("South", 2.0, "B"), 3: ("East", None, "C")}


@pytest.mark.parametrize("source", SOURCES)
async def test_upsert_inserting_a_row_without_a_required_column_is_a_row_error(world: World, source: str):
    ran = await run(world, source, csv_file(["id", "au_ppm"], [[1, 7.0], [9, 1.0]]))
    succeeded(ran)
    assert (ran.task.rows_imported, ran.task.rows_failed) == (1, 1)
    [line] = ran.report
    assert line["row"] == "2" and line["column"] == "site"
    assert "id=9" in line["reason"] and "required columns site" in line["reason"]
    rows = world.rows(source)
    assert 9 not in rows and rows[1] == ("North", 7.0, "A")
    # With the required column, the same file inserts the new row and updates the other.
    ran = await run(world, source, csv_file(["id", "site", "au_ppm"], [[1, "North", 8.0], [9, "West", 1.0]]))
    succeeded(ran)
    assert world.rows(source)[9] == ("West", 1.0, None) and world.rows(source)[1] == ("North", 8.0, "A")


@pytest.mark.parametrize("source", SOURCES)
async def test_update_refuses_unknown_keys_and_inserts_nothing(world: World, source: str):
    ran = await run(world, source, csv_file(["id", "lab"], [[2, "Z"], [42, "new"]]), mode="UPDATE")
    succeeded(ran)
    assert (ran.task.rows_imported, ran.task.rows_failed) == (1, 1)
    [line] = ran.report
    assert line["row"] == "2" and "no row with id=42 exists" in line["reason"]
    assert world.rows(source) == {1: ("North", 1.5, "A"), 2: ("South", 2.0, "Z"), 3: ("East", None, "C")}


# -- item 2: preview ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_a_dry_run_previews_new_updated_unchanged_and_failed_rows(world: World, source: str):
    content = csv_file(
        ["id", "site", "au_ppm"],
        [[1, "North", 1.5], [2, "South", 3.25], [7, "West", ""], [3, "East", "lots"], [8, "Far", 0.5]],
    )
    ran = await run(world, source, content, dry_run=True)
    succeeded(ran)
    preview = ran.preview
    assert (preview["newRows"], preview["updatedRows"], preview["unchangedRows"], preview["failedRows"]) == (2, 1, 1, 1)
    samples = preview["samples"]
    assert samples["updated"] == [{"row": 2, "key": {"id": 2}, "changes": {"au_ppm": {"old": 2.0, "new": 3.25}}}]
    assert samples["unchanged"] == [{"row": 1, "key": {"id": 1}}]
    assert samples["new"] == [
        {"row": 3, "key": {"id": 7}, "values": {"id": 7, "site": "West", "au_ppm": None}},
        {"row": 5, "key": {"id": 8}, "values": {"id": 8, "site": "Far", "au_ppm": 0.5}},
    ]
    assert [(f["row"], [e["column"] for e in f["errors"]]) for f in samples["failed"]] == [(4, ["au_ppm"])]
    assert (ran.task.rows_imported, ran.task.rows_failed) == (4, 1)
    assert world.rows(source) == {r[0]: r[1:] for r in SEED}  # nothing written


# -- item 3: column mapping, headers ignoring case and spaces -------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_column_map_and_headers_ignoring_case_and_spaces(world: World, source: str):
    content = csv_file(["ID", " Gold (ppm) ", "  Lab "], [[1, 4.5, "L1"], [2, 5.5, "L2"]])
    ran = await run(world, source, content, column_map={"gold (ppm)": "au_ppm"})
    succeeded(ran)
    rows = world.rows(source)
    assert rows[1] == ("North", 4.5, "L1") and rows[2] == ("South", 5.5, "L2")


async def test_an_unknown_header_names_the_closest_column(world: World):
    ran = await run(world, "sqlite", csv_file(["id", "au_pmm"], [[1, 2.0]]))
    assert ran.task.status is TaskStatus.FAILED and ran.task.error_code == "INVALID_HEADER"
    assert "unknown columns: au_pmm (did you mean au_ppm for au_pmm?)" in (ran.task.error_message or "")


async def test_two_headers_for_one_column_are_refused(world: World):
    ran = await run(world, "sqlite", csv_file(["id", "Site", "place"], [[1, "a", "b"]]), column_map={"place": "site"})
    assert ran.task.status is TaskStatus.FAILED and ran.task.error_code == "INVALID_HEADER"
    assert "column site is given by more than one field ('Site', 'place')" in (ran.task.error_message or "")


def test_column_map_problems_name_the_field():
    columns = ["id", "site", "au_ppm"]
    assert column_map_problems({"Gold": "au_ppm"}, columns) == []
    found = column_map_problems({"Gold": "au_pm", "gold ": "site", "x": "site"}, columns)
    messages = [p.message for p in found]
    assert "which is not a column of the dataset (did you mean 'au_ppm'?)" in messages[0]
    assert any("more than once" in m for m in messages) and any("to the same column 'site'" in m for m in messages)
    assert all(p.field[:2] == ("input", "columnMap") for p in found)
    assert column_map_problems(["id"], columns)[0].code == "INVALID_COLUMN_MAP"
    assert isinstance(UserErrors(found), UserErrors)


# -- item 4: the results file ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_the_results_file_has_a_line_per_input_row(world: World, source: str):
    content = csv_file(["id", "au_ppm"], [[1, 1.5], [2, 6.0], [5, 1.0], [3, "x"]])
    ran = await run(world, source, content, results=True)
    succeeded(ran)
    assert [(r["row"], r["outcome"], r["key"]) for r in ran.results] == [
        ("1", "unchanged", "id=1"),
        ("2", "updated", "id=2"),
        ("3", "failed", ""),
        ("4", "failed", ""),
    ]
    assert ran.results[1]["message"] == "changed: au_ppm"
    assert "required columns site" in ran.results[2]["message"] and "au_ppm" in ran.results[3]["message"]
    assert ran.task.results_key and ran.task.results_key.endswith("/report/assays-results.csv")


# -- through the api, the download route and the CLI (tests/fixtures/stack.py's imp_* datasets) ----------

FINISHED = """query($id: ID!) { importTask(id: $id) { id status outcome rowsImported rowsFailed resultsUrl
  errorReportUrl failedSamples preview { newRows updatedRows unchangedRows failedRows samples } } }"""


def _finished(api: Any, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = api.data(FINISHED, {"id": task_id})["importTask"]
    return found


@pytest.mark.parametrize("source", SOURCES)
def test_export_some_columns_edit_and_upsert_changes_only_those(local_stack, test_data, source: str):
    from tests.test_imports import Target, csv_bytes, fresh_ids, good_rows

    api = local_stack.api()
    ids = fresh_ids(3)
    assert api.run_import(f"imp_{source}", csv_bytes(good_rows(ids)))["status"] == "SUCCEEDED"
    _, exported = api.run_export(
        dataset=f"imp_{source}",
        columns=["id", "name", "score"],
        filters=[{"field": "id", "op": "IN", "values": ids}],
        sort=[{"field": "id"}],
    )
    lines = exported.decode().splitlines()
    assert lines[0] == "id,name,score"
    edited = [lines[0], *[line.replace(f"row {ids[1]}", "renamed") for line in lines[1:]]]
    task = api.run_import(f"imp_{source}", ("\r\n".join(edited) + "\r\n").encode(), mode="UPSERT")
    assert task["status"] == "SUCCEEDED" and (task["rowsImported"], task["rowsFailed"]) == (3, 0), task
    target = Target(test_data, source)
    assert target.names(ids) == {ids[0]: f"row {ids[0]}", ids[1]: "renamed", ids[2]: f"row {ids[2]}"}
    # The columns the file left out kept their values (count, born, notes ...).
    _, after = api.run_export(
        dataset=f"imp_{source}", columns=["id", "count", "born", "notes"],
        filters=[{"field": "id", "op": "IN", "values": ids}], sort=[{"field": "id"}],
    )  # fmt: skip
    assert after.decode().splitlines()[1:] == [f"{i},{i % 7},2024-02-29,note" for i in ids]


def test_preview_results_url_and_outcome_through_the_api(local_stack):
    from tests.test_imports import csv_bytes, fresh_ids, good_rows

    api = local_stack.api()
    ids = fresh_ids(3)
    assert api.run_import("imp_sqlite", csv_bytes(good_rows(ids[:2])))["status"] == "SUCCEEDED"
    content = f"ID, Score \r\n{ids[0]},9.5\r\n{ids[1]},{ids[1] / 4}\r\n{ids[2]},x\r\n".encode()
    dry = api.run_import("imp_sqlite", content, mode="UPDATE", dryRun=True)
    preview = _finished(api, dry["id"])["preview"]
    assert (preview["newRows"], preview["updatedRows"], preview["unchangedRows"], preview["failedRows"]) == (0, 1, 1, 1)
    assert preview["samples"]["updated"] == [
        {"row": 1, "key": {"id": ids[0]}, "changes": {"score": {"old": ids[0] / 4, "new": 9.5}}}
    ]
    done = api.run_import("imp_sqlite", content, mode="UPDATE", results=True, columnMap={"score": "score"})
    task = _finished(api, done["id"])
    assert (task["status"], task["outcome"], task["rowsImported"], task["rowsFailed"]) == ("SUCCEEDED", "PARTIAL", 2, 1)
    assert task["preview"] is None and task["failedSamples"][0]["row"] == 3
    assert task["resultsUrl"].startswith(f"{local_stack.url}/files/{done['id']}.results?")
    lines = list(csv.reader(io.StringIO(api.download(task["resultsUrl"]).text)))
    assert lines[0] == ["row", "outcome", "key", "message"]
    assert [line[:3] for line in lines[1:]] == [
        ["1", "updated", f"id={ids[0]}"],
        ["2", "unchanged", f"id={ids[1]}"],
        ["3", "failed", ""],
    ]
    # The report's link cannot be turned into the results' (the signature covers the suffix).
    forged = task["errorReportUrl"].replace(f"/files/{done['id']}?", f"/files/{done['id']}.results?")
    assert httpx.get(forged).status_code == 403
    other = local_stack.api()
    assert other.data(FINISHED, {"id": done["id"]})["importTask"] is None
    refused = api.request_import(dataset="imp_sqlite", fileName="a.csv", columnMap={"Gold": "scor"})
    assert [(e["code"], e["field"]) for e in refused["userErrors"]] == [
        ("INVALID_COLUMN_MAP", ["input", "columnMap", "Gold"])
    ]
    assert "did you mean 'score'" in refused["userErrors"][0]["message"]


def test_the_cli_exits_non_zero_on_refused_rows_unless_allowed(local_stack, tmp_path):
    from tests.test_imports import csv_bytes, fresh_ids, good_rows

    rows = good_rows(fresh_ids(2))
    rows[1][2] = "not a float"
    path = tmp_path / "some-bad.csv"
    path.write_bytes(csv_bytes(rows))
    env = {**os.environ, "DATAPORT_URL": local_stack.url, "DATAPORT_TOKEN": local_stack.token("cli-user")}

    def cli(*extra: str, file: Path = path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dataport.cli", "import", "imp_sqlite", str(file), *extra],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = cli("--mode", "upsert", "--results", str(tmp_path / "results.csv"))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "Some rows were refused" in refused.stdout + refused.stderr
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3
    allowed = cli("--mode", "upsert", "--allow-row-errors")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    clean = tmp_path / "clean.csv"
    clean.write_bytes(csv_bytes(good_rows(fresh_ids(1))))
    assert cli(file=clean).returncode == 0
