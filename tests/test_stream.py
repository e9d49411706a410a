"""The streaming route on real api processes: auth, limits, the same bytes as the worker,
and a client that goes away releasing the source."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import time
import uuid

import httpx

from tests.fixtures.stack import DEMO_ROWS, SPECIAL_ROWS


def _get(stack, token: str | None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{stack.url}/exports/stream", params=params, headers=headers, timeout=60)


def _user(stack) -> str:
    return stack.token(f"streamer-{uuid.uuid4().hex[:8]}")


def _gauge(stack) -> float:
    text = httpx.get(f"{stack.url}/metrics").text
    return float(re.search(r"^dataport_stream_reads_in_progress (\S+)$", text, re.M).group(1))


def test_streams_csv_with_a_download_name(local_stack):
    response = _get(local_stack, _user(local_stack), dataset="special", format="csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert re.fullmatch(r'attachment; filename="special-\d{8}T\d{6}Z\.csv"', response.headers["content-disposition"])
    rows = list(csv.reader(io.StringIO(response.text, newline="")))
    assert len(rows) == len(SPECIAL_ROWS) + 1 and rows[2][1] == "Zoë Ørsted 東京 🚀"


def test_the_streamed_file_equals_the_workers_file(local_stack):
    token = _user(local_stack)
    api = local_stack.api()
    for fmt in ("CSV", "JSON", "NDJSON"):
        streamed = _get(
            local_stack,
            token,
            dataset="samples",
            format=fmt.lower(),
            limit=3000,
            columns="sample_id,site,collected_on,analysed_at,au_ppm,qc_passed,notes",
            filter=["au_ppm:gt:0.5", "site:not_in:Nowhere,Elsewhere"],
            sort="-collected_on",
        )
        assert streamed.status_code == 200, streamed.text
        _, from_worker = api.run_export(
            dataset="samples",
            format=fmt,
            limit=3000,
            columns=["sample_id", "site", "collected_on", "analysed_at", "au_ppm", "qc_passed", "notes"],
            filters=[
                {"field": "au_ppm", "op": "GT", "value": "0.5"},
                {"field": "site", "op": "NOT_IN", "values": ["Nowhere", "Elsewhere"]},
            ],
            sort=[{"field": "collected_on", "direction": "DESC"}],
        )
        assert streamed.content == from_worker, fmt


def test_format_is_any_case_and_json_parses(local_stack):
    response = _get(local_stack, _user(local_stack), dataset="special", format="NdJsOn", columns="id,name")
    assert [json.loads(line)["id"] for line in response.text.splitlines()] == [r[0] for r in SPECIAL_ROWS]


def test_without_a_valid_token_the_answer_is_401(local_stack):
    for token in (None, "garbage"):
        response = _get(local_stack, token, dataset="special")
        assert response.status_code == 401 and response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"] == "Bearer"


def test_more_rows_than_the_stream_limit_is_413_before_any_data(local_stack):
    response = _get(local_stack, _user(local_stack), dataset="samples")
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "TOO_MANY_ROWS" and error["use"] == "requestExport" and error["maxRows"] == 10_000
    assert "requestExport" in error["message"]
    assert _get(local_stack, _user(local_stack), dataset="samples", limit=10_000).status_code == 200


def test_bad_input_names_the_parameter(local_stack):
    token = _user(local_stack)
    cases = [
        ({"dataset": "special", "format": "xlsx"}, 400, "UNSUPPORTED_FORMAT", ["format"]),
        ({"dataset": "nope"}, 404, "DATASET_NOT_FOUND", ["dataset"]),
        ({"dataset": "special", "columns": "id,nope"}, 400, "UNKNOWN_COLUMN", ["query", "columns", "1"]),
        ({"dataset": "special", "filter": "score"}, 400, "INVALID_FILTER_VALUE", ["filter"]),
        (
            {"dataset": "special", "filter": "score:between:1"},
            400,
            "INVALID_FILTER_VALUE",
            ["query", "filters", "0", "values"],
        ),
        ({"dataset": "special", "sort": "-notes"}, 400, "NOT_SORTABLE", ["query", "sort", "0", "field"]),
    ]
    for params, status, code, field in cases:
        response = _get(local_stack, token, **params)
        assert response.status_code == status, (params, response.text)
        assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field), params


def test_rate_limited_per_user_with_retry_after(local_stack):
    token = _user(local_stack)
    statuses = [_get(local_stack, token, dataset="special", columns="id").status_code for _ in range(21)]
    assert statuses[:20] == [200] * 20 and statuses[20] == 429
    limited = _get(local_stack, token, dataset="special", columns="id")
    assert limited.json()["error"]["code"] == "RATE_LIMITED" and 1 <= int(limited.headers["retry-after"]) <= 60
    assert _get(local_stack, _user(local_stack), dataset="special", columns="id").status_code == 200


def test_rate_limited_per_client_address(local_stack):
    address = f"203.0.113.{uuid.uuid4().int % 250}"  # uvicorn trusts X-Forwarded-For from loopback
    statuses = []
    for _ in range(4):
        token = _user(local_stack)
        for _ in range(16):
            statuses.append(
                httpx.get(
                    f"{local_stack.url}/exports/stream",
                    params={"dataset": "special", "columns": "id"},
                    headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": address},
                ).status_code
            )
    assert statuses[:60] == [200] * 60 and set(statuses[60:]) == {429}


def test_a_client_that_goes_away_releases_the_source_within_a_second(local_stack):
    token = _user(local_stack)
    assert _gauge(local_stack) == 0
    with socket.create_connection(("127.0.0.1", local_stack.port)) as sock:
        sock.sendall(
            f"GET /exports/stream?dataset=samples_stream&format=json HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while _gauge(local_stack) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # the server is blocked on a full socket: it has not read all rows
    gone = time.monotonic()
    while _gauge(local_stack) != 0:
        assert time.monotonic() - gone < 1.0, "the source read outlived the client by a second"
        time.sleep(0.02)
    assert DEMO_ROWS > 10_000


def _cut_off_mid_stream(stack, dataset: str, token: str, while_open) -> None:
    """Ask for a stream, read its first bytes, check the source is open, then go away while the
    server is still sending."""
    with socket.create_connection(("127.0.0.1", stack.port)) as sock:
        sock.sendall(
            f"GET /exports/stream?dataset={dataset}&format=ndjson HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)  # the server is blocked on a full socket, with the source open
        assert while_open(), "the source should be open while the response streams"


def _released_within_a_second(check) -> None:
    gone = time.monotonic()
    while not check():
        assert time.monotonic() - gone < 1.0, "the source outlived the client by a second"
        time.sleep(0.02)


def test_postgres_releases_the_cursor_when_the_client_goes_away(local_stack, test_data):
    import psycopg

    def busy() -> list:  # the api's reading connections (the worker is idle: no export runs)
        with psycopg.connect(test_data.postgres_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'dataport' AND pid <> pg_backend_pid()"
            ).fetchall()

    _cut_off_mid_stream(local_stack, "big_pg", _user(local_stack), while_open=lambda: busy() != [])
    _released_within_a_second(lambda: busy() == [])


def test_opensearch_releases_the_point_in_time_when_the_client_goes_away(local_stack, test_data):
    def open_reads() -> int:
        pits = httpx.get(f"{test_data.opensearch_url}/_search/point_in_time/_all").json().get("pits", [])
        return len(pits)

    before = open_reads()
    _cut_off_mid_stream(local_stack, "big_os", _user(local_stack), while_open=lambda: open_reads() == before + 1)
    _released_within_a_second(lambda: open_reads() == before)
