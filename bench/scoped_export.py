"""Tenant-scoped export benchmark: what the scope costs against the same rows asked for by a filter.

Command (from the repository root; PostgreSQL must be running, trust auth)::

    python bench/scoped_export.py                     # 1,000,000 rows, 10 tenants, 3 rounds
    python bench/scoped_export.py --runs 5 --rows 200000 --postgres-url postgresql://postgres@host/db

The table ``bench_scoped_<rows>``: ``id integer primary key``, ``org_id integer not null`` (row
``i`` belongs to tenant ``i % 10``: each tenant owns 10 %, spread over the whole table, the usual
shape of a shared table) and 8 more typed columns (text, floats, integers, a date, a timestamptz, a
boolean). Built once (not timed), reused while its row count and build version match, and read once
untimed before the measured runs; one untimed round of both exports warms the stack up.

An index on the scope column is the operator's job, not Dataport's: a scoped dataset is read with
``WHERE org_id = $1`` on every read, and without an index every export of one tenant scans every
tenant's rows. The bench creates it (``CREATE INDEX … (org_id)``); for a text scope column it must be
built ``COLLATE "C"``, as the source compares text in code-point order (sources/postgres).

Two datasets over that table, in one datasets file, on one ``dataport api`` + ``dataport worker``:

- ``scoped``: ``scope = { column = "org_id", claim = "org" }``, exported with no filter by a token
  whose ``org`` claim is ``3``: the scope selects tenant 3's rows;
- ``plain``: no scope, exported with the filter ``org_id EQ 3`` by a token without the claim.

Each round exports both as a new user (a repeated request would be handed back finished), in
alternating order (scoped first in odd rounds), following each to SUCCEEDED over the subscription
(``seconds``), then downloads each file and checks its row count (exactly the tenant's rows) and that
the two files are byte-identical. ``ratio`` is the median of the rounds' scoped / plain seconds;
target ≤ 1.2x. Numbers go to ``--out`` (JSON); logs to ``bench/out/logs/scoped_export/``. Exits 1
when a check or an export fails; a missed target is printed as MISS (and exits 1 with ``--strict``).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import psycopg
from _common import OUT_DIR, Stack, console, csv_records, download, export_sampled, note_load, stack_env, write_json
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_RATIO = 1.2
TENANTS = 10
TENANT = 3
BUILD_VERSION = "dataport-bench-scoped-1"  # in the table's comment: a table of an older build is rebuilt

_CREATE = """CREATE TABLE {t} (id integer PRIMARY KEY, org_id integer NOT NULL, name text, site text,
    score double precision, ratio double precision, n bigint, born date, seen_at timestamptz, active boolean)"""
_FILL = """INSERT INTO {t} SELECT g, g %% {tenants}, 'name ' || g, 'site-' || (g %% 97), g * 0.25,
    CASE WHEN g %% 13 = 0 THEN NULL ELSE 1.0 / g END, g * 7919::bigint, DATE '2020-01-01' + (g %% 1000),
    TIMESTAMPTZ '2020-01-01 00:00:00+00' + g * INTERVAL '1 minute', g %% 2 = 0
    FROM generate_series(%s, %s) AS g"""


def ensure_table(url: str, rows: int) -> str:
    table = f"bench_scoped_{rows}"
    with psycopg.connect(url, autocommit=True) as conn:
        comment = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (table,)).fetchone()[0]
        if comment == f"{BUILD_VERSION} {rows}":
            return table
        console.print(f"[dim]building {table} ({rows:,} rows, untimed)…[/dim]")
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(_CREATE.format(t=table))
        for low in range(1, rows + 1, 200_000):
            conn.execute(_FILL.format(t=table, tenants=TENANTS), (low, min(rows, low + 199_999)))
        # The operator's part: an index on the scope column (see the module's docstring).
        conn.execute(f"CREATE INDEX ON {table} (org_id)")
        conn.execute(f"VACUUM ANALYZE {table}")
        conn.execute(f"COMMENT ON TABLE {table} IS '{BUILD_VERSION} {rows}'")
    return table


def datasets_toml(url: str, table: str, rows: int) -> str:
    common = f'source = "postgres"\nurl = "{url}"\ntable = "{table}"\nkey = ["id"]\nmax_export_rows = {rows}\n'
    common += 'columns = "discover"\n'
    return f'[datasets.scoped]\n{common}scope = {{ column = "org_id", claim = "org" }}\n\n[datasets.plain]\n{common}'


@dataclass
class Round:
    scoped_seconds: float | None = None
    plain_seconds: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.scoped_seconds / self.plain_seconds if self.scoped_seconds and self.plain_seconds else None


def export_one(stack: Stack, secret: str, dataset: str, scratch: Path, expected: int, rnd: Round) -> tuple[float, str]:
    """One export as a new user (the scoped one with the tenant's claim): its seconds and SHA-256."""
    settings = Settings(jwt_secret=secret)
    user = f"bench-{secrets.token_hex(4)}"
    claims = {"org": TENANT} if dataset == "scoped" else None
    client = DataportClient(stack.url, issue_token(settings, user, claims=claims))
    request = {"dataset": dataset, "format": "CSV"}
    if dataset == "plain":
        request["filters"] = [{"field": "org_id", "op": "EQ", "value": TENANT}]
    followed = export_sampled(stack, client, request)
    task = followed.task
    if task["status"] != "SUCCEEDED":
        raise RuntimeError(f"{dataset}: task {task['status']}: {task.get('error')}")
    path = scratch / f"{dataset}.csv"
    try:
        sha = download(task["downloadUrl"], path)
        header, records = csv_records(path)
    finally:
        path.unlink(missing_ok=True)
    rnd.checks[f"{dataset} row count"] = task["rowCount"] == expected and records == expected
    rnd.checks[f"{dataset} header"] = header[:2] == ["id", "org_id"]
    return followed.seconds, sha


def measure_round(n: int, stack: Stack, secret: str, scratch: Path, expected: int) -> Round:
    rnd = Round()
    order = ["scoped", "plain"] if n % 2 else ["plain", "scoped"]
    sums: dict[str, str] = {}
    try:
        for dataset in order:
            seconds, sums[dataset] = export_one(stack, secret, dataset, scratch, expected, rnd)
            setattr(rnd, f"{dataset}_seconds", seconds)
        rnd.checks["same bytes"] = sums["scoped"] == sums["plain"]
    except Exception as e:
        rnd.error = f"{type(e).__name__}: {e}"
    return rnd


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=DEFAULT_URL)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "scoped_export.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    load = note_load()
    table = ensure_table(args.postgres_url, args.rows)
    expected = sum(1 for i in range(1, args.rows + 1) if i % TENANTS == TENANT)
    with psycopg.connect(args.postgres_url) as conn:  # read once, untimed: nobody reads it cold
        conn.execute(f"SELECT count(*) FROM {table} WHERE org_id = %s", (TENANT,)).fetchone()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scoped_export-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    rounds: list[Round] = []
    secret = secrets.token_urlsafe(32)
    datasets = scratch / "datasets.toml"
    datasets.write_text(datasets_toml(args.postgres_url, table, args.rows))
    port = free_port()
    try:
        redis.start()
        env = stack_env(scratch / "data", scratch / "files", redis.url, secret, port, datasets=datasets)
        stack = Stack(env, port, OUT_DIR / "logs" / "scoped_export")
        try:
            stack.start()
            time.sleep(0.5)
            warm = measure_round(0, stack, secret, scratch, expected)  # untimed: the stack's first exports
            if warm.error:
                rounds.append(warm)
            for n in range(1, args.runs + 1 if not warm.error else 0):
                console.print(f"[dim]  round {n} of {args.runs}[/dim]")
                rounds.append(measure_round(n, stack, secret, scratch, expected))
                if rounds[-1].error:
                    break
        finally:
            stack.stop()
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    ok = bool(rounds) and all(not r.error and all(r.checks.values()) for r in rounds)
    ratios = [r.ratio for r in rounds if r.ratio is not None]
    ratio = median(ratios) if ratios else None
    met = ok and ratio is not None and ratio <= TARGET_RATIO
    out = Table(title=f"scoped export: {args.rows:,} rows, tenant {TENANT} owns {expected:,}")
    for column in ("round", "scoped s", "plain (EQ filter) s", "ratio", "checks"):
        out.add_column(column, justify="right")
    for i, r in enumerate(rounds, 1):
        fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        checks = r.error or ("ok" if all(r.checks.values()) else ", ".join(k for k, v in r.checks.items() if not v))
        out.add_row(str(i), fmt(r.scoped_seconds), fmt(r.plain_seconds), fmt(r.ratio), checks)
    console.print(out)
    verdict = "PASS" if met else "MISS"
    console.print(
        f"median ratio scoped / plain: {ratio:.2f}x (target <= {TARGET_RATIO}x): {verdict}" if ratio else "no ratio"
    )
    write_json(
        args.out,
        "scoped_export",
        load_average_at_start=load,
        settings={"postgres_url": args.postgres_url, "rows": args.rows, "tenants": TENANTS, "runs": args.runs},
        rounds=[{**asdict(r), "ratio": r.ratio} for r in rounds],
        median_ratio=ratio,
        target_ratio=TARGET_RATIO,
        ok=ok,
    )
    console.print(f"numbers in {args.out}")
    if not ok:
        return 1
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
