"""Property test: whatever filters, sort and limit a user sends, a scoped read returns exactly the
tenant's rows among those the filters match, and never a row of another tenant, on every source.

The same rows (tests/tenant_data.py) are loaded into SQLite, PostgreSQL and OpenSearch. Hypothesis
draws filters from ``sources.query.OPS`` over every column (the scope column included: a user who
may filter on it still cannot reach past it), a sort, a limit and a claim (a tenant, the tenant as
text, no one's value, a quote-and-OR value, ``NO_ROWS``). The expected answer is the same query
read unscoped from the same source, restricted to the tenant in Python.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataport.errors import UserErrors
from sources.base import Column
from sources.opensearch import OpenSearchSource
from sources.postgres import PostgresSource
from sources.query import NO_ROWS, OPS, build_query
from sources.sqlite import SqliteSource
from tests import tenant_data as data
from tests.tenant_data import ORGS, TEAMS

ROWS = data.make_rows(seed=9, count=300)
# Every column filterable here, the scope column too.
COLUMNS = tuple(replace(c, filterable=True) for c in data.COLUMNS)
PLACE = {c.name: i for i, c in enumerate(COLUMNS)}
VALUES: dict[str, list[Any]] = {
    "id": [0, 1, 17, 150, 299, 300, 301],
    "org": [*ORGS, 0, 6],
    "team": [*TEAMS, "a", "x", "", "acm"],
    "name": ["a", "ab", "b", "ba", "abc", "", "Z", "A"],
    "score": [-1.5, 0.0, 0.5, 1.0, 2.0, 10.0],
    "flag": [True, False],
    "day": ["2024-01-01", "2024-01-10", "2024-01-15", "2024-01-28"],
}
# Claims, and the tenant each stands for (None: no rows).
CLAIMS = {
    "org": [*((o, o) for o in ORGS), ("3", 3), (99, 99), ("x' OR '1'='1", None), (NO_ROWS, None)],
    "team": [*((t, t) for t in TEAMS), ("ACME", "ACME"), ("' OR '1'='1", "' OR '1'='1"), (NO_ROWS, None)],
}


@pytest.fixture(scope="module")
async def sources(tmp_path_factory, postgres_db, opensearch_url) -> AsyncIterator[dict[str, Any]]:
    table = f"tenants_prop_{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("tenants-prop") / "rows.sqlite3"
    data.load_sqlite(path, table, ROWS)
    data.load_postgres(postgres_db, table, ROWS)
    data.load_opensearch(opensearch_url, table, ROWS)
    opened = {
        "sqlite": SqliteSource(data.dataset("sqlite", str(path), table, columns=COLUMNS)),
        "postgres": PostgresSource(data.dataset("postgres", postgres_db, table, columns=COLUMNS)),
        "opensearch": OpenSearchSource(
            data.dataset("opensearch", opensearch_url, table, columns=COLUMNS), page_rows=50
        ),
    }
    yield opened
    for source in opened.values():
        await source.close()
    data.drop_opensearch(opensearch_url, table)
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def _ops(column: Column) -> list[str]:
    """The operators ``build_query`` takes for a column of this type."""
    ops = [op for op in OPS if column.type == "string" or op not in ("CONTAINS", "PREFIX")]
    if column.type == "boolean":
        ops = [op for op in ops if op not in ("GT", "GTE", "LT", "LTE", "BETWEEN")]
    return ops


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    column = draw(st.sampled_from(COLUMNS))
    op = draw(st.sampled_from(_ops(column)))
    values = st.sampled_from(VALUES[column.name])
    if op == "IS_NULL":
        return {"field": column.name, "op": op, "value": draw(st.booleans())}
    if op == "BETWEEN":
        return {"field": column.name, "op": op, "values": [draw(values), draw(values)]}
    if op in ("IN", "NOT_IN"):
        return {"field": column.name, "op": op, "values": draw(st.lists(values, min_size=1, max_size=4))}
    return {"field": column.name, "op": op, "value": draw(values)}


sorts = st.lists(
    st.builds(
        lambda c, d: {"field": c.name, "direction": d}, st.sampled_from(COLUMNS), st.sampled_from(["ASC", "DESC"])
    ),
    max_size=2,
    unique_by=lambda s: s["field"],
)


async def _read(source: Any, query: Any) -> list[tuple]:
    return [row async for batch in source.batches(query, 64) for row in batch]


@pytest.mark.parametrize("scope", ["org", "team"])
@pytest.mark.parametrize("name", ["sqlite", "postgres", "opensearch"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chosen=st.lists(filters(), max_size=3),
    order=sorts,
    limit=st.one_of(st.none(), st.integers(1, 40)),
    pick=st.integers(0, 100),
)
async def test_a_scoped_read_is_the_tenants_share_of_the_unscoped_one(sources, name, scope, chosen, order, limit, pick):
    source = sources[name]
    claim, tenant = CLAIMS[scope][pick % len(CLAIMS[scope])]
    unscoped = replace(source.dataset, scope=None)
    scoped = replace(source.dataset, scope=replace(source.dataset.scope, column=scope))
    try:
        everyone = build_query(unscoped, None, chosen, order)
    except UserErrors:
        return  # refused for the filters themselves, scoped or not
    query = build_query(scoped, None, chosen, order, limit, scope=claim)
    at = PLACE[scope]
    got = await _read(source, query)
    assert all(row[at] == tenant for row in got), (name, claim, chosen)
    expected = [] if tenant is None else [r for r in await _read(source, everyone) if r[at] == tenant]
    assert got == expected[:limit], (name, claim, chosen, order, limit)
    assert await source.count(query) == len(expected[:limit])
