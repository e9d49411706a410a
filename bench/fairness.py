"""Fairness benchmark (issue 15, the fairness half of ``bench/hostile.py``): user A queues 30
full-size exports, user B then asks for a 10-row export; how long B waits, against one full-size
job's duration. Target: under one full-size job's duration.

    python bench/fairness.py                  # this tree, then today's FIFO queue (e91dc90) as the peer
    python bench/fairness.py --peer ''        # this tree only
    python bench/fairness.py --heavy 12 --rows 50000

Each run starts ``dataport api`` + one ``dataport worker`` (3 slots, the default) on an embedded
Redis, on the demo dataset of ``--rows`` rows (``bench/out/data-N``, generated once), with the
quota of active tasks raised so that A can queue the whole backlog (the quota alone would hold A
to 10). A's exports are all the rows (each a distinct request, so none is reused); B asks once
A's first jobs run. The peer is the same run from a copy of an older commit (``git archive``), to
show the behaviour the fair queue replaces.

Reported: B's wait (createdAt -> startedAt) and B's whole time (-> finishedAt), one full-size job's
duration (the median of A's, startedAt -> finishedAt, three at once as they ran), and how many of
A's jobs started between B's request and B's start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import OUT_DIR, REPO_DIR, Stack, console, stack_env, write_json
from rich.table import Table

from api.auth import issue_token
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings
from sources.demo import ensure_demo_database

PEER_COMMIT = "e91dc90"  # the queue before fair queueing: FIFO, as seen in issue 15
TASK = "id status createdAt startedAt finishedAt rowCount queuePosition error { code message }"


@dataclass
class Outcome:
    label: str
    heavy: int
    rows: int
    b_wait_seconds: float | None = None
    b_total_seconds: float | None = None
    b_queue_position: int | None = None
    job_seconds: float | None = None
    heavy_started_while_b_waited: int | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.b_wait_seconds is None or not self.job_seconds:
            return None
        return self.b_wait_seconds / self.job_seconds


class TreeStack(Stack):
    """``Stack`` whose processes run from ``tree`` (a copy of another commit), or from this one."""

    tree: Path | None = None

    def _spawn(self, *args: str, log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "dataport.cli", *args],
                env=self.env,
                cwd=self.tree or REPO_DIR,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )


def extract(commit: str, into: Path) -> Path:
    """The tree of ``commit`` under ``into`` (read-only use; the repository is not touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", commit], check=True, capture_output=True)
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return into


def gql(url: str, token: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/graphql",
        json={"query": query, "variables": variables or {}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    body = response.json()
    if body.get("errors"):
        raise RuntimeError(body["errors"])
    return body["data"]


def request_export(url: str, token: str, limit: int) -> dict[str, Any]:
    query = (
        f"mutation($i: ExportInput!) {{ requestExport(input: $i) {{ task {{ {TASK} }} "
        "userErrors { code message } } }"
    )
    payload = gql(url, token, query, {"i": {"dataset": "samples", "format": "CSV", "limit": limit}})["requestExport"]
    if payload["userErrors"]:
        raise RuntimeError(payload["userErrors"])
    return payload["task"]


def read(url: str, token: str, task_id: str) -> dict[str, Any]:
    return gql(url, token, f"query($id: ID!) {{ exportTask(id: $id) {{ {TASK} }} }}", {"id": task_id})["exportTask"]


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def fairness(
    redis_url: str, scratch: Path, *, label: str, heavy: int = 30, rows: int = 100_000, tree: Path | None = None
) -> Outcome:
    """One run: A's ``heavy`` full-size exports, then B's 10-row export, on one api and one worker."""
    outcome = Outcome(label, heavy, rows)
    data_dir = OUT_DIR / f"data-{rows}"
    ensure_demo_database(data_dir, rows)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    env = stack_env(
        data_dir,
        scratch / f"files-{label}",
        redis_url,
        secret,
        port,
        demo_rows=str(rows),
        max_export_rows=str(rows),
        max_active_tasks_per_user="1000",
        log_format="text",
    )
    stack = TreeStack(env, port, OUT_DIR / "logs" / f"fairness-{label}")
    stack.tree = tree
    settings = Settings(jwt_secret=secret)
    ann, bob = (issue_token(settings, f"bench-{who}-{secrets.token_hex(3)}") for who in ("a", "b"))
    try:
        stack.start()
        backlog = [request_export(stack.url, ann, rows - n) for n in range(heavy)]
        deadline = time.monotonic() + 60
        while read(stack.url, ann, backlog[0]["id"])["status"] == "PENDING":
            if time.monotonic() > deadline:
                raise RuntimeError("A's first export did not start")
            time.sleep(0.02)
        small = request_export(stack.url, bob, 10)
        outcome.b_queue_position = read(stack.url, bob, small["id"])["queuePosition"]
        deadline = time.monotonic() + 60 + 20 * heavy
        while (mine := read(stack.url, bob, small["id"]))["status"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            if time.monotonic() > deadline:
                raise RuntimeError("B's export did not finish")
            time.sleep(0.05)
        if mine["status"] != "SUCCEEDED":
            raise RuntimeError(f"B's export {mine['status']}: {mine['error']}")
        # three full-size jobs finished, for their duration; the rest of the backlog is cancelled
        while True:
            done = [t for t in (read(stack.url, ann, b["id"]) for b in backlog) if t["status"] == "SUCCEEDED"]
            if len(done) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for task in backlog:
            gql(
                stack.url,
                ann,
                "mutation($id: ID!) { cancelExport(id: $id) { userErrors { code } } }",
                {"id": task["id"]},
            )
        everything = [read(stack.url, ann, b["id"]) for b in backlog]
        outcome.b_wait_seconds = (at(mine["startedAt"]) - at(mine["createdAt"])).total_seconds()
        outcome.b_total_seconds = (at(mine["finishedAt"]) - at(mine["createdAt"])).total_seconds()
        outcome.job_seconds = statistics.median(
            (at(t["finishedAt"]) - at(t["startedAt"])).total_seconds() for t in done
        )
        waited = (at(mine["createdAt"]), at(mine["startedAt"]))
        outcome.heavy_started_while_b_waited = sum(
            1 for t in everything if t["startedAt"] and waited[0] < at(t["startedAt"]) < waited[1]
        )
    except Exception as e:  # reported in the table; the other run goes on
        outcome.error = f"{type(e).__name__}: {e}"
    finally:
        stack.stop()
    return outcome


def print_table(outcomes: list[Outcome]) -> None:
    table = Table(title="B's 10-row export behind A's backlog of full-size exports (1 worker, 3 slots)")
    for column in (
        "queue",
        "A's backlog",
        "B's queuePosition",
        "B waited",
        "B done after",
        "one full-size job",
        "wait / job",
        "A's jobs started while B waited",
    ):
        table.add_column(column, justify="right")
    for o in outcomes:
        if o.error:
            table.add_row(o.label, str(o.heavy), o.error, "", "", "", "", "")
            continue
        table.add_row(
            o.label,
            f"{o.heavy} × {o.rows:,} rows",
            str(o.b_queue_position),
            f"{o.b_wait_seconds:.2f} s",
            f"{o.b_total_seconds:.2f} s",
            f"{o.job_seconds:.2f} s",
            f"{o.ratio:.2f}",
            str(o.heavy_started_while_b_waited),
        )
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy", type=int, default=30, help="A's full-size exports")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the demo dataset (a full-size export)")
    parser.add_argument("--peer", default=PEER_COMMIT, help="commit of the FIFO queue to compare with ('' for none)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "fairness.json")
    args = parser.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fairness-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    outcomes: list[Outcome] = []
    try:
        redis.start()
        outcomes.append(fairness(redis.url, scratch, label="fair", heavy=args.heavy, rows=args.rows))
        if args.peer:
            tree = extract(args.peer, scratch / "peer")
            outcomes.append(
                fairness(redis.url, scratch, label=f"FIFO ({args.peer})", heavy=args.heavy, rows=args.rows, tree=tree)
            )
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(outcomes)
    fair = outcomes[0]
    passed = fair.ratio is not None and fair.ratio < 1.0
    console.print(
        f"B waited {fair.ratio:.2f} of one full-size job: {'PASS' if passed else 'FAIL'} (target < 1)"
        if fair.ratio is not None
        else f"no figure: {fair.error}"
    )
    write_json(args.out, "fairness", results=[{**asdict(o), "ratio": o.ratio} for o in outcomes], passed=passed)
    console.print(f"numbers in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
