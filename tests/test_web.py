"""The browser client (``web/``) and GraphiQL in a real browser: Debian's Chromium driven by
Playwright, against ``dataport dev`` (the embedded Redis, local storage, the SQLite demo dataset).

Screenshots of every key step go to ``tests/artifacts/``.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; or ``DATAPORT_TEST_CHROMIUM``).
GraphiQL's files are vendored (``web/vendor``): its test blocks every request that is not to the server.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from dataport.net import free_port, wait_for_port

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # reported by the fixture, with what to install
    sync_playwright = None
    Browser = Page = object

DEMO_ROWS = 60_000  # all 67 columns of them take a few seconds to export: the bar has time to move
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("DATAPORT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]

# Every code README.md lists for userErrors, and the top-level ones.
ERROR_CODES = (
    "DATASET_NOT_FOUND UNKNOWN_COLUMN DUPLICATE_COLUMN NO_COLUMNS INVALID_LIMIT NOT_FILTERABLE NOT_SORTABLE "
    "UNSUPPORTED_OPERATOR INVALID_FILTER_VALUE TOO_MANY_VALUES TOO_MANY_ROWS UNSUPPORTED_FORMAT SOURCE_UNAVAILABLE "
    "NOT_FOUND INVALID_STATUS NOT_IMPORTABLE NO_KEY INVALID_FILE_NAME FILE_TOO_LARGE INVALID_MAX_ERRORS "
    "UPLOAD_MISSING UPLOAD_EXPIRED UNAUTHENTICATED RATE_LIMITED FILE_SIZE_MISMATCH QUOTA_EXCEEDED "
    "QUERY_TOO_COMPLEX PAYLOAD_TOO_LARGE BAD_REQUEST SERVICE_UNAVAILABLE GRAPHQL_VALIDATION_FAILED"
).split()

# The dataset's required columns, and one float column to get wrong.
IMPORT_HEADER = [
    "sample_id",
    "sample_code",
    "project",
    "site",
    "sample_type",
    "collected_on",
    "is_duplicate",
    "qc_passed",
    "is_standard",
    "au_ppm",
]


# -- the server and the browser ---------------------------------------------------------------


class Server:
    def __init__(self, url: str, data_dir: Path):
        self.url = url
        self.data_dir = data_dir

    def token(self, user: str) -> str:
        response = httpx.post(f"{self.url}/dev/token", params={"user": user})
        assert response.status_code == 200, response.text
        return response.text.strip()

    def gql(self, token: str, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        body = response.json()
        assert not body.get("errors"), body
        return body["data"]

    def demo_rows(self, sql: str, *params) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.data_dir / 'demo.sqlite3'}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """``dataport dev`` in a fresh directory, as a user runs it, with a smaller demo dataset."""
    workdir = tmp_path_factory.mktemp("web")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")}
    env["DATAPORT_DEMO_ROWS"] = str(DEMO_ROWS)
    log = (workdir / "dev.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dataport.cli", "dev", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"dataport dev exited:\n{(workdir / 'dev.log').read_text()[-4000:]}")
            try:
                wait_for_port("127.0.0.1", port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    pytest.fail(f"dataport dev did not start in 120 s:\n{(workdir / 'dev.log').read_text()[-4000:]}")
        yield Server(f"http://127.0.0.1:{port}", workdir / ".dataport")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.fail("Playwright for Python is not installed: pip install -e '.[test]' (it is in the test extra).")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM} is missing): apt-get install -y chromium, "
            "or point DATAPORT_TEST_CHROMIUM at a Chromium binary. Playwright's own browser "
            "download is not used."
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server, request) -> Iterator[Page]:
    context = browser.new_context(
        base_url=server.url, viewport={"width": 1280, "height": 1000}, locale="en-US", accept_downloads=True
    )
    context.set_default_timeout(60_000)
    with watched_page(context, re.sub(r"^test_", "", request.node.name)) as page:
        yield page


@contextlib.contextmanager
def watched_page(context, shot_prefix: str) -> Iterator[Page]:
    """A page of ``context`` for a fixture to yield: on leaving, its last screenshot is taken,
    ``context`` closed, and an uncaught error in the page fails the test."""
    page = context.new_page()
    page.shot_prefix = shot_prefix
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    try:
        yield page
    finally:
        shot(page, "last")
        context.close()
    assert page_errors == [], f"uncaught errors in the page: {page_errors}"


def shot(page: Page, step: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{page.shot_prefix}-{step}.png", full_page=True)


def sign_in(page: Page, user: str) -> None:
    """Open the client and take a dev token for ``user`` (each test its own user, its own history)."""
    page.goto("/")
    page.locator("#column-list li").first.wait_for()
    page.get_by_label("User name").fill(user)
    page.get_by_role("button", name="Use this name").click()
    page.wait_for_function("u => document.querySelector('#session-status').textContent.includes(u)", arg=user)
    page.locator("#column-list li").first.wait_for()


def record_bar(page: Page, container: str) -> None:
    """Record every value the progress bars under ``container`` take, as (phase, aria-valuenow, text)."""
    page.evaluate(
        """(selector) => {
      window.bar = [];
      const root = document.querySelector(selector);
      const note = (bar) => window.bar.push([bar.dataset.phase || '', bar.getAttribute('aria-valuenow'),
                                             bar.closest('.task').querySelector('.stats').textContent]);
      new MutationObserver((mutations) => {
        for (const m of mutations) {
          if (m.type === 'attributes' && m.target.matches('[role=progressbar]')) note(m.target);
          for (const node of m.addedNodes || []) {
            if (node.querySelectorAll) node.querySelectorAll('[role=progressbar]').forEach(note);
          }
        }
      }).observe(root, {subtree: true, childList: true, attributes: true,
                        attributeFilter: ['aria-valuenow', 'data-phase']});
    }""",
        container,
    )


def recorded_bar(page: Page) -> list[tuple[str, int | None, str]]:
    return [(phase, None if value is None else int(value), text) for phase, value, text in page.evaluate("window.bar")]


def read_csv(path: str | Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(Path(path).read_text(encoding="utf-8"), newline="")))


# -- the browser client -----------------------------------------------------------------------


def test_export_from_the_first_click_to_the_downloaded_file(page, server, tmp_path):
    sign_in(page, "exporter")
    shot(page, "1-signed-in")

    page.get_by_role("button", name="None").click()
    for column in ("sample_id", "site", "au_ppm"):
        page.get_by_label(column, exact=True).check()
    assert page.locator("#columns-count").text_content() == "(3 of 67)"
    page.get_by_role("button", name="Add a filter").click()
    page.get_by_label("Filter 1: column").select_option("sample_id")
    page.get_by_label("Filter 1: operator").select_option(label="at most")
    page.get_by_label("Filter 1: value").fill("500")
    page.get_by_role("button", name="Add a filter").click()
    page.get_by_label("Filter 2: column").select_option("site")
    page.get_by_label("Filter 2: operator").select_option(label="is one of")
    page.get_by_label("Filter 2: value").fill("Kiruna Deep, Müllerthal")
    page.get_by_label("Sort by").select_option("sample_id")
    page.get_by_label("Direction").select_option(label="descending")
    page.get_by_label("CSV").check()
    shot(page, "2-form")

    page.get_by_role("button", name="Export", exact=True).click()
    card = page.locator("#export-current .task")
    card.and_(page.locator("[data-status=SUCCEEDED]")).wait_for()
    shot(page, "3-done")
    assert card.get_by_role("progressbar").get_attribute("aria-valuenow") == "100"

    with page.expect_download() as download:
        card.get_by_role("link", name="Download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    shutil.copy(saved, ARTIFACTS / f"{page.shot_prefix}-download.csv")
    rows = read_csv(saved)

    expected = server.demo_rows(
        "SELECT sample_id, site, au_ppm FROM samples WHERE sample_id <= 500 "
        "AND site IN ('Kiruna Deep', 'Müllerthal') ORDER BY sample_id DESC"
    )
    assert rows[0] == ["sample_id", "site", "au_ppm"]
    assert 10 < len(expected) < 500 and len(rows) == len(expected) + 1
    assert [(int(i), site) for i, site, _ in rows[1:]] == [(i, site) for i, site, _ in expected]
    assert [float(au) if au else None for _, _, au in rows[1:]] == [au for _, _, au in expected]
    assert card.locator(".stats").text_content().startswith(f"{len(expected)} rows")

    # The history lists it too, done, and a reload keeps the user and the history.
    task_id = card.get_attribute("data-task-id")
    history = page.locator(f"#history-list .task[data-task-id='{task_id}']")
    assert history.locator(".badge").text_content() == "done"
    page.reload()
    page.locator(f"#history-list .task[data-task-id='{task_id}'][data-status=SUCCEEDED]").wait_for()
    assert "Signed in as exporter" in page.locator("#session-status").text_content()
    shot(page, "4-history-after-reload")


def test_an_import_ends_with_an_error_report_listing_the_bad_row(page, server, tmp_path):
    sign_in(page, "importer")
    rows = [
        ["700001", "WEB-1", "Aurora Gold", "Kiruna Deep", "core", "2024-01-02", "false", "true", "false", "1.5"],
        ["700002", "WEB-2", "Aurora Gold", "Kiruna Deep", "core", "2024-01-03", "false", "true", "false", "lots"],
        ["700003", "WEB-3", "Aurora Gold", "Kiruna Deep", "core", "2024-01-04", "false", "true", "false", "0.25"],
    ]
    content = io.StringIO()
    csv.writer(content, lineterminator="\n").writerows([IMPORT_HEADER, *rows])
    page.get_by_label("File").set_input_files(
        files=[{"name": "web-fixes.csv", "mimeType": "text/csv", "buffer": content.getvalue().encode()}]
    )
    page.get_by_label("Insert new rows").check()
    shot(page, "1-file-chosen")
    record_bar(page, "#import-current")

    page.get_by_role("button", name="Import", exact=True).click()
    card = page.locator("#import-current .task")
    # Partial failure is not success (issue 20, item 5): not a green "done", the refused row inline.
    card.and_(page.locator("[data-status=PARTIAL]")).wait_for()
    shot(page, "2-done-with-refused-rows")
    assert card.locator(".stats").text_content() == "3 rows read: 2 written, 1 failed."
    assert card.locator(".badge").text_content() == "done with refused rows"
    assert card.locator(".badge").evaluate("b => getComputedStyle(b).color") != card.locator(".badge").evaluate(
        "b => { const ok = document.createElement('span'); ok.className = 'badge'; ok.dataset.status = 'SUCCEEDED';"
        " b.after(ok); const c = getComputedStyle(ok).color; ok.remove(); return c; }"
    )
    failed = card.locator(".failed-rows li")
    assert failed.count() == 1 and failed.first.text_content().startswith("Row 2: au_ppm: ")
    values = recorded_bar(page)
    assert ("upload", 100) in [(phase, value) for phase, value, _ in values], values  # the bytes went up
    assert values[-1][:2] == ("SUCCEEDED", 100), values

    report_link = card.get_by_role("link", name="Download the error report")
    assert report_link.is_visible()
    with page.expect_download() as download:
        report_link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    shutil.copy(saved, ARTIFACTS / f"{page.shot_prefix}-report.csv")
    report = read_csv(saved)
    assert report[0] == ["row", "column", "reason", "original"]
    assert len(report) == 2 and report[1][:2] == ["2", "au_ppm"] and "lots" in report[1][2]

    written = server.demo_rows("SELECT sample_id, au_ppm FROM samples WHERE sample_id >= 700000 ORDER BY 1")
    assert written == [(700001, 1.5), (700003, 0.25)]


def test_the_progress_bar_advances_while_an_export_runs(page, server):
    sign_in(page, "watcher")
    record_bar(page, "#export-current")
    page.get_by_label("NDJSON").check()  # every column of every row
    page.get_by_role("button", name="Export", exact=True).click()

    card = page.locator("#export-current .task")
    card.and_(page.locator("[data-status=PROCESSING]")).wait_for()
    page.wait_for_function("() => (window.bar || []).some(([, v]) => v !== null && +v > 0 && +v < 100)")
    shot(page, "1-running")
    card.and_(page.locator("[data-status=SUCCEEDED]")).wait_for(timeout=120_000)
    shot(page, "2-done")

    values = recorded_bar(page)
    numbers = [v for _, v, _ in values if v is not None]
    assert [v for v in numbers if 0 < v < 100], values
    assert numbers == sorted(numbers) and numbers[-1] == 100, values
    texts = [text for phase, _, text in values if phase == "PROCESSING"]
    assert any(re.search(r"of [\d,.\s]+ rows · \d+% · [\d,.\s]+ rows/s · about .+ left", t) for t in texts), texts
    (count,) = server.demo_rows("SELECT count(*) FROM samples")[0]  # the demo rows, and what imports added
    assert card.locator(".stats").text_content().startswith(f"{count:,} rows")

    # The history row followed the same subscription, without a reload.
    task_id = card.get_attribute("data-task-id")
    assert page.locator(f"#history-list .task[data-task-id='{task_id}'] .badge").text_content() == "done"


def test_the_history_follows_every_task_over_one_task_updates_subscription(page, server):
    sockets: list[list[dict]] = []  # each WebSocket's messages to the server

    def opened(ws) -> None:
        messages: list[dict] = []
        sockets.append(messages)
        ws.on("framesent", lambda payload: messages.append(json.loads(payload)))

    page.on("websocket", opened)
    sign_in(page, "historian")
    page.get_by_label("JSON", exact=True).check()
    page.get_by_role("button", name="Export", exact=True).click()
    card = page.locator("#export-current .task")
    card.and_(page.locator("[data-status=SUCCEEDED]")).wait_for()
    page_task = card.get_attribute("data-task-id")

    # An export the same user starts elsewhere (another tab, the CLI) appears and finishes live.
    started = server.gql(
        server.token("historian"),
        'mutation { requestExport(input: {dataset: "samples", format: CSV, columns: ["sample_id"]}) '
        "{ task { id } userErrors { message } } }",
    )["requestExport"]
    assert started["userErrors"] == [], started
    other = started["task"]["id"]
    page.locator(f"#history-list .task[data-task-id='{other}'][data-status=SUCCEEDED]").wait_for()
    page.locator(f"#history-list .task[data-task-id='{page_task}'][data-status=SUCCEEDED]").wait_for()
    shot(page, "1-history")

    # The socket of this sign-in (the page signed in as "dev" first) carried one subscription.
    subscriptions = [m for m in sockets[-1] if m.get("type") == "subscribe"]
    assert len(subscriptions) == 1, subscriptions
    assert "taskUpdates" in subscriptions[0]["payload"]["query"]
    assert all(m.get("type") != "subscribe" or "taskUpdates" in m["payload"]["query"] for s in sockets for m in s)


def test_a_running_export_is_cancelled_and_tried_again(page, server):
    sign_in(page, "canceller")
    page.get_by_label("Excel (XLSX)").check()  # the slowest writer: still running when the click lands
    page.get_by_role("button", name="Export", exact=True).click()
    card = page.locator("#export-current .task")
    card.and_(page.locator("[data-status=PROCESSING]")).wait_for()
    card.get_by_role("button", name="Cancel").click()
    card.and_(page.locator("[data-status=CANCELLED]")).wait_for()
    shot(page, "1-cancelled")
    assert card.locator(".badge").text_content() == "cancelled"
    assert card.get_by_role("link", name="Download").count() == 0

    card.get_by_role("button", name="Try again").click()
    card.and_(page.locator("[data-status=PENDING], [data-status=PROCESSING]")).wait_for()
    shot(page, "2-again")
    card.get_by_role("button", name="Cancel").click()  # leave the worker free for the other tests
    card.and_(page.locator("[data-status=CANCELLED]")).wait_for()


def test_without_dev_mode_a_pasted_token_signs_in(page, server):
    page.route("**/dev/token*", lambda route: route.fulfill(status=404, body="Not Found"))  # as `dataport api`
    page.goto("/")
    status = page.locator("#session-status")
    page.wait_for_function("() => document.querySelector('#session-status').textContent.includes('paste')")
    assert page.locator("#dev-signin").is_hidden()

    page.get_by_label("Access token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_function("() => document.querySelector('#session-status').textContent.includes('Sign in again')")
    assert "The token is not valid." in status.text_content()
    shot(page, "1-bad-token")

    page.get_by_label("Access token").fill(server.token("paster"))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_function("() => document.querySelector('#session-status').textContent.includes('Signed in')")
    page.locator("#column-list li").first.wait_for()
    shot(page, "2-signed-in")


def test_user_errors_are_shown_in_words_beside_the_servers_message(page, server):
    sign_in(page, "typo")
    page.get_by_role("button", name="Add a filter").click()
    page.get_by_label("Filter 1: column").select_option("au_ppm")
    page.get_by_label("Filter 1: operator").select_option(label="greater than")
    page.get_by_label("Filter 1: value").fill("abc")
    page.get_by_role("button", name="Export", exact=True).click()

    errors = page.locator("#export-errors")
    errors.locator("strong").first.wait_for()
    shot(page, "1-bad-filter")
    assert errors.get_attribute("role") == "alert"
    message = errors.locator("[data-code=INVALID_FILTER_VALUE]")
    assert message.locator("strong").text_content() == "A filter value does not fit its column's type."
    assert "'abc' is not a number" in message.locator(".server-message").text_content()
    assert page.get_by_label("Filter 1: value").get_attribute("aria-invalid") == "true"
    assert page.locator("#export-current .task").count() == 0  # nothing was queued

    page.get_by_role("button", name="Remove filter 1").click()
    page.get_by_role("button", name="None").click()
    page.get_by_role("button", name="Export", exact=True).click()
    errors.locator("[data-code=NO_COLUMNS]").wait_for()
    assert errors.locator("[data-code=NO_COLUMNS] strong").text_content() == "Choose at least one column."
    assert page.locator("#export-columns").get_attribute("aria-invalid") == "true"
    shot(page, "2-no-columns")

    # Every code of the contract has its own sentence.
    messages = page.evaluate("async () => (await import('/web/api.js')).ERROR_MESSAGES")
    missing = [code for code in ERROR_CODES if not messages.get(code)]
    assert missing == []
    assert len({messages[code] for code in ERROR_CODES}) == len(ERROR_CODES)


# -- GraphiQL ---------------------------------------------------------------------------------


def test_graphiql_runs_a_subscription(page, server):
    def loopback_only(route):  # GraphiQL's files are served by Dataport (api/graphiql.py): no internet
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:")):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", loopback_only)
    token = server.token(f"graphiql-{uuid.uuid4().hex[:6]}")
    # An import that waits for its file: the subscription is surely running before anything changes.
    requested = server.gql(
        token,
        """mutation($i: ImportInput!) { requestImport(input: $i) {
        task { id upload { url method headers } } userErrors { code message } } }""",
        {"i": {"dataset": "samples", "fileName": "two.csv", "dryRun": True}},
    )["requestImport"]
    assert requested["userErrors"] == []
    task = requested["task"]

    subscription = (
        "subscription Follow($id: ID!) {\n  importProgress(id: $id) {\n    id\n    status\n"
        "    progress { percent }\n    rowsImported\n    rowsFailed\n  }\n}"
    )
    parameters = {
        "q": subscription,
        "variables": json.dumps({"id": task["id"]}),
        "headers": json.dumps({"Authorization": f"Bearer {token}"}),
    }
    page.goto("/graphql?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in parameters.items()))
    run = page.get_by_role("button", name=re.compile("Execute query"))
    run.wait_for()
    shot(page, "1-loaded")
    run.click()

    response = page.locator(".graphiql-response")
    shows = "text => document.querySelector('.graphiql-response').innerText.includes(text)"
    page.wait_for_function(shows, arg="WAITING_FOR_UPLOAD")
    shot(page, "2-first-snapshot")

    content = io.StringIO()
    csv.writer(content, lineterminator="\n").writerows(
        [
            IMPORT_HEADER,
            ["710001", "GQL-1", "Aurora Gold", "Kiruna Deep", "core", "2024-02-02", "false", "true", "false", "2"],
            ["710002", "GQL-2", "Aurora Gold", "Kiruna Deep", "core", "2024-02-03", "false", "true", "false", "3"],
        ]
    )
    target = task["upload"]
    assert target["method"] == "PUT"
    uploaded = httpx.put(target["url"], content=content.getvalue().encode(), headers=target["headers"])
    assert uploaded.status_code == 200, uploaded.text
    started = server.gql(
        token, "mutation($id: ID!) { startImport(id: $id) { userErrors { code } } }", {"id": task["id"]}
    )
    assert started["startImport"]["userErrors"] == []

    page.wait_for_function(shows, arg="SUCCEEDED")
    shot(page, "3-final-snapshot")
    result = json.loads(response.inner_text().replace("\xa0", " "))
    assert result["data"]["importProgress"] == {
        "id": task["id"],
        "status": "SUCCEEDED",
        "progress": {"percent": 100},
        "rowsImported": 2,
        "rowsFailed": 0,
    }
