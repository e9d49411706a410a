"""A worker killed in the instant between arq starting a job and the job's first lease renewal.

arq sets a started job's in-progress key for the whole job timeout (six hours by default): a
worker killed before the job shortened it left the task stuck that long. The key now lives one
lease from the start, renewed by the worker's poll loop.
"""

from __future__ import annotations

import time

import redis

from tests.fixtures.stack import DEMO_ROWS

LEASE_MS = 2_000  # DATAPORT_WORKER_LEASE_SECONDS of the test stacks


def test_a_worker_killed_as_it_starts_a_job_hands_it_on_within_the_lease(idle_queue):
    api = idle_queue.api()
    client = redis.Redis.from_url(idle_queue.env["DATAPORT_REDIS_URL"])
    task = api.export(dataset="samples", format="NDJSON", columns=["sample_id", "project"])
    key = f"arq:in-progress:export:{task['id']}:{task['run']}"

    worker = idle_queue.start_worker()
    deadline = time.monotonic() + 60
    while (ttl := client.pttl(key)) < 0:  # -2: no key yet
        assert time.monotonic() < deadline, "the worker never started the job"
        time.sleep(0.001)
    idle_queue.kill(worker)
    assert ttl <= LEASE_MS, f"the in-progress key was set for {ttl} ms, not one lease"

    killed_at = time.monotonic()
    idle_queue.start_worker()
    done = api.wait(task["id"], timeout=60)
    assert done["status"] == "SUCCEEDED" and done["rowCount"] == DEMO_ROWS, done
    started = [e for e in done["events"] if e["status"] == "PROCESSING"]
    assert started, done["events"]
    # claimed again once the lease lapsed: well before arq's six-hour in-progress timeout
    assert time.monotonic() - killed_at < 30
    client.close()
