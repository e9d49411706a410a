"""OpenSearch export benchmark: 200,000 narrow documents to CSV, Dataport against elasticdump.

Command (from the repository root)::

    npm install --prefix bench/out/node elasticdump   # once: the peer (bench/out is not committed)
    python bench/opensearch_export.py                 # 200,000 documents, elasticdump --limit=10000
    python bench/opensearch_export.py --runs 3        # three runs on the one loaded index
    python bench/opensearch_export.py --docs 50000 --limit 5000 --elasticdump /path/to/elasticdump
    python bench/opensearch_export.py --osmem-url http://127.0.0.1:9200   # an osmem started by hand: the
                                                      # index is loaded once and kept between invocations

What it does:

1. Starts a private in-memory OpenSearch-compatible server (the ``osmem-server`` binary of the
   ``osmem-server`` wheel, as tests/fixtures/opensearch.py starts it) on a free loopback port, and
   loads the index ``bench_docs``: N documents of 18 narrow fields (ids, keywords with unicode,
   commas, quotes and newlines, dates, date-times, doubles with missing values, longs, booleans).
   Loading is not timed (osmem indexes ~500-700 such documents a second: ~6 minutes for 200,000).
   osmem cannot take wide documents, so this bench stays narrow.
2. Starts ``dataport api`` + ``dataport worker`` on an embedded Redis with a datasets file and local
   storage, sends ``requestExport`` (all columns, CSV) and follows ``exportProgress`` until
   SUCCEEDED ("seconds"), the worker's RSS sampled every 10 ms; downloads the file and checks
   SHA-256, size, ``rowCount``, header and CSV record count. Twice, each on a fresh api + worker:

   * dataset ``docs`` (``source = "opensearch"``, ``key = ["id"]``, ``columns = "discover"`` from
     the mapping): the configuration to use, and the one the target is judged on. Dataport reads it
     sorted by ``id`` (pages of 10,000), so that a rerun writes the same file: 20 pages, so one
     scroll sorted by ``id`` rather than a point in time + ``search_after`` (sources/opensearch/plan.py,
     ``PIT_MAX_PAGES``: osmem sorts every match again for each ``search_after`` page);
   * dataset ``docs_scroll``: the same index without a key, which Dataport reads with one scroll in
     ``_doc`` order, as elasticdump reads it (``--no-scroll-variant`` skips it).
3. Runs the peers, one at a time, timed and sampled the same way:

   * ``elasticdump --input=http://127.0.0.1:PORT/bench_docs --output=FILE --type=data
     --limit=10000 --searchBody=<match_all + track_total_hits>``. ``--limit`` is elasticdump's page
     size (documents per scroll request); 10,000 is the most OpenSearch answers per request by
     default (``index.max_result_window``), and elasticdump's default is 100. The search body is
     elasticdump's default plus ``track_total_hits``: elasticdump stops at ``hits.total``, which a
     real cluster counts exactly for a scroll but osmem caps at 10,000 unless asked;
   * ``python scroll``: the least a Python program does with opensearch-py's defaults to read the
     index the way Dataport does (one scroll sorted by ``id``, pages of 10,000) into a CSV with
     ``csv.writer`` (the bare opensearch-py reader);
   * ``python fetch``: the floor of any Python reader: elasticdump's requests (one scroll in
     ``_doc`` order, pages of 10,000), each answer's bytes parsed with orjson, nothing converted
     or written;
   * ``python PIT`` (``--no-pit-peer`` skips it): as ``python scroll``, but through a point in time
     + ``search_after``: what the sorted read costs osmem that way (it sorts again for each page).

The outputs differ in kind: elasticdump writes its native format, one JSON object per line per hit
(``{"_index", "_id", "_score", "_source": {...}}``, fields as stored, in scroll order), while Dataport
writes a typed CSV with a header, one column per mapped field, formula guard on, and verifies the
stored file before SUCCEEDED. The comparison is "the same documents out of the same index into a
file", not the same bytes.

How to read the result: ``x`` = Dataport (``docs``) seconds / that column's seconds; the target is
Dataport / elasticdump <= 0.5 (Dataport at least 2x faster), printed PASS or MISS below the table,
with the keyless dataset's ratio beside it. ``queued`` and ``job`` split Dataport's seconds
(createdAt -> startedAt, startedAt -> finishedAt); ``download`` is not in the ratio. RSS in MiB:
worker peak (idle) and each peer's peak; osmem's RSS after loading is shown for scale. osmem is an
in-memory emulator: what a sorted read costs it (the sort before the first page, ``python PIT``'s
sort per page) need not be what it costs a real cluster, so judge Dataport's own share by ``x``
against ``python scroll`` and ``python fetch``, and by the keyless run against elasticdump. With
``--runs N`` the index is loaded once, each run (both exports on fresh stacks, then every peer)
gets its own table, and a summary gives the ratios' range. The script exits 1 when a file check
fails or something fails to run (also when elasticdump is missing: install it as above); a missed
target exits 1 only with ``--strict``. Numbers go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from _common import (
    OUT_DIR,
    SAMPLE_SECONDS,
    PeerComparison,
    Stack,
    console,
    csv_records,
    download,
    export_sampled,
    high_water_mark,
    mib,
    note_load,
    run_peer,
    stack_env,
    tree_cpu,
    tree_rss,
    wait_for_helpers,
    write_json,
)
from opensearchpy import OpenSearch, helpers
from rich.table import Table

from api.auth import issue_token
from dataport.client import DataportClient
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import free_port
from dataport.processes import die_with_parent, stop
from dataport.settings import Settings

INDEX = "bench_docs"
TARGET_RATIO = 0.5  # Dataport seconds / elasticdump seconds: at least 2x faster
DEFAULT_ELASTICDUMP = OUT_DIR / "node" / "node_modules" / ".bin" / "elasticdump"

MAPPING = {
    "id": {"type": "long"},
    "site": {"type": "keyword"},
    "sample_code": {"type": "keyword"},
    "lithology": {"type": "keyword"},
    "lab": {"type": "keyword"},
    "collected_on": {"type": "date", "format": "yyyy-MM-dd"},
    "analysed_at": {"type": "date"},
    "depth_m": {"type": "double"},
    "au_ppm": {"type": "double"},
    "ag_ppm": {"type": "double"},
    "cu_pct": {"type": "double"},
    "zn_pct": {"type": "double"},
    "grain_count": {"type": "long"},
    "box_no": {"type": "long"},
    "is_duplicate": {"type": "boolean"},
    "qc_passed": {"type": "boolean"},
    "weight_g": {"type": "double"},
    "notes": {"type": "keyword"},
}
SITES = ("North Ridge", "Ørsted Fell", 'Mount "Grey"', "Lake, East", "東京 Basin", "Zoë's Creek")
ROCKS = ("granite", "basalt", "schist", "gneiss", "tuff")
LABS = ("Perth", "Vancouver", "Santiago")


def document(i: int) -> dict:
    """Document ``i``: deterministic, some fields missing (SQL's NULL), like the PostgreSQL bench."""
    h = (i * 2654435761) % 2**32  # a cheap, fixed spread of values
    doc = {
        "id": i,
        "site": SITES[i % len(SITES)],
        "sample_code": f"S-{i:08d}",
        "lithology": None if i % 11 == 0 else ROCKS[i % len(ROCKS)],
        "lab": LABS[i % len(LABS)],
        "collected_on": (date(2010, 1, 1) + timedelta(days=i % 5000)).isoformat(),
        "analysed_at": None
        if i % 13 == 0
        else (datetime(2010, 1, 1, tzinfo=UTC) + timedelta(seconds=317 * i)).isoformat().replace("+00:00", "Z"),
        "depth_m": None if i % 9 == 0 else round(h % 8000 / 10, 1),
        "au_ppm": None if i % 7 == 0 else h / 2**32 * 12,
        "ag_ppm": None if i % 5 == 0 else round(h % 90000 / 1000, 3),
        "cu_pct": None if i % 6 == 0 else (h % 1000003) / 1000003,
        "zn_pct": round(h % 4000 / 100, 2),
        "grain_count": h % 100000,
        "box_no": None if i % 17 == 0 else i // 40,
        "is_duplicate": i % 23 == 0,
        "qc_passed": None if i % 10 == 0 else i % 3 != 0,
        "weight_g": None if i % 12 == 0 else round(h % 500000 / 100, 2),
        "notes": None
        if i % 3 == 0
        else '=HYPERLINK("http://example.com")'
        if i % 97 == 0
        else 'two lines,\nand "quotes"'
        if i % 53 == 0
        else f"note {i}",
    }
    return {k: v for k, v in doc.items() if v is not None}


# --- osmem ---------------------------------------------------------------------------------------


def osmem_binary() -> Path:
    """The server binary inside the osmem wheel, made executable if the install lost its run bit."""
    import osmem_server

    path = Path(osmem_server.resolve_binary())
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def start_osmem(port: int, log: Path, timeout: float = 30.0) -> subprocess.Popen:
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(osmem_binary()), "-addr", f"127.0.0.1:{port}", "-no-stdin-watch", "-parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"osmem-server exited with code {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop(process)
            raise TimeoutError(f"osmem-server did not answer on {url} within {timeout:g} s")
        time.sleep(0.05)


def load_index(url: str, docs: int) -> float:
    """Create ``INDEX`` and bulk-load ``docs`` documents (not timed as part of any measurement)."""
    started = time.perf_counter()
    client = OpenSearch(url, timeout=120)
    try:
        client.indices.create(index=INDEX, body={"mappings": {"properties": MAPPING}})
        actions = ({"_index": INDEX, "_id": str(i), "_source": document(i)} for i in range(1, docs + 1))
        helpers.bulk(client, actions, chunk_size=5000, request_timeout=120)
        client.indices.refresh(index=INDEX)
        count = client.count(index=INDEX)["count"]
        if count != docs:
            raise RuntimeError(f"the index holds {count} documents, not {docs}")
    finally:
        client.close()
    return time.perf_counter() - started


# --- the result ----------------------------------------------------------------------------------


@dataclass
class Result(PeerComparison):
    docs: int
    columns: int = 0
    seconds: float = 0.0
    file_bytes: int = 0
    worker_idle_rss: int = 0
    worker_peak_rss: int = 0
    worker_hwm: int | None = None
    rss_samples: int = 0
    queued_seconds: float | None = None
    worker_seconds: float | None = None
    cpu_seconds: float | None = None  # the worker's and its helpers' CPU (user + system) during the export
    download_seconds: float = 0.0
    load_seconds: float = 0.0
    osmem_rss: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    peers: list[dict] = field(default_factory=list)  # elasticdump (the target's peer), then python PIT
    scroll: dict = field(default_factory=dict)  # the same documents as a dataset without a key (a scroll)
    target_met: bool | None = None

    @property
    def docs_per_second(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict:
        return {
            **asdict(self),
            "docs_per_second": self.docs_per_second,
            "ratio_to_peer": self.ratio,
            "ratios_to_peers": {p["name"]: self.ratio_to(p) for p in self.peers},
            "ok": self.ok,
        }


def datasets_toml(url: str, docs: int) -> str:
    return f"""
[datasets.docs]
title = "bench: {INDEX}"
source = "opensearch"
url = "{url}"
index = "{INDEX}"
key = ["id"]
max_export_rows = {docs}
columns = "discover"

# The same index without a key: read with one scroll in _doc order, as elasticdump reads it.
[datasets.docs_scroll]
source = "opensearch"
url = "{url}"
index = "{INDEX}"
max_export_rows = {docs}
columns = "discover"
"""


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""))


# A real cluster counts a scroll's hits exactly; osmem caps ``hits.total`` at 10,000 ("gte") unless
# asked, and elasticdump stops reading at ``hits.total``. Its default search body plus the request
# for an exact total: what it reads from a real cluster with its defaults.
ELASTICDUMP_SEARCH_BODY = '{"query":{"match_all":{}},"track_total_hits":true}'

# The least a Python program does to read the index as Dataport does (point in time, search_after
# sorted by id, pages of 10,000) into a CSV: opensearch-py and csv.writer, no typing of cells.
PYTHON_PIT = """
import csv, sys
from opensearchpy import OpenSearch
url, index, out, columns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
client = OpenSearch(url, timeout=120)
pit = client.create_pit(index=index, keep_alive="5m")["pit_id"]
with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, lineterminator="\\r\\n")
    w.writerow(columns)
    after = None
    while True:
        body = {"size": 10000, "pit": {"id": pit, "keep_alive": "5m"}, "sort": [{"id": "asc"}],
                "_source": columns, "track_total_hits": False}
        if after:
            body["search_after"] = after
        hits = client.search(body=body)["hits"]["hits"]
        w.writerows([h["_source"].get(c) for c in columns] for h in hits)
        if len(hits) < 10000:
            break
        after = hits[-1]["sort"]
client.delete_pit(body={"pit_id": [pit]})
"""


# The same with one scroll sorted by id (how Dataport reads a long export in key order): the least a
# Python program does for that read, with opensearch-py's defaults (the standard json module).
PYTHON_SCROLL = """
import csv, sys
from opensearchpy import OpenSearch
url, index, out, columns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
client = OpenSearch(url, timeout=120)
with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, lineterminator="\\r\\n")
    w.writerow(columns)
    page = client.search(index=index, scroll="5m", body={"size": 10000, "sort": [{"id": "asc"}]})
    while page["hits"]["hits"]:
        w.writerows([h["_source"].get(c) for c in columns] for h in page["hits"]["hits"])
        page = client.scroll(body={"scroll_id": page["_scroll_id"], "scroll": "5m"})
client.clear_scroll(body={"scroll_id": [page["_scroll_id"]]})
"""


# The floor of any Python reader: elasticdump's pages (one scroll in _doc order, 10,000 a page) as
# bytes, parsed with orjson, nothing converted or written. Counts the hits into ``out``.
PYTHON_FETCH = """
import json, sys, urllib.request
import orjson
url, index, out = sys.argv[1], sys.argv[2], sys.argv[3]

def post(path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return orjson.loads(answer.read())

page = post("/" + index + "/_search?scroll=5m", {"size": 10000, "sort": ["_doc"]})
hits = 0
while page["hits"]["hits"]:
    hits += len(page["hits"]["hits"])
    page = post("/_search/scroll", {"scroll_id": page["_scroll_id"], "scroll": "5m"})
with open(out, "w") as f:
    f.write(str(hits))
"""


def run_elasticdump(binary: Path, url: str, out: Path, limit: int, log: Path) -> dict:
    command = [
        str(binary),
        f"--input={url}/{INDEX}",
        f"--output={out}",
        "--type=data",
        f"--limit={limit}",
        f"--searchBody={ELASTICDUMP_SEARCH_BODY}",
    ]
    with log.open("wb") as f:  # elasticdump logs a line per page to stdout
        seconds, peak = run_peer(command, stdout=f)
    lines = count_lines(out)
    with out.open("rb") as f:
        first = json.loads(f.readline())
    return {
        "name": "elasticdump",
        "command": " ".join(command),
        "limit": limit,
        "seconds": seconds,
        "peak_rss": peak,
        "bytes": out.stat().st_size,
        "records": lines,
        "format_ok": isinstance(first.get("_source"), dict),
    }


def run_python_pit(url: str, out: Path, columns: list[str]) -> dict:
    seconds, peak = run_peer([sys.executable, "-c", PYTHON_PIT, url, INDEX, str(out), ",".join(columns)])
    header, records = csv_records(out)
    return {
        "name": "python PIT",
        "seconds": seconds,
        "peak_rss": peak,
        "bytes": out.stat().st_size,
        "records": records,
        "format_ok": header == columns,
    }


def run_python_fetch(url: str, out: Path) -> dict:
    seconds, peak = run_peer([sys.executable, "-c", PYTHON_FETCH, url, INDEX, str(out)])
    return {
        "name": "python fetch",
        "seconds": seconds,
        "peak_rss": peak,
        "bytes": 0,
        "records": int(out.read_text()),
        "format_ok": True,
    }


def run_python_scroll(url: str, out: Path, columns: list[str]) -> dict:
    seconds, peak = run_peer([sys.executable, "-c", PYTHON_SCROLL, url, INDEX, str(out), ",".join(columns)])
    header, records = csv_records(out)
    return {
        "name": "python scroll",
        "seconds": seconds,
        "peak_rss": peak,
        "bytes": out.stat().st_size,
        "records": records,
        "format_ok": header == columns,
    }


def export_once(
    dataset: str, args: argparse.Namespace, redis_url: str, datasets: Path, scratch: Path, logs: Path
) -> dict:
    """One export of ``dataset`` on a fresh api + worker: timings, worker memory, file checks."""
    secret = secrets.token_urlsafe(32)
    port = free_port()
    stack = Stack(
        stack_env(
            scratch / f"data-{dataset}", scratch / f"files-{dataset}", redis_url, secret, port, datasets=datasets
        ),
        port,
        logs / dataset,
    )
    exported = scratch / f"{dataset}.csv"
    out: dict = {"dataset": dataset}
    try:
        stack.start()
        assert stack.worker is not None
        time.sleep(0.5)  # let start-up settle before the idle reading
        out["worker_idle_rss"] = tree_rss(stack.worker.pid)
        client = DataportClient(stack.url, issue_token(Settings(jwt_secret=secret), f"bench-{secrets.token_hex(4)}"))
        os.sync()
        cpu = tree_cpu(stack.worker.pid)
        followed = export_sampled(stack, client, {"dataset": dataset, "format": "CSV"})
        wait_for_helpers(stack.worker.pid)
        out["cpu_seconds"] = tree_cpu(stack.worker.pid) - cpu  # the worker's and its helpers'
        task = followed.task
        out.update(
            seconds=followed.seconds,
            worker_peak_rss=followed.worker_peak_rss,
            rss_samples=followed.rss_samples,
            worker_hwm=high_water_mark(stack.worker.pid),
            queued_seconds=followed.queued_seconds,
            worker_seconds=followed.worker_seconds,
        )
        if task["status"] != "SUCCEEDED":
            raise RuntimeError(f"{dataset}: task {task['status']}: {task.get('error')}")
        out["file_bytes"] = task["fileSize"]
        started = time.perf_counter()
        sha256 = download(task["downloadUrl"], exported)
        out["download_seconds"] = time.perf_counter() - started
    finally:
        stack.stop()
    header, records = csv_records(exported)
    out["header"] = header
    out["checks"] = {
        "sha256": sha256 == task["checksumSha256"],
        "size": exported.stat().st_size == task["fileSize"],
        "row_count": task["rowCount"] == args.docs,
        "records_in_file": records == args.docs,
        "header": sorted(header) == sorted(MAPPING),
    }
    exported.unlink()
    return out


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: a peer's, taken around it.
    Less disturbed than seconds by other work on a busy machine (it leaves out the waiting)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def index_holds(url: str, docs: int) -> bool | None:
    """Whether ``INDEX`` at ``url`` holds ``docs`` documents; None when there is no such index."""
    client = OpenSearch(url, timeout=120)
    try:
        if not client.indices.exists(index=INDEX):
            return None
        return client.count(index=INDEX)["count"] == docs
    finally:
        client.close()


def measure_once(
    args: argparse.Namespace, osmem_url: str, redis_url: str, datasets: Path, scratch: Path, logs: Path, result: Result
) -> Result:
    """One run: both Dataport exports, each on a fresh api + worker, then the peers, one at a time."""
    try:
        main = export_once("docs", args, redis_url, datasets, scratch, logs)
        header = main.pop("header")
        result.columns = len(header)
        result.checks = main.pop("checks")
        for name in (
            "seconds",
            "file_bytes",
            "worker_idle_rss",
            "worker_peak_rss",
            "worker_hwm",
            "rss_samples",
            "queued_seconds",
            "worker_seconds",
            "cpu_seconds",
            "download_seconds",
        ):
            setattr(result, name, main[name])
        if args.scroll_variant:
            result.scroll = export_once("docs_scroll", args, redis_url, datasets, scratch, logs)
            result.scroll.pop("header")
            result.checks.update({f"scroll {k}": v for k, v in result.scroll["checks"].items()})

        peers = [
            (
                "elasticdump",
                lambda out: run_elasticdump(args.elasticdump, osmem_url, out, args.limit, logs / "elasticdump.log"),
            ),
            ("python scroll", lambda out: run_python_scroll(osmem_url, out, header)),
            ("python fetch", lambda out: run_python_fetch(osmem_url, out)),
        ]
        if args.pit_peer:
            peers.append(("python PIT", lambda out: run_python_pit(osmem_url, out, header)))
        for name, run in peers:
            os.sync()
            peer_out = scratch / f"peer-{name.replace(' ', '-')}.out"
            cpu = children_cpu()
            measured = run(peer_out)
            measured["cpu_seconds"] = children_cpu() - cpu
            result.peers.append(measured)
            result.checks[f"{name} records"] = measured["records"] == args.docs
            result.checks[f"{name} format"] = measured["format_ok"]
            peer_out.unlink()
    except Exception as e:  # reported in the table and the JSON
        result.error = f"{type(e).__name__}: {e}"
    if result.ok and result.ratio is not None:
        result.target_met = result.ratio <= TARGET_RATIO
    return result


def measure(args: argparse.Namespace, scratch: Path) -> list[Result]:
    """Load the index once (or find it loaded at ``--osmem-url``), then ``--runs`` runs."""
    logs = OUT_DIR / "logs" / "opensearch_export"
    logs.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis(scratch)
    osmem: subprocess.Popen | None = None
    setup = Result(args.docs)
    results: list[Result] = []
    try:
        if args.osmem_url:
            osmem_url = args.osmem_url.rstrip("/")
        else:
            osmem_port = free_port()
            osmem_url = f"http://127.0.0.1:{osmem_port}"
            osmem = start_osmem(osmem_port, logs / "osmem.log")
        holds = index_holds(osmem_url, args.docs)
        if holds is False:
            raise RuntimeError(f"index {INDEX} at {osmem_url} holds another number of documents than --docs")
        if holds is None:
            console.print(f"[dim]loading {args.docs:,} documents into osmem (not timed)…[/dim]")
            setup.load_seconds = load_index(osmem_url, args.docs)
        if osmem is not None:
            setup.osmem_rss = tree_rss(osmem.pid)
        console.print(f"[dim]  loaded in {setup.load_seconds:.0f} s; osmem RSS {mib(setup.osmem_rss)} MiB[/dim]")

        redis.start()
        datasets = scratch / "datasets.toml"
        datasets.write_text(datasets_toml(osmem_url, args.docs))
        for _ in range(args.runs):
            result = Result(args.docs, load_seconds=setup.load_seconds, osmem_rss=setup.osmem_rss)
            results.append(measure_once(args, osmem_url, redis.url, datasets, scratch, logs, result))
    except Exception as e:  # reported in the table and the JSON
        setup.error = f"{type(e).__name__}: {e}"
        results.append(setup)
    finally:
        redis.stop()
        stop(osmem, grace=5.0)
    return results


# --- report --------------------------------------------------------------------------------------


def print_table(r: Result, args: argparse.Namespace) -> None:
    table = Table(
        title=f"OpenSearch (osmem) to a file: {r.docs:,} documents x {len(MAPPING)} fields; "
        "x = Dataport (key) seconds / this column's seconds"
    )
    table.add_column("")
    names = {
        "elasticdump": f"elasticdump (JSON lines, --limit={args.limit}, scroll)",
        "python scroll": "python scroll sorted by id (CSV)",
        "python fetch": "python fetch + orjson parse (floor; no output)",
        "python PIT": "python PIT + search_after (CSV, sorted)",
    }
    runs = [{"name": "Dataport (CSV, key: sorted by id)", **asdict(r)}]
    if r.scroll:
        runs.append({"name": "Dataport (CSV, no key: scroll)", **r.scroll})
    runs += [{**p, "name": names.get(p["name"], p["name"])} for p in r.peers]
    for run in runs:
        table.add_column(run["name"], justify="right")

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(run) if run.get("seconds") else "" for run in runs))

    row("seconds", lambda run: f"{run['seconds']:.2f}")
    row(
        "  queued / job",
        lambda run: (
            f"{run['queued_seconds'] or 0:.2f} / {run['worker_seconds'] or 0:.2f}" if "worker_seconds" in run else ""
        ),
    )
    row("CPU seconds (+ helpers; peer)", lambda run: f"{run['cpu_seconds']:.2f}" if run.get("cpu_seconds") else "")
    row("documents/s", lambda run: f"{r.docs / run['seconds']:,.0f}")
    row("file MB", lambda run: f"{run.get('file_bytes', run.get('bytes', 0)) / 1e6:,.1f}")
    row(
        "peak RSS MiB (worker idle)",
        lambda run: (
            f"{mib(run['worker_peak_rss'])} ({mib(run['worker_idle_rss'])})"
            if "worker_peak_rss" in run
            else mib(run["peak_rss"])
        ),
    )
    row(
        "download seconds (not in x)", lambda run: f"{run['download_seconds']:.2f}" if "download_seconds" in run else ""
    )
    row("x", lambda run: f"{r.seconds / run['seconds']:.2f}x" if r.seconds else "")
    console.print(table)
    verdict = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: ""}[r.target_met]
    if r.ratio:
        console.print(
            f"target: Dataport at least 2x faster than elasticdump (ratio <= {TARGET_RATIO}): "
            f"Dataport / elasticdump = {r.ratio:.2f}x, i.e. {1 / r.ratio:.2f}x the speed {verdict}"
        )
        if r.scroll.get("seconds") and r.peers:
            scroll_ratio = r.scroll["seconds"] / r.peers[0]["seconds"]
            console.print(
                f"  the same with the keyless dataset (scroll): {scroll_ratio:.2f}x, "
                f"{1 / scroll_ratio:.2f}x the speed of elasticdump"
            )
    failed = [name for name, ok in r.checks.items() if not ok]
    console.print(
        "checks: "
        + (
            "[red]FAILED: see below[/red]"
            if r.error
            else "[green]ok[/green]"
            if not failed
            else f"[red]FAILED: {', '.join(failed)}[/red]"
        )
    )
    console.print(f"osmem RSS after loading: {mib(r.osmem_rss)} MiB (loaded in {r.load_seconds:.0f} s, not timed)")
    if r.error:
        console.print(f"[red]error:[/red] {r.error} (logs in {OUT_DIR / 'logs' / 'opensearch_export'})")


PYTHON_PEERS = ("python fetch", "python scroll", "python PIT")


def print_summary(results: list[Result]) -> None:
    """The runs side by side: seconds and the ratios to elasticdump, with their range."""
    table = Table(title=f"{len(results)} runs: seconds (ratio to elasticdump) [CPU seconds]")
    for name in ("run", "Dataport, key", "Dataport, no key", "elasticdump", *PYTHON_PEERS):
        table.add_column(name, justify="right")
    ratios: dict[str, list[float]] = {"key": [], "no key": [], "key, CPU": [], "no key, CPU": []}

    def cell(seconds: float | None, cpu: float | None, dump: float | None) -> str:
        if not seconds:
            return ""
        return f"{seconds:.2f}" + (f" ({seconds / dump:.2f}x)" if dump else "") + (f" [{cpu:.2f}]" if cpu else "")

    for i, r in enumerate(results, 1):
        peers = {p["name"]: p for p in r.peers}
        dump = peers.get("elasticdump", {})
        for label, run in (("key", asdict(r)), ("no key", r.scroll)):
            if run.get("seconds") and dump.get("seconds"):
                ratios[label].append(run["seconds"] / dump["seconds"])
            if run.get("cpu_seconds") and dump.get("cpu_seconds"):
                ratios[f"{label}, CPU"].append(run["cpu_seconds"] / dump["cpu_seconds"])
        table.add_row(
            str(i),
            cell(r.seconds, r.cpu_seconds, dump.get("seconds")),
            cell(r.scroll.get("seconds"), r.scroll.get("cpu_seconds"), dump.get("seconds")),
            cell(dump.get("seconds"), dump.get("cpu_seconds"), None),
            *(cell(peers[n]["seconds"], peers[n].get("cpu_seconds"), None) if n in peers else "" for n in PYTHON_PEERS),
        )
    console.print(table)
    for label, found in ratios.items():
        if found:
            console.print(
                f"Dataport ({label}) / elasticdump: {min(found):.2f}x-{max(found):.2f}x "
                f"(target <= {TARGET_RATIO}); {1 / max(found):.2f}x-{1 / min(found):.2f}x the speed"
            )


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--limit", type=int, default=10_000, help="elasticdump --limit (its page size)")
    parser.add_argument("--elasticdump", type=Path, default=DEFAULT_ELASTICDUMP)
    parser.add_argument(
        "--no-scroll-variant",
        dest="scroll_variant",
        action="store_false",
        help="skip the second Dataport export (the dataset without a key, read by a scroll)",
    )
    parser.add_argument(
        "--no-pit-peer",
        dest="pit_peer",
        action="store_false",
        help="skip the python PIT peer (~15-20 s a run on osmem)",
    )
    parser.add_argument("--runs", type=int, default=1, help="measure this many times on the one loaded index")
    parser.add_argument(
        "--osmem-url",
        help="use this running osmem (loading the index only if it is missing) "
        "instead of starting one: saves the ~5 minutes of loading between invocations",
    )
    parser.add_argument("--strict", action="store_true", help="also exit 1 when the target is missed")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "opensearch_export.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load = note_load()
    if not os.access(args.elasticdump, os.X_OK) and shutil.which(str(args.elasticdump)) is None:
        console.print(
            f"[red]elasticdump not found at {args.elasticdump}[/red]: npm install --prefix bench/out/node elasticdump"
        )
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="opensearch_export-", dir=OUT_DIR))
    try:
        results = measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for result in results:
        print_table(result, args)
    if len(results) > 1:
        print_summary(results)
    write_json(
        args.out,
        "opensearch_export",
        load_average_at_start=load,
        settings={
            "docs": args.docs,
            "fields": len(MAPPING),
            "elasticdump_limit": args.limit,
            "storage": "local",
            "format": "CSV",
            "sample_seconds": SAMPLE_SECONDS,
            "runs": args.runs,
        },
        result=results[0].as_json(),
        runs=[r.as_json() for r in results],
        target_ratio=TARGET_RATIO,
    )
    console.print(f"numbers in {args.out}")
    if not all(r.ok for r in results):
        return 1
    return 1 if args.strict and not all(r.target_met for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
