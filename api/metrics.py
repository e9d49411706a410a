"""``GET /metrics``: Prometheus metrics of the whole service, read from Redis at scrape time.

The api and the workers are separate processes, so whatever a worker does (a task finished, rows
written) is counted where every process can see it: in Redis, by the task store's Lua script, in
the same atomic step as the status change itself (``tasks/scripts.lua``). A scrape reads those
statistics and the arq queue in two round trips and exposes them through a prometheus_client
collector, beside the process's own metrics (``dataport_stream_reads_in_progress``, the Python
process collectors) from the default registry.

Task metrics are the same on every api process (one Redis): aggregate them with ``max``, not
``sum``, when Prometheus scrapes several.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.models import TaskKind
from tasks.services import Services
from tasks.store import DURATION_STATUSES, STATS_INDEXED_KEY, STATS_PREFIX, Stats, TaskStore
from workers.heartbeat import live_workers

log = logging.getLogger("dataport.metrics")

# arq job ids are "{function}:{task id}:{run}" (tasks/queue.py, tasks/notifications.py) and
# "cron:{name}:{time}" for cron jobs; the first part labels the queue metrics.
JOB_FUNCTIONS = ("export", "import", "notify", "cron")
_INDEXING_LOCK = STATS_PREFIX + "indexing"


@dataclass
class QueueStats:
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_FUNCTIONS, 0))
    running: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_FUNCTIONS, 0))


async def read_queue(arq: ArqRedis, queue_name: str) -> QueueStats:
    """Jobs in the queue, waiting or running. arq keeps a running job in the queue until it ends
    and marks it with ``arq:in-progress:{job id}`` meanwhile (a lease its worker renews); a job
    deferred for a retry waits in the queue without one."""
    job_ids = [j.decode() for j in await arq.zrange(queue_name, 0, -1)]
    stats = QueueStats()
    if not job_ids:
        return stats
    pipe = arq.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.exists(in_progress_key_prefix + job_id)
    for job_id, running in zip(job_ids, await pipe.execute(), strict=True):
        function = job_id.split(":", 1)[0]
        function = function if function in JOB_FUNCTIONS else "other"
        counts = stats.running if running else stats.waiting
        counts[function] = counts.get(function, 0) + 1
    stats.running.setdefault("other", 0)
    stats.waiting.setdefault("other", 0)
    return stats


class ServiceMetrics(Collector):
    """The task store's statistics and the queue, as of the last ``refresh``."""

    def __init__(self) -> None:
        self.stats: Stats | None = None
        self.queue: QueueStats | None = None
        self.workers: int | None = None
        self._indexing: asyncio.Task | None = None
        self._indexed = False

    async def refresh(self, services: Services) -> None:
        try:
            self.stats = await services.store.read_stats()
            self.queue = await read_queue(services.arq, services.settings.queue_name)
            self.workers = await live_workers(services.redis, services.settings.queue_name)
        except Exception as e:  # a scrape still answers, with dataport_task_store_up 0
            log.warning("metrics: cannot read the task store: %s: %s", type(e).__name__, e)
            self.stats = self.queue = self.workers = None
            return
        await self._index_once(services.store)

    async def _index_once(self, store: TaskStore) -> None:
        """Tasks written before the statistics existed are indexed once, in the background, by
        the first api that is scraped (a lock keeps the others from repeating it)."""
        if self._indexed or self._indexing is not None:
            return
        if await store.redis.exists(STATS_INDEXED_KEY):
            self._indexed = True
            return
        if not await store.redis.set(_INDEXING_LOCK, "1", nx=True, ex=600):
            return

        async def index() -> None:
            try:
                count = await store.index_stats()
                log.info("metrics: indexed %d existing tasks into the statistics", count)
            except Exception:
                log.exception("metrics: indexing existing tasks failed; the next scrape tries again")
                self._indexing = None
            finally:
                await store.redis.delete(_INDEXING_LOCK)

        self._indexing = asyncio.create_task(index())

    def collect(self) -> Iterator[Metric]:
        up = self.stats is not None and self.queue is not None
        yield GaugeMetricFamily(
            "dataport_task_store_up",
            "1 when the last scrape could read the task statistics and the queue from Redis, else 0",
            value=1 if up else 0,
        )
        if not up:
            return
        stats, queue = self.stats, self.queue
        yield GaugeMetricFamily(
            "dataport_workers", "Workers on this queue whose heartbeat is fresh", value=self.workers or 0
        )

        tasks = GaugeMetricFamily(
            "dataport_tasks", "Tasks now in each status (EXPIRED: until they are deleted)", labels=["kind", "status"]
        )
        for (kind, status), n in stats.tasks.items():
            tasks.add_metric([kind.value, status.value], n)
        yield tasks

        durations = HistogramMetricFamily(
            "dataport_task_duration_seconds",
            "Seconds from startedAt to finishedAt of tasks that ended",
            labels=["kind", "status"],
        )
        for kind in TaskKind:
            for status in DURATION_STATUSES:
                h = stats.durations[kind, status]
                durations.add_metric([kind.value, status.value], h.buckets, h.sum)
        yield durations

        rows = CounterMetricFamily(
            "dataport_rows",
            "Rows of succeeded tasks: exported, or written by imports (dry runs write none)",
            labels=["kind"],
        )
        size = CounterMetricFamily(
            "dataport_bytes",
            "Bytes of succeeded tasks: files written by exports, files read by imports",
            labels=["kind"],
        )
        for kind in TaskKind:
            rows.add_metric([kind.value], stats.rows[kind])
            size.add_metric([kind.value], stats.bytes[kind])
        yield rows
        yield size

        depth = GaugeMetricFamily(
            "dataport_queue_depth",
            "Jobs in the queue waiting for a worker (deferred retries included), by job function",
            labels=["function"],
        )
        running = GaugeMetricFamily(
            "dataport_jobs_in_progress",
            "Jobs of the queue running on a worker now, by job function",
            labels=["function"],
        )
        for function, n in sorted(queue.waiting.items()):
            depth.add_metric([function], n)
        for function, n in sorted(queue.running.items()):
            running.add_metric([function], n)
        yield depth
        yield running


async def exposition(services: Services, metrics: ServiceMetrics) -> bytes:
    """The text exposition: this process's metrics, then the service's."""
    await metrics.refresh(services)
    return generate_latest(REGISTRY) + generate_latest(metrics)
