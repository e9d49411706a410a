"""The page's export history, import preview, partial failure and export options (issue 20, items
2, 5-7 and 9) in Chromium, at desktop width and on a 390 px phone: what each feature shows, that
nothing is wider than the screen, and a screenshot of each in ``tests/artifacts/``.

Reuses ``tests/test_web.py``'s ``dataport dev`` and browser (module-scoped here too: one more server).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator

import httpx
import pytest

from tests import test_web as web
from tests.test_web import IMPORT_HEADER, Server, shot, sign_in, watched_page

try:
    from playwright.sync_api import Page, expect
except ImportError:  # reported by the browser fixture
    Page = object

server = web.server
browser = web.browser

VIEWPORTS = {"desktop": {"width": 1280, "height": 1000}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(params=list(VIEWPORTS))
def view(request, browser, server) -> Iterator[Page]:
    """A page at desktop width or on a phone (``indirect`` parametrization picks one)."""
    name = request.param
    context = browser.new_context(
        base_url=server.url,
        viewport=VIEWPORTS[name],
        is_mobile=name == "phone",
        has_touch=name == "phone",
        locale="en-US",
        accept_downloads=True,
    )
    context.set_default_timeout(30_000)
    test = request.node.originalname.removeprefix("test_")
    with watched_page(context, f"web_history-{test}-{name}") as page:
        page.width = VIEWPORTS[name]["width"]
        page.user = f"{test[:40]}-{name}"
        yield page


def fits(page: Page, what: str) -> None:
    """Nothing is wider than the viewport (a phone scrolls down, never sideways)."""
    width = page.evaluate("() => document.documentElement.scrollWidth")
    if width > page.width:
        wide = page.evaluate(
            """(w) => [...document.querySelectorAll('body *')]
                 .filter(e => e.getBoundingClientRect().right > w + 0.5)
                 .slice(-5).map(e => e.tagName + '.' + e.className + ': ' + (e.textContent || '').slice(0, 60))""",
            page.width,
        )
        pytest.fail(f"{what} at {page.width} px: scrollWidth {width}; too wide: {wide}")


FINISHED = ", ".join(
    f"[data-status={status}]"
    for status in ("SUCCEEDED", "PARTIAL", "NOTHING_WRITTEN", "FAILED", "CANCELLED", "EXPIRED")
)


def finished(page: Page, card) -> str:
    """Wait until the card shows a task that has ended; its status (or an import's outcome)."""
    card.and_(page.locator(FINISHED)).wait_for()
    return card.get_attribute("data-status")


def history_card(page: Page, task_id: str):
    return page.locator(f"#history-list .task[data-task-id='{task_id}']")


def export_from_the_form(page: Page, *, label: str = "", limit: str = "", filters=(), fmt: str = "CSV", gz=False):
    """Fill the export form (every column) and export; returns the finished current card's task id."""
    for i, (column, operator, value) in enumerate(filters, 1):
        page.get_by_role("button", name="Add a filter").click()
        page.get_by_label(f"Filter {i}: column").select_option(column)
        page.get_by_label(f"Filter {i}: operator").select_option(label=operator)
        page.get_by_label(f"Filter {i}: value").fill(value)
    page.get_by_label("Row limit").fill(limit)
    page.get_by_label("Label", exact=True).fill(label)
    page.locator(f"input[name=format][value={fmt}]").check()
    page.get_by_label("Compression").select_option("GZIP" if gz else "NONE")
    current = page.locator("#export-current .task")
    before = current.get_attribute("data-task-id") if current.count() else ""
    page.get_by_role("button", name="Export", exact=True).click()
    card = page.locator(f"#export-current .task:not([data-task-id='{before}'])")  # this export's card
    assert finished(page, card) == "SUCCEEDED", card.inner_text()
    task_id = card.get_attribute("data-task-id")
    while page.get_by_role("button", name="Remove filter 1").count():  # a clean form for the next one
        page.get_by_role("button", name="Remove filter 1").click()
    return task_id


def file_name(server: Server, user: str, task_id: str) -> str:
    return server.gql(server.token(user), "query($id: ID!) { exportTask(id: $id) { fileName } }", {"id": task_id})[
        "exportTask"
    ]["fileName"]


# -- item 7: the history tells two exports of one dataset apart ------------------------------------


def test_the_history_tells_exports_of_one_dataset_apart(view, server):
    page = view
    sign_in(page, page.user)
    north = export_from_the_form(page, label="North core", limit="40", filters=[("site", "equals", "Kiruna Deep")])
    gold = export_from_the_form(page, label="Rich: gold", limit="1000", filters=[("au_ppm", "greater than", "2")])

    # A third, with any-of groups (the form has none) and a long label of one word (it must wrap on
    # a phone): through the API, as the same user.
    requested = server.gql(
        server.token(page.user),
        """mutation { requestExport(input: {dataset: "samples", format: CSV, columns: ["sample_id", "site"],
             label: "kiruna_deep_north_reassay_batch_2026_q3_v2", limit: 7,
             anyOf: [{filters: [{field: "site", op: EQ, value: "Müllerthal"}, {field: "au_ppm", op: GT, value: 1}]},
                     {filters: [{field: "sample_id", op: LTE, value: 3}]}]})
           { task { id } userErrors { message } } }""",
    )["requestExport"]
    assert requested["userErrors"] == [], requested
    either = requested["task"]["id"]
    for task_id in (north, gold, either):
        assert finished(page, history_card(page, task_id)) == "SUCCEEDED", history_card(page, task_id).inner_text()

    names = {task_id: file_name(server, page.user, task_id) for task_id in (north, gold, either)}
    assert re.fullmatch(r"samples-\d{8}T\d{6}Z-North-core\.csv", names[north]), names
    assert re.fullmatch(r"samples-\d{8}T\d{6}Z-Rich-gold\.csv", names[gold]), names
    assert re.fullmatch(r"samples-\d{8}T\d{6}Z-kiruna_deep_north_reassay_batch_2026_q3\.csv", names[either]), names

    def text(task_id: str) -> str:
        return " ".join(history_card(page, task_id).locator(".task-title, .result").all_text_contents())

    expect(history_card(page, north).locator(".task-title")).to_have_text("Export of samples as CSV · “North core”")
    expect(history_card(page, gold).locator(".task-title")).to_have_text("Export of samples as CSV · “Rich: gold”")
    shown = {task_id: text(task_id) for task_id in names}
    assert "site EQ Kiruna Deep" in shown[north] and "limit 40" in shown[north], shown
    assert "au_ppm GT 2" in shown[gold] and "limit 1,000" in shown[gold], shown
    assert "any of (site EQ Müllerthal and au_ppm GT 1) or (sample_id LTE 3)" in shown[either], shown
    assert "limit 7" in shown[either] and "“kiruna_deep_north_reassay_batch_2026_q3_v2”" in shown[either], shown
    for task_id, name in names.items():
        assert name in shown[task_id], shown
    assert "Kiruna" not in shown[gold] and "au_ppm" not in shown[north], shown
    assert len(set(shown.values())) == 3

    # Read back from the history query after a reload, each entry says the same.
    page.reload()
    for task_id in names:
        assert finished(page, history_card(page, task_id)) == "SUCCEEDED"
    assert {task_id: text(task_id) for task_id in names} == shown

    history_card(page, north).scroll_into_view_if_needed()
    fits(page, "the history")
    shot(page, "history")


# -- item 2: a dry run's preview on the page ---------------------------------------------------------


def stored_rows(server: Server, user: str, ids: list[int]) -> list[list[str]]:
    """The header and rows of ``ids`` as the streaming route writes them (what an import reads back)."""
    response = httpx.get(
        f"{server.url}/exports/stream",
        params=[
            ("dataset", "samples"),
            ("format", "csv"),
            ("columns", ",".join(IMPORT_HEADER)),
            ("filter", f"sample_id:in:{','.join(map(str, ids))}"),
            ("sort", "sample_id"),
        ],
        headers={"Authorization": f"Bearer {server.token(user)}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return list(csv.reader(io.StringIO(response.text, newline="")))


def test_a_dry_run_previews_new_updated_unchanged_and_failed_rows(view, server):
    page = view
    sign_in(page, page.user)
    header, changed, same = stored_rows(server, page.user, [11, 12])
    assert header == IMPORT_HEADER
    old_au = changed[-1]
    changed[-1] = "987.5"
    new = ["720001", "PRE-1", "Aurora Gold", "Kiruna Deep", "core", "2024-03-01", "false", "true", "false", "1.25"]
    bad = ["720002", "PRE-2", "Aurora Gold", "Kiruna Deep", "core", "2024-03-02", "false", "true", "false", "heaps"]
    content = io.StringIO()
    csv.writer(content, lineterminator="\n").writerows([header, changed, same, new, bad])
    page.get_by_label("File").set_input_files(
        files=[{"name": "preview.csv", "mimeType": "text/csv", "buffer": content.getvalue().encode()}]
    )
    page.get_by_label("Insert or update by key").check()
    page.get_by_label("Dry run: check every row, write nothing").check()
    page.get_by_role("button", name="Import", exact=True).click()

    card = page.locator("#import-current .task")
    assert finished(page, card) == "PARTIAL", card.inner_text()  # a dry run that would refuse a row
    counts = card.locator(".preview-counts")
    expect(counts).to_have_text("Preview: 1 new, 1 updated, 1 unchanged, 1 failed.")
    expect(card.locator(".task-title")).to_have_text("Import (dry run) into samples from preview.csv")
    changes = card.locator(".preview-changes li")
    expect(changes).to_have_count(1)
    expect(changes.first).to_have_text(f"Row 1: au_ppm {old_au} → 987.5")
    expect(card.locator(".failed-rows li")).to_have_count(1)
    assert card.locator(".failed-rows li").first.text_content().startswith("Row 4: au_ppm: ")
    assert "would be written" in card.locator(".stats").text_content()
    card.scroll_into_view_if_needed()
    fits(page, "the preview")
    shot(page, "preview")

    # Nothing was written.
    assert server.demo_rows("SELECT au_ppm FROM samples WHERE sample_id = 11") == [(float(old_au),)]
    assert server.demo_rows("SELECT count(*) FROM samples WHERE sample_id IN (720001, 720002)") == [(0,)]


# -- item 5: partial failure on a phone (test_web.py checks it at desktop width) ---------------------


PARTLY = "samples-20261206T141748Z-kiruna_deep_north_reassay_batch_2026_q3-fixed.csv"  # an edited export: one long word


@pytest.mark.parametrize("view", ["phone"], indirect=True)
def test_a_partial_import_is_amber_with_its_refused_rows_on_a_phone(view, server):
    page = view
    sign_in(page, page.user)
    rows = [
        ["730001", "PART-1", "Aurora Gold", "Kiruna Deep", "core", "2024-04-01", "false", "true", "false", "2.5"],
        ["730002", "PART-2", "Aurora Gold", "Kiruna Deep", "core", "2024-04-02", "false", "true", "false", "n/a"],
        ["730003", "PART-3", "Aurora Gold", "Kiruna Deep", "core", "2024-04-03", "false", "true", "false", "0.5"],
        ["730004", "PART-4", "Aurora Gold", "Kiruna Deep", "core", "2024-04-04", "false", "perhaps", "false", "1"],
    ]
    content = io.StringIO()
    csv.writer(content, lineterminator="\n").writerows([IMPORT_HEADER, *rows])
    page.get_by_label("File").set_input_files(
        files=[{"name": PARTLY, "mimeType": "text/csv", "buffer": content.getvalue().encode()}]
    )
    page.get_by_role("button", name="Import", exact=True).click()

    card = page.locator("#import-current .task")
    assert finished(page, card) == "PARTIAL", card.inner_text()  # not SUCCEEDED, the green "done"
    expect(card.locator(".badge")).to_have_text("done with refused rows")
    expect(card.locator(".task-title")).to_have_text(f"Import into samples from {PARTLY}")
    expect(card.locator(".stats")).to_have_text("4 rows read: 2 written, 2 failed.")
    failed = card.locator(".failed-rows li")
    expect(failed).to_have_count(2)
    assert failed.nth(0).text_content().startswith("Row 2: au_ppm: ")
    assert failed.nth(1).text_content().startswith("Row 4: qc_passed: ")
    expect(card.locator(".failed-title")).to_have_text("2 rows were refused:")
    amber, green = card.locator(".badge").evaluate(
        """b => { const ok = document.createElement('span'); ok.className = 'badge';
                  ok.dataset.status = 'SUCCEEDED'; b.after(ok); const c = getComputedStyle(ok).color;
                  ok.remove(); return [getComputedStyle(b).color, c]; }"""
    )
    assert amber != green
    # The history shows it the same way, not as a green "done".
    task_id = card.get_attribute("data-task-id")
    expect(history_card(page, task_id).locator(".badge")).to_have_text("done with refused rows")
    card.scroll_into_view_if_needed()
    fits(page, "a partial import")
    shot(page, "partial")
    assert server.demo_rows("SELECT sample_id FROM samples WHERE sample_id >= 730000 ORDER BY 1") == [
        (730001,),
        (730003,),
    ]


# -- items 6 and 9: gzip and Parquet from the form ----------------------------------------------------


def test_gzip_and_parquet_exports_are_named_and_downloaded_as_such(view, server, tmp_path):
    page = view
    sign_in(page, page.user)
    filters = [("sample_id", "at most", "200")]
    gz = export_from_the_form(page, label="packed", filters=filters, gz=True)
    card = page.locator("#export-current .task")
    with page.expect_download() as download:
        card.get_by_role("link", name="Download").click()
    gz_name = download.value.suggested_filename
    assert re.fullmatch(r"samples-\d{8}T\d{6}Z-packed\.csv\.gz", gz_name), gz_name
    saved = tmp_path / gz_name
    download.value.save_as(saved)
    rows = list(csv.reader(io.StringIO(gzip.decompress(saved.read_bytes()).decode("utf-8"), newline="")))
    assert rows[0][0] == "sample_id" and len(rows) == 201

    parquet = export_from_the_form(page, label="columnar", filters=filters, fmt="PARQUET")
    with page.expect_download() as download:
        card.get_by_role("link", name="Download").click()
    parquet_name = download.value.suggested_filename
    assert re.fullmatch(r"samples-\d{8}T\d{6}Z-columnar\.parquet", parquet_name), parquet_name
    saved = tmp_path / parquet_name
    download.value.save_as(saved)
    data = saved.read_bytes()
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"

    # The history names both files.
    expect(history_card(page, gz).locator(".result")).to_contain_text(gz_name)
    expect(history_card(page, parquet).locator(".task-title")).to_have_text("Export of samples as PARQUET · “columnar”")
    expect(history_card(page, parquet).locator(".result")).to_contain_text(parquet_name)
    history_card(page, gz).scroll_into_view_if_needed()
    fits(page, "compressed and Parquet exports")
    shot(page, "gzip-parquet")
