"""The long-lived connections and objects that the api and the workers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.exceptions
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from audit.base import AuditStore, store_from_settings
from audit.outbox import Outbox, outbox_key
from dataport.settings import Settings
from sources.registry import Registry, load_registry
from storage import storage_from_settings
from storage.base import Storage
from tasks.store import TaskStore

if TYPE_CHECKING:
    from tasks.fanout import TaskFanout


# How long a command waits for a free pooled connection before failing (as Redis being down does).
POOL_WAIT_SECONDS = 20


def _blip_retry() -> dict[str, Any]:
    """redis-py tries a command again when its connection was refused or lost, pausing 50 ms,
    doubling up to 1 s, with jitter, ten times (about 5 s at most): a Redis restart or failover
    that short is a pause, not an error. Longer outages reach the caller, which decides (a worker
    keeps polling, ``workers/outages.py``). A write whose reply was lost may run twice: every task
    write is a checked transition or idempotent, so the second one changes nothing."""
    return {
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=10),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings for ``settings.redis_url``, riding out short outages."""
    dsn = RedisSettings.from_dsn(settings.redis_url)
    blip = _blip_retry()
    dsn.retry, dsn.retry_on_error = blip["retry"], blip["retry_on_error"]
    return dsn


@dataclass
class Services:
    settings: Settings
    redis: Redis  # decoded strings, for the task store and pub/sub
    arq: ArqRedis  # bytes, for the queue
    store: TaskStore
    storage: Storage
    registry: Registry
    # The api's one subscription to every task channel (tasks/fanout.py), set by its lifespan.
    fanout: TaskFanout | None = field(default=None, init=False)
    audit: Outbox = field(init=False)  # the audit outbox (docs/audit.md)
    _audit_store: AuditStore | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        enabled = self.settings.audit_store != "none"
        self.audit = Outbox(self.redis, outbox_key(self.settings.queue_name), enabled)

    def audit_store(self) -> AuditStore:
        """The audit store, opened on first use (the api reads it, the drain writes it)."""
        if self._audit_store is None:
            self._audit_store = store_from_settings(self.settings)
        return self._audit_store

    @classmethod
    async def start(cls, settings: Settings, registry: Registry | None = None) -> Services:
        if not settings.redis_url:
            raise RuntimeError("DATAPORT_REDIS_URL is not set (dataport dev starts an embedded Redis for you)")
        # A bounded pool: past ``redis_max_connections`` commands wait for a free connection
        # instead of opening more, so a burst (hundreds of subscriptions starting at once) never
        # multiplies the connections to Redis.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            decode_responses=True,
            max_connections=settings.redis_max_connections,
            timeout=POOL_WAIT_SECONDS,
            **_blip_retry(),
        )
        redis = Redis.from_pool(pool)
        arq = await create_pool(redis_settings(settings))
        return cls(
            settings=settings,
            redis=redis,
            arq=arq,
            store=TaskStore(
                redis,
                settings.retention_seconds,
                audit_outbox=outbox_key(settings.queue_name) if settings.audit_store != "none" else None,
            ),
            storage=storage_from_settings(settings),
            registry=registry or load_registry(settings),
        )

    async def close(self) -> None:
        if self._audit_store is not None:
            await self._audit_store.close()
        await self.redis.aclose()
        await self.arq.aclose()
