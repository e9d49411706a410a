"""Property-based fuzzing of the live GraphQL api (hypothesis-graphql): random valid and invalid
queries and mutations, random query text and random JSON bodies, signed in or not. Whatever comes
in, the answer is a 200, 400 or 413 with a JSON body: never a 5xx, never a masked "Internal error",
never a traceback, and the api log has no traceback either.

The stack is the one without a worker (``queue_stack``), so random mutations that pass validation
queue tasks that never run; the rate limits and quotas they run into are coded errors too.
"""

from __future__ import annotations

import json
import string
import uuid

import httpx
import pytest
from graphql import build_client_schema, get_introspection_query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, mutations, nodes, queries

from tests.fixtures.stack import Stack

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Custom scalars as literals: any JSON-ish value for JSON (integers past 64 bits included), date-times
# from year 1 to 9999 in any offset for DateTime.
JSON_VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(nodes.Int),
    st.floats(allow_nan=False, allow_infinity=False).map(nodes.Float),
    st.text(max_size=40).map(nodes.String),
    st.booleans().map(nodes.Boolean),
    st.just(nodes.Null),
)
DATETIMES = st.datetimes(timezones=st.timezones()).map(lambda d: nodes.String(d.isoformat()))
SCALARS = {"JSON": JSON_VALUES, "DateTime": DATETIMES}


@pytest.fixture(scope="module")
def fuzz(queue_stack: Stack) -> tuple[Stack, str, object]:
    """The stack, a token, and the schema as the api itself describes it (introspection)."""
    token = queue_stack.token(f"fuzz-{uuid.uuid4().hex[:8]}")
    response = httpx.post(
        f"{queue_stack.url}/graphql",
        json={"query": get_introspection_query()},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    return queue_stack, token, build_client_schema(response.json()["data"])


def _check(response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 413), (response.status_code, response.text[:500])
    assert "Internal error" not in response.text, response.text[:500]
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text[:500]
    body = response.json()
    assert isinstance(body, dict) and ("data" in body or body.get("errors")), body
    for error in body.get("errors") or ():
        assert isinstance(error.get("message"), str) and error["message"], error


def _send(stack: Stack, token: str | None, body: object | bytes) -> None:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body)
    _check(httpx.post(f"{stack.url}/graphql", content=content, headers=headers, timeout=30))


def _operations(schema: object, mode: Mode) -> st.SearchStrategy[str]:
    return st.one_of(
        queries(schema, custom_scalars=SCALARS, mode=mode), mutations(schema, custom_scalars=SCALARS, mode=mode)
    )


@FUZZ
@given(data=st.data(), mode=st.sampled_from([Mode.POSITIVE, Mode.NEGATIVE]), signed_in=st.booleans())
def test_random_operations_never_fail_the_server(fuzz, data, mode, signed_in):
    stack, token, schema = fuzz
    query = data.draw(_operations(schema, mode))
    _send(stack, token if signed_in else None, {"query": query})


GRAPHQL_TEXT = st.text(
    alphabet=st.sampled_from(list(string.printable) + ["é", "\u2028", "\x00", "\ud7ff"]), max_size=300
)
JSON_BODIES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(
    query=GRAPHQL_TEXT,
    variables=JSON_BODIES,
    operation=st.none() | st.text(max_size=10) | st.integers(),
    signed_in=st.booleans(),
)
def test_random_text_and_variables_never_fail_the_server(fuzz, query, variables, operation, signed_in):
    stack, token, _ = fuzz
    _send(stack, token if signed_in else None, {"query": query, "variables": variables, "operationName": operation})


@FUZZ
@given(body=JSON_BODIES | st.binary(max_size=200), signed_in=st.booleans())
def test_random_bodies_never_fail_the_server(fuzz, body, signed_in):
    stack, token, _ = fuzz
    _send(stack, token if signed_in else None, body if isinstance(body, bytes) else body)


def test_the_fuzzing_left_no_traceback_in_the_api_log(fuzz):
    stack, _, _ = fuzz
    log = (stack.data_dir / "api.log").read_text(errors="replace")
    assert [line for line in log.splitlines() if "Traceback" in line] == []
