"""The hash chain: every record holds the SHA-256 of the one before it.

One chain per store, not one per task or per outbox shard: there is one drain at a time (a Redis
lock, ``drain.py``) and one outbox per queue, so a single chain costs nothing in throughput, and it
is what makes a deleted or reordered record anywhere in the store show up. Per-task chains would
let a whole task's records vanish without a trace.

``hash = sha256(prev_hash + "\\n" + canonical(record))``, the canonical form being the record's
body (id, at, action, actor, task_id, dataset, detail) as JSON with sorted keys (orjson). The first
record's ``prev_hash`` is ``GENESIS``; after retention pruned the oldest records, the store keeps an
*anchor*: the hash of the last record it pruned, which the oldest kept record must point to.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import orjson

from audit.records import AuditRecord, Pending

GENESIS = "0" * 64


def canonical(record: Pending) -> bytes:
    return orjson.dumps(record.body(), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def link_hash(prev_hash: str, record: Pending) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(record)).hexdigest()


def seal(seq: int, prev_hash: str, record: Pending) -> AuditRecord:
    """``record`` as the chain's next link, at position ``seq`` after a record hashed ``prev_hash``."""
    return AuditRecord(seq, record, prev_hash, link_hash(prev_hash, record))


def seal_all(start_seq: int, prev_hash: str, records: Iterable[Pending]) -> list[AuditRecord]:
    sealed = []
    for offset, record in enumerate(records):
        link = seal(start_seq + offset, prev_hash, record)
        sealed.append(link)
        prev_hash = link.hash
    return sealed


@dataclass(frozen=True)
class Break:
    """The first link that does not hold, and what is wrong with it."""

    seq: int
    id: str
    kind: str  # changed | deleted | reordered | duplicate
    message: str
    prev_hash: str = ""


@dataclass(frozen=True)
class Report:
    records: int
    head: str  # the last record's hash (the anchor when there are none)
    broken: Break | None


async def verify(records: AsyncIterator[AuditRecord], anchor: str) -> Report:
    """Walk the chain in order. A record whose content no longer gives its hash was changed; one
    whose ``prev_hash`` is not the hash of the record before it follows a deleted record, or
    records that were moved (``reordered`` when the missing link turns up elsewhere in the store,
    which the caller learns from ``Break.kind`` only after a second walk: see ``classify``)."""
    expected, count = anchor, 0
    seen: set[str] = set()
    async for record in records:
        count += 1
        broken = _link_break(record, expected, seen)
        if broken is not None:
            return Report(count, expected, broken)
        seen.add(record.id)
        expected = record.hash
    return Report(count, expected, None)


def _link_break(record: AuditRecord, expected: str, seen: set[str]) -> Break | None:
    """What is wrong with ``record`` as the link after one hashed ``expected`` (ids ``seen`` before it)."""
    if record.id in seen:
        return Break(record.seq, record.id, "duplicate", f"record {record.id} appears twice")
    if link_hash(record.prev_hash, record.pending) != record.hash:
        return Break(
            record.seq,
            record.id,
            "changed",
            f"record {record.id} (#{record.seq}, {record.action} at {record.at}) was changed: "
            "its content no longer gives its hash",
        )
    if record.prev_hash != expected:
        return Break(
            record.seq,
            record.id,
            "deleted",
            f"the link before record {record.id} (#{record.seq}, {record.action} at {record.at}) is broken: "
            f"its prev_hash {record.prev_hash[:12]}… is not the hash of the record before it "
            f"({expected[:12]}…)",
            record.prev_hash,
        )
    return None


async def classify(broken: Break, records: AsyncIterator[AuditRecord]) -> Break:
    """A second walk for a broken link: when the record it should follow is still in the store
    (elsewhere), records were reordered; when it is nowhere, it was deleted."""
    if broken.kind != "deleted":
        return broken
    async for record in records:
        if record.hash == broken.prev_hash:
            message = broken.message.replace("is broken", "is broken (reordered)", 1)
            return Break(
                broken.seq,
                broken.id,
                "reordered",
                f"{message}; the record it followed, {record.id}, is at #{record.seq}",
                broken.prev_hash,
            )
    message = f"{broken.message}; no record in the store has that hash (deleted)"
    return Break(broken.seq, broken.id, "deleted", message, broken.prev_hash)
