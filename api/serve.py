"""Serving the api with uvicorn: one process, or ``workers`` processes on one port.

With one process the app is built here and handed to uvicorn, as before. With several, uvicorn
binds the port once in a supervising process and spawns ``workers`` children that accept on the
same socket (the kernel spreads connections between them); each child builds its own app from
``worker_app``, an import-string factory, because an app object cannot cross into a spawned
process. uvicorn's supervisor restarts a child that dies and stops them all on SIGTERM/SIGINT.

Nothing that must be shared is kept in a process: tasks, progress, rate limits, the active-task
quota, subscription and stream slots and the task metrics live in Redis (docs/operations.md). What
each process keeps for itself is a cache that is right in any process (verified tokens, parsed
documents) or a bound on its own work (admission control, ``api/admission.py``).
"""

from __future__ import annotations

import gc
import os
from typing import Any

from fastapi import FastAPI

from dataport.settings import Settings, get_settings
from sources.registry import Registry


# uvicorn's options for the api, whatever the number of processes. log_config=None: uvicorn's own
# and access lines go through the handler dataport/logs.py set up. log_level=None: uvicorn leaves its
# loggers' levels alone, so they follow DATAPORT_LOG_LEVEL like every other logger (uvicorn's "info"
# set them to INFO, and at WARNING the api still wrote an access line per request). ws_max_size: a
# WebSocket frame over the request limit is refused by the protocol (1009) before it is read whole.
# ws_per_message_deflate off: progress messages are a few hundred bytes, and compressing each one for
# each subscriber was a third of the api's CPU per push and ~40 KiB of zlib state per socket
# (bench/results/2026-12-06-subscribers.md).
def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "log_level": None,
        "log_config": None,
        "ws": "websockets-sansio",
        "ws_max_size": settings.max_request_bytes,
        "ws_per_message_deflate": False,
    }


def worker_app() -> FastAPI:
    """The app of one api process started by uvicorn's supervisor (``workers`` > 1): logging as
    ``dataport api`` sets it up, settings from the environment, the datasets loaded (the parent
    checked the file before spawning, so a mistake has been reported already)."""
    from api.app import create_app
    from dataport.logs import configure_logging
    from sources.registry import load_registry

    settings = get_settings()
    configure_logging(settings.log_format, os.environ.get("DATAPORT_LOG_LEVEL", "INFO"))
    return settled(create_app(settings, load_registry(settings)))


# The collector's thresholds for the api: young collections every 20,000 net allocations instead of
# 700, and full ones after 50 x 100 of them (still also bounded by CPython's own rule: only when a
# quarter of the old objects are new). A push to thousands of subscribers allocates a burst of
# short-lived objects per subscriber; at 700 they were caught alive mid-burst, promoted, and soon
# set off full collections that walked every subscription's objects: 61 % of the api's CPU with
# 5,000 idle-then-pushed subscribers, 10 % with these (bench/results/2026-12-06-subscribers.md).
GC_THRESHOLDS = (20_000, 50, 100)


def settled(app: FastAPI) -> FastAPI:
    """The app, with every object made so far (modules, the schema, the datasets: ~100,000) moved
    out of the collector's reach (``gc.freeze``). Python's full collections walk every tracked
    object; with these among them each took 50-100 ms, a pause every request in flight waited out
    (the p99 of ``bench/api_load.py``); without them, 1-2 ms. They live as long as the process.
    Then the collector runs less often (``GC_THRESHOLDS``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return app


def serve(settings: Settings, registry: Registry, host: str, port: int, workers: int) -> None:
    """Run the api until SIGTERM/SIGINT: in this process (``workers`` = 1), or as ``workers``
    processes sharing one listening socket."""
    import uvicorn

    if workers <= 1:
        from api.app import create_app

        uvicorn.run(settled(create_app(settings, registry)), host=host, port=port, **uvicorn_options(settings))
        return
    uvicorn.run(
        "api.serve:worker_app", factory=True, workers=workers, host=host, port=port, **uvicorn_options(settings)
    )
