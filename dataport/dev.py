"""``dataport dev``: the api, one worker and the embedded defaults, as one process tree.

The parent starts a private Redis-compatible server (unless ``DATAPORT_REDIS_URL`` is set), makes
sure the demo dataset exists, then runs ``dataport api`` and ``dataport worker`` as children. Each
child asks the kernel for SIGTERM when the parent dies, so not even a SIGKILL of the parent leaves
a process behind; Ctrl-C or SIGTERM stops the children, then the server.

A port already in use stops it before anything starts (otherwise it would find the other server
listening, and print "running" and a token for it). Once the api answers, it writes where it runs
and its token for the CLI in other directories (dataport/dev_record.py), and removes that on exit.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from api.auth import issue_token
from dataport.dev_record import new_record, remove_record, write_record
from dataport.embedded_redis import EmbeddedRedis
from dataport.logs import message_console
from dataport.net import wait_for_port
from dataport.processes import die_with_parent, stop
from dataport.settings import Settings

console = message_console()


def port_in_use(host: str, port: int) -> bool:
    """Whether something already holds ``host:port``: a bind as uvicorn's (SO_REUSEADDR, so a port
    whose last connection lingers in TIME_WAIT is free) that fails with EADDRINUSE."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # an unknown host: uvicorn says so itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def run_dev(settings: Settings, host: str, port: int) -> int:
    """Run everything until Ctrl-C or SIGTERM; the exit code (1 when something failed to start)."""
    if port_in_use(host, port):
        console.print(f"[red]port {port} is in use; pass --port[/red] (e.g. --port {port + 1}; the host is {host})")
        return 1
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
        from sources.demo import ensure_demo_database

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
        if children[0].poll() is not None:  # something else took the port meanwhile
            console.print(f"[red]The api did not start: port {port} is in use; pass --port.[/red]")
            return 1
        user = os.environ.get("USER") or "dev"
        token = issue_token(settings, user)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        record: Path | None = None
        try:
            record = write_record(new_record(settings, url, token, user))
        except OSError as e:  # the CLI elsewhere then needs --url and a token; the service still runs
            console.print(f"[yellow]Could not tell the CLI where this runs:[/yellow] {e}")
        console.print(
            f"[bold]Dataport[/bold] is running.\n  GraphQL   http://{host}:{port}/graphql"
            f"\n  Browser   http://{host}:{port}/\n  Press Ctrl-C to stop."
        )
        console.print("Dev token (Authorization: Bearer …):", style="dim", soft_wrap=True)
        print(token, flush=True)
        if record is not None:
            console.print(
                f"The CLI finds this server and its token from any directory ({record}).", style="dim", soft_wrap=True
            )
        while not stopping:
            if any(c.poll() is not None for c in children):
                console.print("[red]A Dataport process stopped; shutting down the rest.[/red]")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        remove_record(os.getpid())
        for child in children:  # signal all first, so they shut down side by side
            if child.poll() is None:
                child.terminate()
        for child in children:
            stop(child)
        if redis is not None:
            redis.stop()
