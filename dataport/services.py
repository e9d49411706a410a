"""The long-lived connections and objects that the api and the workers share."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

from dataport.settings import Settings
from sources.registry import Registry, load_registry
from storage import storage_from_settings
from storage.base import Storage
from tasks.store import TaskStore


@dataclass
class Services:
    settings: Settings
    redis: Redis  # decoded strings, for the task store and pub/sub
    arq: ArqRedis  # bytes, for the queue
    store: TaskStore
    storage: Storage
    registry: Registry

    @classmethod
    async def start(cls, settings: Settings, registry: Registry | None = None) -> Services:
        if not settings.redis_url:
            raise RuntimeError("DATAPORT_REDIS_URL is not set (dataport dev starts an embedded Redis for you)")
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        arq = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        return cls(
            settings=settings,
            redis=redis,
            arq=arq,
            store=TaskStore(redis, settings.retention_seconds),
            storage=storage_from_settings(settings),
            registry=registry or load_registry(settings),
        )

    async def close(self) -> None:
        await self.redis.aclose()
        await self.arq.aclose()
