"""Local storage benchmark: a large file written through ``LocalWriter``, synced as it grows (the
default, every ``SYNC_EVERY`` bytes) against synced once at the end (the peer), in the same run.

Command (from the repository root)::

    python bench/local_storage.py                    # 193 MB (the copy case's file), 5 rounds
    python bench/local_storage.py --mb 877 --rounds 3  # the wide case's file

What it does: each round writes the same bytes (random, made once) in 256 KiB chunks, as an
export hands them over, through ``LocalStorage.open_writer`` under ``bench/out/``, then
``complete()`` (flush, fsync, rename, directory fsync); the two ways take turns. It times the
writes and ``complete()`` apart: ``complete()`` runs after the last row of an export, on its
critical path, while the writes overlap the reading. Each file's SHA-256 and size are checked
against the bytes, then the file is removed.

How to read it: medians (min-max) in seconds. What the sync as it grows buys is ``complete``'s
time; what it may cost is in ``writes``. Disks differ: read the two columns of one run together.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path

from _common import OUT_DIR as OUT
from _common import median_of, write_json

import storage.local as local_storage

CHUNK = 256 * 1024


async def write_once(root: Path, data: bytes, sync_every: int) -> tuple[float, float]:
    local_storage.SYNC_EVERY = sync_every
    storage = local_storage.LocalStorage(root, "http://127.0.0.1", "x" * 32)
    key = "bench/file.csv"
    started = time.perf_counter()
    writer = await storage.open_writer(key, "text/csv")
    for at in range(0, len(data), CHUNK):
        await writer.write(data[at : at + CHUNK])
    written = time.perf_counter()
    stored = await writer.complete()
    completed = time.perf_counter()
    if (stored.size, stored.sha256) != (len(data), hashlib.sha256(data).hexdigest()):
        raise SystemExit(f"the stored file does not match what was written: {stored}")
    storage.path_for(key).unlink()
    return written - started, completed - written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=193)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = OUT / "local_storage"
    shutil.rmtree(root, ignore_errors=True)
    data = os.urandom(args.mb * 1_000_000)
    ways = {"synced as it grows": local_storage.SYNC_EVERY, "synced at the end (peer)": 1 << 62}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, sync_every in ways.items():
            times[name].append(asyncio.run(write_once(root, data, sync_every)))
    shutil.rmtree(root, ignore_errors=True)

    def cell(values: list[float]) -> str:
        return f"{median_of(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    print(f"{args.mb} MB in {CHUNK // 1024} KiB chunks, {args.rounds} rounds, medians (min-max) in seconds")
    print(f"{'':26} {'writes':>22} {'complete()':>22} {'total':>22}")
    for name, rounds in times.items():
        writes, completes = [w for w, _ in rounds], [c for _, c in rounds]
        totals = [w + c for w, c in rounds]
        print(f"{name:26} {cell(writes):>22} {cell(completes):>22} {cell(totals):>22}")
    write_json(
        OUT / "local_storage.json",
        "local_storage",
        mb=args.mb,
        chunk=CHUNK,
        sync_every=local_storage.SYNC_EVERY,
        rounds={k: v for k, v in times.items()},
    )


if __name__ == "__main__":
    main()
