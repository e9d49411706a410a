"""A task as the store's ``request`` takes it, with the fewest fields: for tests of the store
itself (counts, quotas, statuses), where nothing runs the task."""

from __future__ import annotations

from typing import Any

from tasks.models import stamp


def pending_task(tid: str, owner: str, kind: str = "export") -> dict[str, Any]:
    """A PENDING CSV task of dataset ``samples``, never tried."""
    return {
        "id": tid,
        "kind": kind,
        "owner": owner,
        "dataset": "samples",
        "format": "CSV",
        "request": "{}",
        "status": "PENDING",
        "created_at": stamp(),
        "attempts": 0,
    }
