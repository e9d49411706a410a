"""The file an import reads: its upload as it was when the import started, and of the declared size.

An upload target stays valid for its whole window, so an upload can land after ``startImport``:
a PUT that began while the import waited, a second browser tab. Reading the upload key itself,
the worker could then read a file other than the one whose size was checked, or one that changes
under it. So starting takes a sealed copy (``Storage.seal``: a hard link, or a server-side copy)
under a key of its own, checks that copy, and points the task at it in the same transition that
moves the task to PENDING; the upload key is removed afterwards.
"""

from __future__ import annotations

import contextlib
import secrets

from dataport import errors
from dataport.errors import UserErrors
from storage.base import Storage, StorageError, describe_bytes
from tasks.models import Task


def sealed_key(task: Task) -> str:
    """Beside the upload (``imports/{owner}/{task_id}/…``), in a folder no upload can name."""
    assert task.object_key
    folder, _, name = task.object_key.rpartition("/")
    return f"{folder}/sealed-{secrets.token_hex(8)}/{name}"


async def seal(storage: Storage, task: Task) -> tuple[str, int] | None:
    """The sealed copy's key and size; None when nothing was uploaded."""
    if not task.object_key:
        return None
    key = sealed_key(task)
    size = await storage.seal(task.object_key, key)
    return None if size is None else (key, size)


def size_problem(size: int, limit: int, declared: int | None) -> UserErrors | None:
    """Why a sealed upload of ``size`` bytes cannot be imported, if it cannot."""
    if size > limit:
        return UserErrors.one(
            f"The uploaded file is {size:,} bytes; at most {limit:,} bytes can be imported.",
            errors.FILE_TOO_LARGE,
            "id",
        )
    if declared is not None and size != declared:
        return UserErrors.one(
            f"The uploaded file is {describe_bytes(size)}, not the {describe_bytes(declared)} the import declared "
            f"(fileSize); upload the whole file again, then start the import.",
            errors.FILE_SIZE_MISMATCH,
            "id",
        )
    return None


async def discard(storage: Storage, key: str) -> None:
    """Remove a sealed copy or an upload that is no longer read (best effort: the retention job
    removes what is left)."""
    with contextlib.suppress(StorageError):
        await storage.delete(key)
