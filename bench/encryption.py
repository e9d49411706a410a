"""Encryption cost: the 1M x 20 PostgreSQL export and its download, encrypted against clear.

Command (from the repository root; PostgreSQL must be running, trust auth)::

    python bench/encryption.py                   # 1,000,000 rows x 20 columns, 2 rounds
    python bench/encryption.py --rows 200000 --runs 3 --postgres-url postgresql://postgres@host/db

Two stacks (``dataport api`` + ``dataport worker``, local storage, one embedded Redis) run side by
side in the same run on the table of ``bench/postgres_export.py``'s copy case: one with
``DATAPORT_ENCRYPTION=none``, one with ``aes256-gcm`` and a ``DATAPORT_KEK``. Each round exports on
both, alternating which goes first, as a new user: ``export`` is request to SUCCEEDED (encrypting
as it writes, then ``verify`` decrypting the whole file), ``download`` the whole file through
``GET /files/{id}`` (clear: Starlette's FileResponse; encrypted: decrypted as it streams). The
worker's and the api's RSS are sampled every 10 ms (peak, with children). Each download's
SHA-256 and size are checked against the task's. Figures are medians of the rounds; ratios are
encrypted / clear. Target: ``export + download`` ratio <= 1.15x, peak RSS flat (no more than a
few MiB over clear).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from _common import OUT_DIR, PeakRss, Stack, console, download, export_sampled, mib, note_load, stack_env, write_json
from postgres_export import DEFAULT_URL, datasets_toml, ensure_copy_table
from postgres_export import Case as CopyCase

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.settings import Settings

TARGET = 1.15
MODES = ("clear", "encrypted")


def start(mode: str, case: CopyCase, url: str, redis_url: str, scratch: Path, secret: str) -> Stack:
    datasets = scratch / "datasets.toml"
    datasets.write_text(datasets_toml(case, url))
    extra = {"encryption": "none"} if mode == "clear" else {"encryption": "aes256-gcm", "kek": secrets.token_hex(32)}
    port = free_port()
    env = stack_env(
        scratch / f"data-{mode}", scratch / f"files-{mode}", redis_url, secret, port, datasets=datasets, **extra
    )
    stack = Stack(env, port, OUT_DIR / "logs" / f"encryption-{mode}")
    stack.start()
    return stack


def one(mode: str, stack: Stack, case: CopyCase, secret: str, scratch: Path) -> dict[str, Any]:
    client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}"))
    followed = export_sampled(stack, client, {"dataset": case.name, "format": "CSV"})
    task = followed.task
    if task["status"] != "SUCCEEDED":
        raise RuntimeError(f"{mode}: task {task['status']}: {task.get('error')}")
    out = scratch / f"download-{mode}.csv"
    assert stack.api is not None
    sampler = PeakRss(stack.api.pid)
    sampler.start()
    started = time.perf_counter()
    try:
        sha = download(task["downloadUrl"], out)
    finally:
        seconds = time.perf_counter() - started
        api_peak = sampler.stop()
    size = out.stat().st_size
    out.unlink()
    if (sha, size) != (task["checksumSha256"], task["fileSize"]):
        raise RuntimeError(f"{mode}: the download does not match the task's SHA-256 and size")
    stored = sum(p.stat().st_size for p in (scratch / f"files-{mode}").rglob("*") if task["id"] in str(p))
    return {
        "export_seconds": followed.seconds,
        "download_seconds": seconds,
        "worker_peak_rss": followed.worker_peak_rss,
        "api_peak_rss": api_peak,
        "file_bytes": task["fileSize"],
        "stored_bytes": stored,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--postgres-url", default=DEFAULT_URL)
    args = parser.parse_args()
    load = note_load()
    table = ensure_copy_table(args.postgres_url, args.rows)
    case = CopyCase("copy", table, args.rows, 20, [], f"ratio <= {TARGET}x")
    scratch = Path(tempfile.mkdtemp(prefix="encryption-", dir=OUT_DIR))
    redis = EmbeddedRedis(scratch)
    secret = secrets.token_urlsafe(32)
    rounds: list[dict[str, dict[str, Any]]] = []
    stacks: dict[str, Stack] = {}
    try:
        redis.start()
        for mode in MODES:
            stacks[mode] = start(mode, case, args.postgres_url, redis.url, scratch, secret)
        for n in range(args.runs):
            order = MODES if n % 2 == 0 else MODES[::-1]
            console.print(f"[dim]round {n + 1} of {args.runs}: {' then '.join(order)}[/dim]")
            rounds.append({mode: one(mode, stacks[mode], case, secret, scratch) for mode in order})
    finally:
        for stack in stacks.values():
            stack.stop()
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    def med(mode: str, name: str) -> float:
        return median(r[mode][name] for r in rounds)

    def peak(mode: str, name: str) -> int:
        return max(r[mode][name] for r in rounds)

    totals = {m: med(m, "export_seconds") + med(m, "download_seconds") for m in MODES}
    ratio = median(
        (r["encrypted"]["export_seconds"] + r["encrypted"]["download_seconds"])
        / (r["clear"]["export_seconds"] + r["clear"]["download_seconds"])
        for r in rounds
    )
    console.print(f"\n{args.rows:,} rows x 20 columns, {args.runs} rounds (medians; peak RSS: the highest)")
    console.print(f"{'':12} {'export s':>9} {'download s':>11} {'total s':>8} {'worker MiB':>11} {'api MiB':>8}")
    for m in MODES:
        console.print(
            f"{m:12} {med(m, 'export_seconds'):9.2f} {med(m, 'download_seconds'):11.2f} {totals[m]:8.2f} "
            f"{mib(peak(m, 'worker_peak_rss')):>11} {mib(peak(m, 'api_peak_rss')):>8}"
        )
    export_ratio = med("encrypted", "export_seconds") / med("clear", "export_seconds")
    download_ratio = med("encrypted", "download_seconds") / med("clear", "download_seconds")
    verdict = "PASS" if ratio <= TARGET else "MISS"
    console.print(
        f"ratio encrypted/clear: export {export_ratio:.2f}x, download {download_ratio:.2f}x, "
        f"export + download {ratio:.2f}x (target <= {TARGET}x: {verdict}); file "
        f"{rounds[0]['clear']['file_bytes']:,} bytes, stored encrypted {rounds[0]['encrypted']['stored_bytes']:,}"
    )
    write_json(
        OUT_DIR / "encryption.json",
        "encryption",
        rows=args.rows,
        load=load,
        rounds=rounds,
        ratio=ratio,
        export_ratio=export_ratio,
        download_ratio=download_ratio,
        target=TARGET,
        verdict=verdict,
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
