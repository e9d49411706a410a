"""arq worker settings: which jobs run, how many at once, how often they are tried.

Built from ``Settings`` rather than a class of constants, so ``dataport worker`` and the tests
configure workers the same way as the api: through ``DATAPORT_*`` variables.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import cron, func
from arq.cron import CronJob

from audit.drain import drain_job, prune_job
from dataport.processes import new_event_loop
from dataport.settings import Settings
from sources import helpers
from sources.registry import Registry
from tasks.exports import EXPORT_JOB
from tasks.imports import IMPORT_JOB
from tasks.notifications import NOTIFY_JOB
from tasks.services import Services, redis_settings
from workers import memory
from workers.attempts import tries_allowed
from workers.cron import expire_tasks, sweep_incomplete
from workers.export import run_export
from workers.fair import FairWorker
from workers.imports import run_import
from workers.notify import notify_task

log = logging.getLogger("dataport.worker")


def worker_settings(settings: Settings, registry: Registry | None = None) -> dict[str, Any]:
    async def startup(ctx: dict[str, Any]) -> None:
        ctx["services"] = await Services.start(settings, registry)
        # Large CSV exports convert in helper processes, forked from a server started now rather
        # than on the first such export; the worker's __main__ imports dataport.cli.
        await asyncio.to_thread(helpers.prepare, ["dataport.cli"])
        log.info(
            "worker ready: %s jobs at once on queue %s, event loop %s",
            settings.worker_concurrency,
            settings.queue_name,
            type(asyncio.get_running_loop()).__module__,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "services" in ctx:
            await ctx["services"].close()

    return {
        # One try more than allowed: the job itself ends a task whose last worker died.
        "functions": [
            func(run_export, name=EXPORT_JOB, max_tries=tries_allowed(settings) + 1),
            func(run_import, name=IMPORT_JOB, max_tries=tries_allowed(settings) + 1),
            # Email and webhook each stop at their own limit; the extra try records a give-up after a crash.
            func(
                notify_task,
                name=NOTIFY_JOB,
                max_tries=max(settings.max_tries, settings.webhook_max_tries) + 1,
                timeout=600,
            ),
        ],
        # Expiry every minute, the sweep every ten; each on one worker only (arq cron jobs are unique).
        "cron_jobs": [
            cron(expire_tasks, second=0, run_at_startup=True),
            cron(sweep_incomplete, minute=set(range(5, 60, 10)), second=30, run_at_startup=True),
            *audit_cron_jobs(settings),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": redis_settings(settings),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_concurrency,
        "job_timeout": settings.job_timeout_seconds,
        "allow_abort_jobs": True,
        # How long a queued job may wait for an idle worker to look: it counts fully against a
        # small export (the whole path of 1,000,000 rows takes ~3 s). Three Redis commands a poll.
        "poll_delay": 0.05,
        "keep_result": 60,
        "handle_signals": True,
        # SIGTERM: stop taking jobs, let running ones finish this long, then hand them back.
        "job_completion_wait": settings.worker_shutdown_grace_seconds,
    }


def audit_cron_jobs(settings: Settings) -> list[CronJob]:
    """The audit outbox drained every ``audit_drain_seconds`` (none on a worker set to 0, or with
    the log off), and retention applied daily (docs/audit.md)."""
    if settings.audit_store == "none" or settings.audit_drain_seconds == 0:
        return []
    return [
        cron(drain_job, second=set(range(0, 60, settings.audit_drain_seconds)), run_at_startup=True, timeout=120),
        cron(prune_job, hour=3, minute=17, second=0, run_at_startup=True, timeout=3600),
    ]


def run_worker(settings: Settings, registry: Registry | None = None) -> None:
    """Run one worker until SIGINT/SIGTERM; a job cut off by the signal is run again elsewhere.
    Redis outages do not end it (``workers/outages.py``)."""
    asyncio.set_event_loop(new_event_loop())  # uvloop's where installed; arq's Worker takes the thread's loop
    # memory.run: a worker grown past worker_restart_rss_bytes execs itself afresh (workers/memory.py).
    memory.run(FairWorker(lease_seconds=settings.worker_lease_seconds, **worker_settings(settings, registry)))
