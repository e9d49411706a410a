"""The audit log in a DynamoDB table, through boto3 (the store the export specification names).

One table, key ``pk`` (string) + ``sk`` (number):

- ``pk = "chain"``, ``sk = seq``: the records, in chain order (one partition: the chain is one
  sequence; at audit volumes, far below a partition's 1,000 writes a second);
- ``pk = "id#<record id>"``, ``sk = 0``: a marker naming the ``seq`` a record was written at;
- ``pk = "anchor"``, ``sk = 0``: the last pruned record's ``seq`` and hash.

No transactions (not every DynamoDB-compatible server has them, and none are needed): two
conditional puts per record. The marker first (``attribute_not_exists``): a marker already there
means the record was delivered before, and it is skipped if the chain holds it at the marker's
``seq``; if not, the writer before died between its two puts, and this one finishes the job. Then
the record at ``head + 1``, also ``attribute_not_exists``: if another writer took that place, this
one reads the new head and tries the next. So no two records ever share a link, whatever runs
concurrently, and a record is stored once.

Enable point-in-time recovery on the table (``DATAPORT_AUDIT_CREATE_TABLE`` asks for it when it
creates one); DynamoDB's TTL is not used for retention, as it deletes out of order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import boto3
from botocore.exceptions import ClientError

from audit.base import Filters, Page
from audit.chain import GENESIS, seal
from audit.records import Actor, AuditRecord, Pending, dumps, loads

CHAIN = "chain"
ANCHOR = "anchor"
Item = dict[str, dict[str, Any]]


class DynamoAuditStore:
    name = "dynamodb"

    def __init__(self, table: str, *, endpoint_url: str | None = None, region: str = "us-east-1", create: bool = True):
        self.table = table
        self.create = create
        self.client = boto3.client("dynamodb", endpoint_url=endpoint_url, region_name=region)
        self._ready = False
        self._lock = asyncio.Lock()

    async def _call(self, fn: Any, *args: Any) -> Any:
        async with self._lock:
            if not self._ready:
                await asyncio.to_thread(self._ensure_table)
                self._ready = True
        return await asyncio.to_thread(fn, *args)

    def _ensure_table(self) -> None:
        try:
            self.client.describe_table(TableName=self.table)
            return
        except ClientError as e:
            if e.response["Error"]["Code"] != "ResourceNotFoundException" or not self.create:
                raise
        try:
            self.client.create_table(
                TableName=self.table,
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "N"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as e:
            if e.response["Error"]["Code"] != "ResourceInUseException":  # another process made it
                raise
        deadline = time.monotonic() + 60
        while self.client.describe_table(TableName=self.table)["Table"]["TableStatus"] != "ACTIVE":
            if time.monotonic() > deadline:
                raise RuntimeError(f"DynamoDB table {self.table} did not become ACTIVE")
            time.sleep(0.05)
        try:  # the specification's point-in-time recovery; not every compatible server has it
            self.client.update_continuous_backups(
                TableName=self.table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
            )
        except ClientError:
            pass

    # -- writes -----------------------------------------------------------------------------------

    async def append(self, records: Sequence[Pending]) -> int:
        if not records:
            return 0
        return int(await self._call(self._append, list(records)))

    def _append(self, records: list[Pending]) -> int:
        seq, prev = self._head()
        written = 0
        for record in records:
            marker = {"pk": {"S": f"id#{record.id}"}, "sk": {"N": "0"}}
            if not self._put({**marker, "seq": {"N": str(seq + 1)}}):
                stored = self._get(marker)
                at = int(stored["seq"]["N"]) if stored else -1
                held = self._get({"pk": {"S": CHAIN}, "sk": {"N": str(at)}})
                if held is not None and held["id"]["S"] == record.id:
                    continue  # delivered before: stored once
            while True:
                link = seal(seq + 1, prev, record)
                if self._put(_item(link)):
                    break
                seq, prev = self._head()  # another writer extended the chain: follow it
            # The marker names where the record is (it may have moved on while following).
            self.client.put_item(TableName=self.table, Item={**marker, "seq": {"N": str(link.seq)}})
            seq, prev = link.seq, link.hash
            written += 1
        return written

    def _put(self, item: Item) -> bool:
        try:
            self.client.put_item(
                TableName=self.table,
                Item=item,
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": "pk"},
            )
        except ClientError as e:
            if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def _get(self, key: Item) -> Item | None:
        item: Item | None = self.client.get_item(TableName=self.table, Key=key, ConsistentRead=True).get("Item")
        return item

    def _head(self) -> tuple[int, str]:
        items = self.client.query(
            TableName=self.table,
            KeyConditionExpression="#pk = :chain",
            ExpressionAttributeNames={"#pk": "pk"},
            ExpressionAttributeValues={":chain": {"S": CHAIN}},
            ScanIndexForward=False,
            Limit=1,
            ConsistentRead=True,
        )["Items"]
        if items:
            return int(items[0]["sk"]["N"]), items[0]["hash"]["S"]
        anchor = self._get({"pk": {"S": ANCHOR}, "sk": {"N": "0"}})
        return (int(anchor["seq"]["N"]), anchor["hash"]["S"]) if anchor else (0, GENESIS)

    # -- reads ------------------------------------------------------------------------------------

    def _query(self, forward: bool, start: dict[str, Any] | None, below: int | None) -> dict[str, Any]:
        condition, values = "#pk = :chain", {":chain": {"S": CHAIN}}
        if below is not None:
            condition += " AND sk < :below"
            values[":below"] = {"N": str(below)}
        args: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": {"#pk": "pk"},
            "ExpressionAttributeValues": values,
            "ScanIndexForward": forward,
            "ConsistentRead": True,
        }
        if start:
            args["ExclusiveStartKey"] = start
        result: dict[str, Any] = self.client.query(**args)
        return result

    async def _records(self, forward: bool, below: int | None = None) -> AsyncIterator[AuditRecord]:
        start = None
        floor = await self._anchor_seq()
        while True:
            result = await self._call(self._query, forward, start, below)
            for item in result["Items"]:
                record = _record(item)
                if record.seq > floor:  # records a prune is still removing are past the anchor
                    yield record
            start = result.get("LastEvaluatedKey")
            if not start:
                return

    async def scan(self, filters: Filters | None = None) -> AsyncIterator[AuditRecord]:
        async for record in self._records(True):
            if filters is None or filters.matches(record):
                yield record

    async def page(self, filters: Filters, first: int, before_seq: int | None = None) -> Page:
        found: list[AuditRecord] = []
        async for record in self._records(False, before_seq):
            if filters.matches(record):
                if len(found) == first:
                    return Page(found, True)
                found.append(record)
        return Page(found, False)

    async def _anchor_item(self) -> Item | None:
        result: Item | None = await self._call(self._get, {"pk": {"S": ANCHOR}, "sk": {"N": "0"}})
        return result

    async def _anchor_seq(self) -> int:
        anchor = await self._anchor_item()
        return int(anchor["seq"]["N"]) if anchor else 0

    async def anchor(self) -> str:
        anchor = await self._anchor_item()
        return anchor["hash"]["S"] if anchor else GENESIS

    async def prune(self, before: str) -> int:
        last: AuditRecord | None = None
        doomed: list[AuditRecord] = []
        async for record in self._records(True):
            if record.at >= before:
                break
            last = record
            doomed.append(record)
        if last is None:
            return 0
        # The anchor first: a prune cut short leaves records below it, which reads skip.
        anchor = {"pk": {"S": ANCHOR}, "sk": {"N": "0"}, "seq": {"N": str(last.seq)}, "hash": {"S": last.hash}}
        await self._call(lambda: self.client.put_item(TableName=self.table, Item=anchor))
        for record in doomed:
            for key in (
                {"pk": {"S": CHAIN}, "sk": {"N": str(record.seq)}},
                {"pk": {"S": f"id#{record.id}"}, "sk": {"N": "0"}},
            ):
                await self._call(lambda k=key: self.client.delete_item(TableName=self.table, Key=k))
        return len(doomed)

    async def close(self) -> None:
        self.client.close()


def _item(record: AuditRecord) -> Item:
    p = record.pending
    item: Item = {
        "pk": {"S": CHAIN},
        "sk": {"N": str(record.seq)},
        "id": {"S": p.id},
        "at": {"S": p.at},
        "action": {"S": p.action},
        "roles": {"S": dumps(sorted(p.actor.roles))},
        "detail": {"S": dumps(p.detail)},
        "prev_hash": {"S": record.prev_hash},
        "hash": {"S": record.hash},
    }
    for name, value in (
        ("actor", p.actor.user),
        ("address", p.actor.address),
        ("user_agent", p.actor.user_agent),
        ("task_id", p.task_id),
        ("dataset", p.dataset),
    ):
        if value is not None:
            item[name] = {"S": value}
    return item


def _record(item: Item) -> AuditRecord:
    def text(name: str) -> str | None:
        value = item.get(name)
        return value["S"] if value else None

    actor = Actor(text("actor"), tuple(loads(text("roles")) or ()), text("address"), text("user_agent"))
    pending = Pending(
        item["id"]["S"],
        item["at"]["S"],
        item["action"]["S"],
        actor,
        text("task_id"),
        text("dataset"),
        loads(text("detail")) or {},
    )
    return AuditRecord(int(item["sk"]["N"]), pending, item["prev_hash"]["S"], item["hash"]["S"])
