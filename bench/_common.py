"""Helpers shared by the benchmark scripts in ``bench/`` (not a benchmark itself).

- memory: ``PeakRss`` samples a process tree's RSS every 10 ms; ``high_water_mark`` is the kernel's
  own peak (``VmHWM``) as a check on it;
- processes: ``Stack`` runs ``dataport api`` + ``dataport worker`` as subprocesses with the env of
  ``stack_env`` (optionally a datasets file); ``run_peer`` runs a peer command, timed and sampled;
- one export through Dataport: ``export_and_follow`` (``requestExport`` then the ``exportProgress``
  subscription until a final status), ``download`` (streamed, SHA-256 on the way);
- reports: ``write_json`` (one document per run, with the machine and the commit), ``console``.

Every bench imports this as ``_common`` (the scripts run as ``python bench/NAME.py``, so ``bench/``
is on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import platform
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import IO, Any

import httpx
import psutil
from rich.console import Console

from dataport.client import DataportClient
from dataport.net import wait_for_port
from dataport.processes import stop

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
SAMPLE_SECONDS = 0.01
MiB = 1024 * 1024
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
# After the subscription: the signed link, the checksum and when the worker started and finished.
FINISHED_TASK = """query($id: ID!) { exportTask(id: $id) {
  id status rowCount fileSize checksumSha256 downloadUrl createdAt startedAt finishedAt error { code message } } }"""

console = Console(width=None if sys.stdout.isatty() else 132)  # a pipe or file gets the whole table

# --- memory ----------------------------------------------------------------------------------


def rss(process: psutil.Process, children: list[psutil.Process]) -> int:
    """Resident bytes of ``process`` and ``children`` (those that still run)."""
    total = process.memory_info().rss
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its children, now."""
    process = psutil.Process(pid)
    return rss(process, process.children(recursive=True))


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its processes, running or ended: each live
    process's own and its ended children's (helpers are children of the worker's fork server).
    Take it around a run, after the run's helpers have ended."""
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def wait_for_helpers(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid``'s grandchildren (helper processes under a fork server) have ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(pid).children()
            if not any(c.children() for c in children):
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)


class PeakRss(threading.Thread):
    """Samples a process tree's RSS every ``interval`` seconds until ``stop()`` or the process ends."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        children: list[psutil.Process] = []
        next_scan = 0.0
        try:
            while not self._done.is_set():
                now = time.monotonic()
                if now >= next_scan:  # listing children scans /proc: twice a second is enough
                    children = self.process.children(recursive=True)
                    next_scan = now + 0.5
                self.peak = max(self.peak, rss(self.process, children))
                self.samples += 1
                self._done.wait(self.interval)
        except psutil.NoSuchProcess:  # also a zombie: the process is done
            pass

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def high_water_mark(pid: int) -> int | None:
    """The kernel's own peak RSS of ``pid`` (Linux ``VmHWM``): a check on the sampled peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- processes -------------------------------------------------------------------------------


@dataclass
class Stack:
    """``dataport api`` + ``dataport worker`` as subprocesses; their logs under ``logs``."""

    env: dict[str, str]
    port: int
    logs: Path
    api: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, *args: str, log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "dataport.cli", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def start(self, timeout: float = 60) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api = self._spawn("api", "--port", str(self.port), log=self.logs / "api.log")
        self.worker = self._spawn("worker", log=self.logs / "worker.log")
        deadline = time.monotonic() + timeout
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout)
        except TimeoutError:
            raise RuntimeError(f"the api did not start; see {self.logs / 'api.log'}") from None
        while "worker ready" not in (self.logs / "worker.log").read_text(errors="replace"):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {self.logs / 'worker.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in (self.worker, self.api):
            stop(process)


def stack_env(
    data_dir: Path,
    files_dir: Path,
    redis_url: str,
    secret: str,
    port: int,
    *,
    storage: str = "local",
    datasets: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of one stack: no ``DATAPORT_*`` of ours leaks in; ``extra`` as
    ``max_export_rows="1000"`` becomes ``DATAPORT_MAX_EXPORT_ROWS=1000``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")},
        "DATAPORT_DATA_DIR": str(data_dir),
        "DATAPORT_FILES_DIR": str(files_dir),
        "DATAPORT_REDIS_URL": redis_url,
        "DATAPORT_JWT_SECRET": secret,
        "DATAPORT_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DATAPORT_QUEUE_NAME": f"dataport:bench:{secrets.token_hex(4)}",
        "DATAPORT_STORAGE": storage,
    }
    if datasets is not None:
        env["DATAPORT_DATASETS"] = str(datasets)
    env.update({f"DATAPORT_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def run_peer(
    command: Sequence[str], stdout: IO[bytes] | int | None = None, env: dict[str, str] | None = None
) -> tuple[float, int]:
    """Run a peer program to its end, its RSS (with children) sampled like the worker's:
    (seconds, peak RSS). Raises if it exits non-zero."""
    started = time.perf_counter()
    process = subprocess.Popen(list(command), stdout=stdout, stdin=subprocess.DEVNULL, env=env)
    try:
        sampler = PeakRss(process.pid)
        sampler.start()
        code = process.wait()
        seconds = time.perf_counter() - started
        peak = sampler.stop()
    finally:
        stop(process)
    if code != 0:
        raise RuntimeError(f"the peer {command[0]} exited with {code}")
    return seconds, peak


# --- one export through Dataport -------------------------------------------------------------


async def export_and_follow(client: DataportClient, export_input: dict[str, Any]) -> tuple[dict, float]:
    """requestExport, then the subscription until a final status: (final task, seconds)."""
    started = time.perf_counter()
    task = await client.request_export(export_input)
    seconds = None
    async for snapshot in client.follow(task["id"]):
        task = snapshot
        if task["status"] in FINAL and seconds is None:
            seconds = time.perf_counter() - started
    if seconds is None:
        raise RuntimeError(f"the subscription ended before a final status: {task}")
    task = (await client.execute(FINISHED_TASK, {"id": task["id"]}))["exportTask"]
    return task, seconds


class PeerComparison:
    """For a bench result with ``seconds``, ``peers`` (dicts with ``name`` and ``seconds``), ``error``
    and ``checks``: its ratio to each peer, and whether every check passed."""

    def ratio_to(self, peer: dict) -> float | None:
        return self.seconds / peer["seconds"] if self.seconds and peer.get("seconds") else None

    @property
    def ratio(self) -> float | None:
        return self.ratio_to(self.peers[0]) if self.peers else None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())


@dataclass
class Followed:
    """One export through the whole path, with the worker's memory sampled meanwhile."""

    task: dict
    seconds: float
    worker_peak_rss: int
    rss_samples: int

    @property
    def queued_seconds(self) -> float | None:  # createdAt → startedAt: request handling and queue pick-up
        return seconds_between(self.task.get("createdAt"), self.task.get("startedAt"))

    @property
    def worker_seconds(self) -> float | None:  # startedAt → finishedAt: the job itself
        return seconds_between(self.task.get("startedAt"), self.task.get("finishedAt"))


def export_sampled(stack: Stack, client: DataportClient, export_input: dict[str, Any]) -> Followed:
    """``export_and_follow`` while a thread samples the worker's RSS every 10 ms."""
    assert stack.worker is not None
    sampler = PeakRss(stack.worker.pid)
    sampler.start()
    try:
        task, seconds = asyncio.run(export_and_follow(client, export_input))
    finally:
        peak = sampler.stop()
    return Followed(task, seconds, peak, sampler.samples)


def download(url: str, path: Path) -> str:
    """Stream ``url`` into ``path``; its SHA-256."""
    sha = hashlib.sha256()
    with httpx.stream("GET", url, timeout=None) as response, path.open("wb") as f:
        response.raise_for_status()
        for chunk in response.iter_bytes(1024 * 1024):
            sha.update(chunk)
            f.write(chunk)
    return sha.hexdigest()


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
    return sha.hexdigest()


def csv_records(path: Path) -> tuple[list[str], int]:
    """The header and the number of data records of a CSV file (``csv.reader``: cells hold newlines)."""
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        return header, sum(1 for _ in reader)


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def warm(path: Path) -> None:
    """Read a file once, so that no reader below finds it cold."""
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


def median_of(values: Sequence[float]) -> float:
    return median(values) if values else float("nan")


# --- report ----------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def working_tree() -> dict[str, Any]:
    """What code was measured: the commit, and the files outside ``bench/`` that differ from it (with a
    hash of that diff), since a shared working tree may hold someone's uncommitted edits."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout

    try:
        modified = [
            line[3:]
            for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
            if not line[3:].startswith("bench/")
        ]
        diff = git("diff", "HEAD", "--", ".", ":(exclude)bench") if modified else ""
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {
        "commit": git_commit(),
        "modified_outside_bench": modified,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_at_end": os.getloadavg(),
    }


def note_load() -> tuple[float, float, float]:
    """Say so when other work keeps the machine busy (every timing below is then noisier) or when the
    code measured holds uncommitted changes outside ``bench/``."""
    load = os.getloadavg()
    if load[0] > 0.5 * (os.cpu_count() or 1):
        console.print(
            f"[yellow]the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} CPUs): "
            "timings will be noisier; ratios are measured in the same run[/yellow]"
        )
    modified = working_tree().get("modified_outside_bench")
    if modified:
        console.print(
            f"[yellow]measuring uncommitted changes to {', '.join(modified)} "
            "(listed in the JSON with a hash of the diff)[/yellow]"
        )
    return load


def write_json(path: Path, bench: str, **body: Any) -> None:
    """One JSON document for the run: which bench, when, at which commit, on what machine, then ``body``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "working_tree": working_tree(),
        "machine": machine(),
        **body,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def mib(n: int | None) -> str:
    return f"{n / MiB:.1f}" if n else ""
