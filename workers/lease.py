"""Keep a running job's claim alive, so that a dead worker's job is taken up again quickly.

arq marks a started job with an in-progress key that lives for the whole job timeout (hours, for
large exports): a worker killed mid-job would leave its job untouched that long. Instead the job
renews a short lease on that key while it runs; when the worker dies the key lapses within
``worker_lease_seconds`` and the next worker that polls the queue claims the job again (arq's
at-least-once delivery, with the retry counter counting the lost attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from arq.constants import in_progress_key_prefix

from dataport.services import Services


async def renew_lease(services: Services, job_id: str) -> None:
    lease_ms = int(services.settings.worker_lease_seconds * 1000)
    key = in_progress_key_prefix + job_id
    while True:
        await services.arq.pexpire(key, lease_ms)
        await asyncio.sleep(services.settings.worker_lease_seconds / 4)


@contextlib.asynccontextmanager
async def lease_held(services: Services, job_id: str) -> AsyncIterator[None]:
    """The job's lease renewed while the block runs (its outcome recorded included)."""
    renewing = asyncio.create_task(renew_lease(services, job_id))
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
