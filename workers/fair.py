"""The worker (``workers/outages.py``'s, on arq's), made to start jobs in the queue's fair order
(``tasks/queue.py``).

arq's poll reads up to a hundred due jobs and then works through that list, waiting for a free
slot before each: with every slot busy, a job queued meanwhile by another owner, however early its
turn, waits until the whole stale list has started. Here a poll starts only as many jobs as there
are free slots and the next poll reads the queue afresh. It also starts the due jobs that arq
scored itself (notifications, cron, a retry after its pause) before the fairly tagged ones, and
tells the queue each tag it starts, which is the round a newcomer joins.
"""

from __future__ import annotations

from tasks import queue
from workers.outages import Worker


class FairWorker(Worker):
    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if not job_ids:
            return
        first = await queue.due_first(self.pool, self.queue_name, self.queue_read_limit)
        ordered = list(dict.fromkeys([*first, *job_ids]))
        for job_id in ordered:
            if self.job_counter >= self.max_jobs:
                return  # never wait for a slot on this list: the next poll reads the queue afresh
            name = job_id.decode()
            before = self.tasks.get(name)
            await super().start_jobs([job_id])
            running = self.tasks.get(name)
            if running is not None and running is not before:
                await queue.started(self.pool, self.queue_name, name)
