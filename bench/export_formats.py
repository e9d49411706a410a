"""Export formats benchmark (issue 20, item 9): XLSX and Parquet against CSV, gzip and zstd against
none, on the demo dataset through the whole path, in the same run.

Command (from the repository root)::

    python bench/export_formats.py                 # 80,000 rows (and 10,000 for the memory check), 2 rounds
    python bench/export_formats.py --rounds 3 --rows 80000 --small 10000

For each round, each case (CSV, XLSX, PARQUET, CSV+GZIP, CSV+ZSTD) is one export of all 67
columns of the demo dataset by a fresh ``dataport api`` + ``dataport worker`` (so each worker's
peak RSS is its own), on one embedded Redis, local storage: ``requestExport`` followed over the
``exportProgress`` subscription until SUCCEEDED ("seconds"), the worker's RSS sampled every 10 ms
("peak") and its ``VmHWM`` read at the end; then the file is downloaded and its SHA-256 checked.
The cases run in a different order each round. ``ratio`` is a case's seconds over the CSV's of
the same round; the table shows the median of the rounds. Memory: XLSX and Parquet are exported
again at ``--small`` rows; their peak RSS at ``--rows`` over that at ``--small`` is the "flat"
check (≤ 1.2x). Targets: XLSX ≤ 3x CSV, Parquet ≤ 1.5x CSV. A missed target prints MISS (exit 1
with ``--strict``). Numbers go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    OUT_DIR,
    PeakRss,
    Stack,
    console,
    download,
    export_and_follow,
    high_water_mark,
    mib,
    note_load,
    write_json,
)
from _common import stack_env as common_stack_env
from export_demo import prepare_database
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

CASES = {  # name: (format, compression)
    "CSV": ("CSV", "NONE"),
    "XLSX": ("XLSX", "NONE"),
    "PARQUET": ("PARQUET", "NONE"),
    "CSV+GZIP": ("CSV", "GZIP"),
    "CSV+ZSTD": ("CSV", "ZSTD"),
}
TARGETS = {"XLSX": 3.0, "PARQUET": 1.5}
RSS_LIMIT = 1.2


def run_case(rows: int, case: str, redis_url: str, scratch: Path) -> dict:
    file_format, compression = CASES[case]
    data_dir, _ = prepare_database(rows)
    secret = secrets.token_urlsafe(32)
    port = free_port()
    env = common_stack_env(
        data_dir,
        scratch / f"files-{rows}-{case}",
        redis_url,
        secret,
        port,
        demo_rows=str(rows),
        max_export_rows=str(rows),
    )
    stack = Stack(env, port, OUT_DIR / "logs" / f"export_formats-{rows}-{case}")
    out: dict = {"case": case, "rows": rows}
    try:
        stack.start()
        assert stack.worker is not None
        time.sleep(0.5)
        client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}"))
        sampler = PeakRss(stack.worker.pid)
        sampler.start()
        try:
            task, seconds = asyncio.run(
                export_and_follow(client, {"dataset": "samples", "format": file_format, "compression": compression})
            )
        finally:
            out["peak_rss"] = sampler.stop()
        out["vm_hwm"] = high_water_mark(stack.worker.pid)
        if task["status"] != "SUCCEEDED":
            out["error"] = f"{task['status']}: {task.get('error')}"
            return out
        path = scratch / f"{case}-{rows}"
        sha = download(task["downloadUrl"], path)
        out.update(
            seconds=seconds, bytes=task["fileSize"], ok=sha == task["checksumSha256"] and task["rowCount"] == rows
        )
        path.unlink()
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        stack.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=80_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "export_formats.json")
    args = parser.parse_args()
    load = note_load()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="export_formats-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    runs: list[dict] = []
    try:
        redis.start()
        names = list(CASES)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for case in order:
                console.print(f"round {r + 1}: {case} at {args.rows:,} rows…")
                runs.append({"round": r, **run_case(args.rows, case, redis.url, scratch)})
        small = [run_case(args.small, case, redis.url, scratch) for case in ("CSV", "XLSX", "PARQUET")]
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    by_round = {r: {x["case"]: x for x in runs if x["round"] == r} for r in range(args.rounds)}
    table = Table(title=f"{args.rows:,} rows x 67 columns, whole path, median of {args.rounds} rounds")
    for column in ("case", "seconds", "ratio to CSV", "file", "size to CSV", "worker peak RSS", "VmHWM"):
        table.add_column(column, justify="left" if column == "case" else "right")
    summary: dict[str, dict] = {}
    missed = False
    for case in CASES:
        done = [by_round[r][case] for r in by_round if "seconds" in by_round[r].get(case, {})]
        ratios = [by_round[r][case]["seconds"] / by_round[r]["CSV"]["seconds"] for r in by_round
                  if "seconds" in by_round[r].get(case, {}) and "seconds" in by_round[r].get("CSV", {})]  # fmt: skip
        if not done:
            table.add_row(case, "failed", "", "", "", "", "")
            missed = True
            continue
        seconds = statistics.median(x["seconds"] for x in done)
        ratio = statistics.median(ratios) if ratios else None
        size = done[0]["bytes"]
        csv_size = next((by_round[r]["CSV"]["bytes"] for r in by_round if "bytes" in by_round[r].get("CSV", {})), None)
        peak = max(x["peak_rss"] for x in done)
        hwm = max(x["vm_hwm"] or 0 for x in done)
        verdict = ""
        if case in TARGETS and ratio is not None:
            verdict = " ok" if ratio <= TARGETS[case] else " MISS"
            missed |= ratio > TARGETS[case]
        summary[case] = {"seconds": seconds, "ratio": ratio, "bytes": size, "peak_rss": peak, "vm_hwm": hwm}
        table.add_row(
            case,
            f"{seconds:.2f}",
            f"{ratio:.2f}x{verdict}" if ratio else "",
            f"{size / 1e6:.1f} MB",
            f"{size / csv_size:.2f}" if csv_size else "",
            mib(peak),
            mib(hwm),
        )
    console.print(table)
    flat: dict[str, float | None] = {}
    for x in small:
        big = summary.get(x["case"], {}).get("peak_rss")
        ratio = big / x["peak_rss"] if big and x.get("peak_rss") and "seconds" in x else None
        flat[x["case"]] = ratio
        verdict = "ok" if ratio is not None and ratio <= RSS_LIMIT else "MISS"
        missed |= verdict == "MISS"
        console.print(
            f"{x['case']}: worker peak RSS {mib(x.get('peak_rss'))} at {args.small:,} rows, "
            f"{mib(big)} at {args.rows:,}: {ratio and f'{ratio:.2f}x'} {verdict}"
        )
    write_json(
        args.out, "export_formats", load=load, args=vars(args), runs=runs, small=small, summary=summary, flat=flat
    )
    console.print(f"numbers in {args.out}")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
