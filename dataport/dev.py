"""``dataport dev``: the api, one worker and the embedded defaults, as one process tree.

The parent starts a private Redis-compatible server (unless ``DATAPORT_REDIS_URL`` is set), makes
sure the demo dataset exists, then runs ``dataport api`` and ``dataport worker`` as children. Each
child asks the kernel for SIGTERM when the parent dies, so not even a SIGKILL of the parent leaves
a process behind; Ctrl-C or SIGTERM stops the children, then the server.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

from rich.console import Console

from api.auth import issue_token
from dataport.embedded_redis import EmbeddedRedis
from dataport.net import wait_for_port
from dataport.processes import die_with_parent, stop
from dataport.settings import Settings

console = Console(stderr=True)


def run_dev(settings: Settings, host: str, port: int) -> int:
    redis = None
    if not settings.redis_url:
        try:
            redis = EmbeddedRedis(settings.data_dir).start()
        except RuntimeError as e:
            console.print(f"[red]Could not start the embedded Redis.[/red] {e}")
            return 1
    env = {
        **os.environ,
        "DATAPORT_DEV_MODE": "true",
        "DATAPORT_DATA_DIR": str(settings.data_dir),
        "DATAPORT_REDIS_URL": settings.redis_url or redis.url,
        "DATAPORT_PUBLIC_URL": os.environ.get("DATAPORT_PUBLIC_URL", f"http://{host}:{port}"),
    }
    if settings.datasets is None:
        from dataport.demo_data import ensure_demo_database

        with console.status("Preparing the demo dataset (first start only)…"):
            ensure_demo_database(settings.data_dir, settings.demo_rows)

    spawn = functools.partial(subprocess.Popen, env=env, preexec_fn=die_with_parent())
    me = [sys.executable, "-m", "dataport.cli"]
    children = [
        spawn([*me, "api", "--host", host, "--port", str(port)]),
        spawn([*me, "worker"]),
    ]

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            wait_for_port(host, port, timeout=30)
        except TimeoutError:
            console.print("[red]The api did not start; see the messages above.[/red]")
            return 1
        token = issue_token(settings, os.environ.get("USER") or "dev")
        console.print(
            f"[bold]Dataport[/bold] is running.\n  GraphQL   http://{host}:{port}/graphql"
            f"\n  Browser   http://{host}:{port}/\n  Press Ctrl-C to stop."
        )
        console.print("Dev token (Authorization: Bearer …):", style="dim")
        print(token, flush=True)
        while not stopping:
            if any(c.poll() is not None for c in children):
                console.print("[red]A Dataport process stopped; shutting down the rest.[/red]")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        for child in children:  # signal all first, so they shut down side by side
            if child.poll() is None:
                child.terminate()
        for child in children:
            stop(child)
        if redis is not None:
            redis.stop()
