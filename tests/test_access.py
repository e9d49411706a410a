"""Who may see what, end to end: dataset permissions, tenant scope and the admin role, through
every entry point of a real api and worker (GraphQL queries, mutations and subscriptions, the
streaming route, downloads). The scope's compilation in each source is tests/test_tenant_scope.py;
the worker's refusal of another tenant's rows is tests/test_scoped_imports.py."""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.auth import issue_token
from tests.client import Api
from tests.fixtures.stack import Stack, _stack

ORDERS = [  # id, org_id, amount
    (1, "acme", 10.0),
    (2, "acme", 20.0),
    (3, "globex", 30.0),
    (4, "globex", 40.0),
    (5, "initech", 50.0),
    (6, None, 60.0),
]

DATASETS = """
[datasets.notes]
title = "Open to everyone signed in"
source = "sqlite"
url = "{db}"
table = "notes"
key = ["id"]
importable = true

[datasets.orders]
source = "sqlite"
url = "{db}"
table = "orders"
key = ["id"]
importable = true
readers = ["role:analyst", "role:editor"]
importers = ["role:editor"]
scope = {{ column = "org_id", claim = "org.id" }}

[datasets.secret]
source = "sqlite"
url = "{db}"
table = "notes"
readers = ["user:boss"]
"""


def _database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, org_id TEXT, amount REAL)")
        db.executemany("INSERT INTO orders VALUES (?, ?, ?)", ORDERS)
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 4)])


@pytest.fixture(scope="module")
def access_stack(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("access")
    db = base / "access.db"
    _database(db)
    datasets = base / "datasets.toml"
    datasets.write_text(DATASETS.format(db=db))
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_DATASETS": str(datasets), "DATAPORT_ADMIN_ROLE": "ops"}
    yield from _stack("access", tmp_path_factory, redis_url, test_data, extra, workers=1)


def client(stack: Stack, user: str | None = None, roles: tuple[str, ...] = (), org: str | None = None) -> Api:
    user = user or f"user-{uuid.uuid4().hex[:8]}"
    claims = {"org": {"id": org}} if org is not None else None
    return Api(stack.url, issue_token(stack.settings, user, roles=roles, claims=claims))


def dataset_names(api: Api) -> dict[str, bool]:
    return {d["name"]: d["importable"] for d in api.data("{ datasets { name importable } }")["datasets"]}


def rows_of(content: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode("utf-8-sig"))))


def stream(api: Api, dataset: str) -> httpx.Response:
    return httpx.get(
        f"{api.url}/exports/stream", params={"dataset": dataset, "format": "csv"}, headers=api.headers, timeout=60
    )


# -- dataset permissions ----------------------------------------------------------------------------


def test_each_caller_sees_only_the_datasets_they_may_read(access_stack):
    assert dataset_names(client(access_stack)) == {"notes": True}
    assert dataset_names(client(access_stack, roles=("analyst",))) == {"notes": True, "orders": False}
    assert dataset_names(client(access_stack, roles=("editor",))) == {"notes": True, "orders": True}
    assert dataset_names(client(access_stack, user="boss")) == {"notes": True, "secret": False}
    # The admin role reads every dataset; importing still follows the dataset's importers.
    assert dataset_names(client(access_stack, roles=("ops",))) == {"notes": True, "orders": False, "secret": False}


def test_a_dataset_one_may_not_read_is_answered_exactly_as_a_missing_one(access_stack):
    outsider = client(access_stack)
    missing = outsider.request_export(dataset="nope", format="CSV")["userErrors"]
    hidden = outsider.request_export(dataset="secret", format="CSV")["userErrors"]
    assert [e["code"] for e in hidden] == [e["code"] for e in missing] == ["DATASET_NOT_FOUND"]
    assert hidden[0]["message"] == missing[0]["message"].replace("nope", "secret")
    assert hidden[0]["field"] == missing[0]["field"]

    imported = outsider.request_import(dataset="secret", format="CSV", fileName="x.csv")["userErrors"]
    assert [e["code"] for e in imported] == ["DATASET_NOT_FOUND"]

    hidden_stream, missing_stream = stream(outsider, "secret"), stream(outsider, "nope")
    assert hidden_stream.status_code == missing_stream.status_code == 404
    assert hidden_stream.json()["error"]["code"] == missing_stream.json()["error"]["code"] == "DATASET_NOT_FOUND"

    assert stream(client(access_stack, user="boss"), "secret").status_code == 200


def test_a_reader_who_may_not_import_gets_forbidden(access_stack):
    analyst = client(access_stack, roles=("analyst",), org="acme")
    errors = analyst.request_import(dataset="orders", format="CSV", fileName="x.csv")["userErrors"]
    assert [(e["code"], e["field"]) for e in errors] == [("FORBIDDEN", ["input", "dataset"])]


def test_an_importer_whose_token_lacks_the_scope_claim_is_refused_up_front(access_stack):
    editor = client(access_stack, roles=("editor",))
    errors = editor.request_import(dataset="orders", format="CSV", fileName="x.csv")["userErrors"]
    assert [e["code"] for e in errors] == ["FORBIDDEN"]
    assert "org.id" in errors[0]["message"]


# -- tenant scope -----------------------------------------------------------------------------------


def tenant_ids(org: str | None) -> list[str]:
    return [str(i) for i, owner, _ in ORDERS if owner == org]


@pytest.mark.parametrize("org", ["acme", "globex"])
def test_a_worker_export_holds_only_the_tenants_rows(access_stack, org):
    analyst = client(access_stack, roles=("analyst",), org=org)
    task, content = analyst.run_export(dataset="orders", format="CSV")
    assert [r["id"] for r in rows_of(content)] == tenant_ids(org)
    assert task["rowCount"] == len(tenant_ids(org))
    # Filters narrow within the scope; no filter widens it.
    task, content = analyst.run_export(
        dataset="orders", format="CSV", filters=[{"field": "org_id", "op": "NE", "value": org}]
    )
    assert rows_of(content) == []


def test_the_streaming_route_holds_only_the_tenants_rows(access_stack):
    response = stream(client(access_stack, roles=("analyst",), org="globex"), "orders")
    assert response.status_code == 200, response.text
    assert [r["id"] for r in rows_of(response.content)] == tenant_ids("globex")


def test_a_token_without_the_claim_reads_nothing(access_stack):
    analyst = client(access_stack, roles=("analyst",))
    task, content = analyst.run_export(dataset="orders", format="CSV")
    assert task["rowCount"] == 0 and rows_of(content) == []
    response = stream(analyst, "orders")
    assert response.status_code == 200 and rows_of(response.content) == []


def test_the_scope_is_part_of_the_task_id_and_guards_the_file(access_stack):
    """One user whose claim changed: the same request is a new export, and the old file (another
    tenant's rows) is no longer handed out."""
    user = f"user-{uuid.uuid4().hex[:8]}"
    before = client(access_stack, user=user, roles=("analyst",), org="acme")
    old, _ = before.run_export(dataset="orders", format="CSV")
    after = client(access_stack, user=user, roles=("analyst",), org="globex")
    new, content = after.run_export(dataset="orders", format="CSV")
    assert new["id"] != old["id"]
    assert [r["id"] for r in rows_of(content)] == tenant_ids("globex")
    seen_now = after.task(old["id"])
    assert seen_now is not None and seen_now["status"] == "SUCCEEDED"
    assert seen_now["downloadUrl"] is None
    retried = after.mutate("retryExport", old["id"])
    assert [e["code"] for e in retried["userErrors"]] in (["INVALID_STATUS"], ["DATASET_NOT_FOUND"])


# -- the admin role ---------------------------------------------------------------------------------

LIST = "query($owner: String) {{ {field}(owner: $owner) {{ totalCount edges {{ node {{ id owner }} }} }} }}"


def test_admins_list_and_cancel_any_users_tasks(access_stack):
    user = f"user-{uuid.uuid4().hex[:8]}"
    owner = client(access_stack, user=user)
    waiting = owner.request_import(dataset="notes", format="CSV", fileName="n.csv")["task"]
    admin = client(access_stack, roles=("ops",))

    listed = admin.data(LIST.format(field="importTasks"), {"owner": user})["importTasks"]
    assert [e["node"] for e in listed["edges"]] == [{"id": waiting["id"], "owner": user}]
    seen = admin.import_task(waiting["id"])
    assert seen["id"] == waiting["id"] and seen["upload"] is None  # only the owner may upload

    started = admin.import_mutation("startImport", waiting["id"])
    assert [e["code"] for e in started["userErrors"]] == ["FORBIDDEN"]
    cancelled = admin.import_mutation("cancelImport", waiting["id"])
    assert cancelled["userErrors"] == [] and cancelled["task"]["status"] == "CANCELLED"
    events = owner.import_task(waiting["id"])["events"]
    assert events[-1]["message"].startswith("cancelled by admin")


def test_admins_see_other_users_exports_but_not_another_tenants_file(access_stack):
    user = f"user-{uuid.uuid4().hex[:8]}"
    analyst = client(access_stack, user=user, roles=("analyst",), org="acme")
    scoped, _ = analyst.run_export(dataset="orders", format="CSV")
    plain, _ = analyst.run_export(dataset="notes", format="CSV")

    admin = client(access_stack, roles=("ops",), org="globex")
    listed = admin.data(LIST.format(field="exportTasks"), {"owner": user})["exportTasks"]
    assert {e["node"]["id"] for e in listed["edges"]} == {scoped["id"], plain["id"]}
    assert admin.task(plain["id"])["downloadUrl"] is not None
    assert admin.task(scoped["id"])["downloadUrl"] is None  # acme's rows; the admin's scope is globex
    for mutation in ("retryExport", "deleteExport"):
        assert [e["code"] for e in admin.mutate(mutation, plain["id"])["userErrors"]] == ["FORBIDDEN"]


def test_others_asking_for_an_owner_are_forbidden(access_stack):
    user = client(access_stack)
    own = user.data(LIST.format(field="exportTasks"), {"owner": None})["exportTasks"]
    assert own["totalCount"] == 0
    for field in ("exportTasks", "importTasks"):
        body = user.gql(LIST.format(field=field), {"owner": "somebody-else"})
        assert body["data"] is None
        assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]


def test_another_users_task_does_not_exist_for_a_non_admin(access_stack):
    owner = client(access_stack)
    task, _ = owner.run_export(dataset="notes", format="CSV")
    stranger = client(access_stack, roles=("analyst",))
    assert stranger.task(task["id"]) is None
    assert [e["code"] for e in stranger.mutate("cancelExport", task["id"])["userErrors"]] == ["NOT_FOUND"]
    messages = asyncio.run(stranger.subscribe(task["id"]))
    errors = [e for m in messages for e in (m.get("payload") or {}).get("errors", m.get("payload") or [])]
    assert [e["extensions"]["code"] for e in errors] == ["NOT_FOUND"]

    admin = client(access_stack, roles=("ops",))
    watched = asyncio.run(admin.subscribe(task["id"]))
    assert watched[0]["payload"]["data"]["exportProgress"]["status"] == "SUCCEEDED"


def test_a_task_asked_for_before_its_dataset_was_scoped_fails_clearly():
    """Its request carries no scope: it was asked for every tenant, and must not run as such."""
    from dataport.errors import UserErrors
    from sources.base import Column, Dataset, Scope
    from tasks.exports import task_query

    columns = (Column("id", "integer"), Column("org_id"))
    scoped = Dataset("orders", "sqlite", "x.db", "orders", columns, scope=Scope("org_id", "org"))
    with pytest.raises(UserErrors) as refused:
        task_query(scoped, {"columns": None, "filters": [], "sort": [], "limit": None})
    assert [(e.code, "ask for this export again" in e.message) for e in refused.value.errors] == [("FORBIDDEN", True)]
    assert task_query(scoped, {"scope": {"value": "acme"}}).scope is not None
