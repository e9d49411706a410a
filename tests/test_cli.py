"""The ``dataport`` command as a user runs it: dev with embedded defaults, token, export."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import psutil
import pytest

from dataport.net import free_port, wait_for_port

DEMO_ROWS = 3_000


@pytest.fixture(scope="module", autouse=True)
def private_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every ``dataport dev`` here records where it runs (dataport/dev_record.py) in a config dir of
    this module's, never the user's."""
    config_home = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(config_home))
        yield config_home


def _env(data_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")}
    env["DATAPORT_DEMO_ROWS"] = str(DEMO_ROWS)
    if data_dir is not None:
        env["DATAPORT_DATA_DIR"] = str(data_dir)
    return env


def _dataport(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataport.cli", *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """``dataport dev`` in a fresh directory with the default (relative) data dir, as a user runs it;
    only the demo dataset is made smaller."""
    workdir = tmp_path_factory.mktemp("dev")
    data_dir = workdir / ".dataport"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dataport.cli", "dev", "--port", str(port)],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_dev(process, port)
        token = process.stdout.readline().strip()  # the token is the one line on stdout
        yield process, port, data_dir, token
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for_dev(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"dataport dev exited: {process.stderr.read() if process.stderr else ''}"
        try:
            wait_for_port("127.0.0.1", port, timeout=0.5)
            return
        except TimeoutError:
            assert time.monotonic() < deadline, "dataport dev did not start in 90 s"


def _tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def test_token_prints_only_a_token_signed_with_the_data_dirs_secret(tmp_path):
    result = _dataport("token", "alice", "--email", "alice@example.org", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    secret = (tmp_path / "secret").read_text().strip()
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"], issuer="dataport")
    assert claims["sub"] == "alice" and claims["email"] == "alice@example.org"


def test_dev_serves_the_demo_dataset_with_its_printed_token(dev):
    _, port, _, token = dev
    body = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        headers={"Authorization": f"Bearer {token}"},
        json={"query": "{ datasets { name source importable columns { name type } } }"},
    ).json()
    (samples,) = body["data"]["datasets"]
    assert samples["name"] == "samples" and samples["source"] == "sqlite" and samples["importable"]
    types = {c["type"] for c in samples["columns"]}
    assert len(samples["columns"]) >= 50 and {"string", "integer", "float", "boolean", "date", "datetime"} <= types
    page = httpx.get(f"http://127.0.0.1:{port}/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


def test_export_command_downloads_the_file(dev, tmp_path):
    _, port, data_dir, _ = dev
    env = _env(data_dir)  # same data dir: `dataport token` and `dataport dev` agree on the secret
    out = tmp_path / "gold.csv"
    result = _dataport(
        "export",
        "samples",
        "--format",
        "csv",
        "--columns",
        "sample_id,site,au_ppm",
        "--filter",
        "sample_id:lte:500",
        "--out",
        str(out),
        "--url",
        f"http://127.0.0.1:{port}",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(out.read_text(), newline="")))
    assert rows[0] == ["sample_id", "site", "au_ppm"] and len(rows) == 501
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 501))
    failed = _dataport("export", "samples", "--columns", "nope", "--url", f"http://127.0.0.1:{port}", env=env)
    assert failed.returncode == 1 and "nope" in failed.stderr


def test_import_command_uploads_follows_and_saves_the_report(dev, tmp_path):
    _, port, data_dir, _ = dev
    env = _env(data_dir)
    server = ["--url", f"http://127.0.0.1:{port}"]
    original = tmp_path / "three.csv"
    assert (
        _dataport(
            "export", "samples", "--filter", "sample_id:lte:3", "--out", str(original), *server, env=env
        ).returncode
        == 0
    )  # every column: the dataset's required ones among them
    rows = list(csv.reader(io.StringIO(original.read_text(), newline="")))
    site = rows[0].index("site")
    rows[1][site] = "Renamed Ridge"
    rows[2][0] = "two"  # not an integer: this row fails and lands in the report
    fixes = tmp_path / "fixes.csv"
    with fixes.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = _dataport("import", "samples", str(fixes), "--mode", "upsert", *server, env=env)
    assert result.returncode == 3, result.stderr  # a partial import is not a success...
    assert "2 rows written, 1 failed" in result.stderr  # messages go to stderr, as for export
    assert "--allow-row-errors" in result.stderr
    accepted = _dataport("import", "samples", str(fixes), "--mode", "upsert", "--allow-row-errors", *server, env=env)
    assert accepted.returncode == 0, accepted.stderr  # ...unless the caller accepts refused rows
    report = list(csv.reader(io.StringIO((tmp_path / "fixes-errors.csv").read_text(), newline="")))
    assert report[0] == ["row", "column", "reason", "original"] and report[1][:2] == ["2", "sample_id"]
    after = tmp_path / "after.csv"
    assert (
        _dataport(
            "export",
            "samples",
            "--columns",
            "sample_id,site",
            "--filter",
            "sample_id:eq:1",
            "--out",
            str(after),
            *server,
            env=env,
        ).returncode
        == 0
    )
    assert list(csv.reader(io.StringIO(after.read_text(), newline="")))[1] == ["1", "Renamed Ridge"]

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("sample_id,colour\n1,red\n")
    failed = _dataport("import", "samples", str(unknown), *server, env=env)
    assert failed.returncode == 1 and "colour" in failed.stderr + failed.stdout


def test_sigterm_stops_everything_dev_started(dev):
    process, port, _, _ = dev
    tree = _tree(psutil.Process(process.pid))
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "api" in names and "worker" in names and ("valkey-server" in names or "redis-server" in names)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"


def test_a_killed_dev_leaves_nothing_behind(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dataport.cli", "dev", "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_dev(process, port)
    time.sleep(0.5)
    tree = _tree(psutil.Process(process.pid))
    assert len(tree) >= 4  # dev, redis, api, worker
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(tree[1:], timeout=15)
    assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"
