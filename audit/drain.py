"""The drain: outbox → store, in batches; and retention. Both run as arq cron jobs in the workers.

At least once: a batch is read from the outbox (XRANGE, oldest first), written to the store, and
only then deleted from the outbox (XDEL). A worker killed anywhere in between leaves the batch in
the outbox, and the next drain writes it again; the store skips ids it has (``AuditStore.append``),
so a record delivered twice is stored once. A record appended to the outbox is therefore stored
exactly once, as long as Redis keeps it (Redis persistence: docs/audit.md).

One drain at a time per outbox (a Redis lock with a lease), so the chain follows the outbox's order;
the stores' own locks or conditional writes keep the chain whole even if two drains did overlap.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import Any

from audit import records
from audit.base import AuditStore
from audit.outbox import Outbox
from audit.records import Pending

log = logging.getLogger("dataport.audit")

LOCK_SECONDS = 60

# Compare-and-delete / compare-and-extend of the drain's lease: only its holder may.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_EXTEND = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


async def drain(outbox: Outbox, store: AuditStore, batch: int = 500, deadline_seconds: float = 50.0) -> int:
    """Move records from the outbox to the store until it is empty (or ``deadline_seconds`` have
    passed); the number of records read. Returns 0 at once when another drain holds the lease."""
    redis, lock = outbox.redis, f"{outbox.key}:drain"
    token = uuid.uuid4().hex
    if not await redis.set(lock, token, nx=True, ex=LOCK_SECONDS):
        return 0
    moved, stored = 0, 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < deadline_seconds:
            entries = await outbox.entries(batch)
            if not entries:
                break
            pending: list[Pending] = []
            for entry_id, fields in entries:
                try:
                    pending.append(records.from_outbox(fields))
                except ValueError as e:  # kept as evidence rather than dropped
                    log.error("audit outbox entry %s is not a record (%s); stored as audit.malformed", entry_id, e)
                    pending.append(records.pending("audit.malformed", entry=entry_id, fields=dict(fields)))
            stored += await store.append(pending)
            await outbox.remove([entry_id for entry_id, _ in entries])
            moved += len(entries)
            await redis.eval(_EXTEND, 1, lock, token, str(LOCK_SECONDS * 1000))  # type: ignore[misc]
    finally:
        await redis.eval(_RELEASE, 1, lock, token)  # type: ignore[misc]
    if moved:
        log.info("audit: drained %d records (%d new) to the %s store", moved, stored, store.name)
    return moved


async def prune(outbox: Outbox, store: AuditStore, retention_days: float) -> int:
    """Remove records older than the retention period, and record that it happened."""
    cutoff = time.time() - retention_days * 86400
    removed = await store.prune(records.time_text(cutoff))
    if removed:
        before = dt.datetime.fromtimestamp(cutoff, dt.UTC).isoformat(timespec="seconds")
        log.info("audit: pruned %d records older than %s", removed, before)
        await outbox.record(records.AUDIT_PRUNED, removed=removed, before=before, retention_days=retention_days)
    return removed


async def drain_job(ctx: dict[str, Any]) -> int:
    """The arq cron job: drain this worker's queue's outbox."""
    services = ctx["services"]
    return await drain(services.audit, services.audit_store(), services.settings.audit_drain_batch)


async def prune_job(ctx: dict[str, Any]) -> int:
    """The arq cron job: apply ``DATAPORT_AUDIT_RETENTION_DAYS``."""
    services = ctx["services"]
    return await prune(services.audit, services.audit_store(), services.settings.audit_retention_days)
