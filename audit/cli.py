"""``dataport audit verify`` and ``dataport audit export``: the audit store, read from the command
line with the same settings as the api and workers (``DATAPORT_AUDIT_*``)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import sys
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer

from audit import chain
from audit.base import AuditStore, Filters, store_from_settings
from audit.records import AuditRecord, dumps, time_text
from dataport.logs import message_console
from dataport.settings import get_settings

audit_app = typer.Typer(help="The audit log: check its hash chain, write its records out.", no_args_is_help=True)
console = message_console()

CSV_COLUMNS = (
    "seq",
    "id",
    "at",
    "action",
    "actor",
    "roles",
    "address",
    "user_agent",
    "task_id",
    "dataset",
    "detail",
    "prev_hash",
    "hash",
)


def _store() -> AuditStore:
    settings = get_settings()
    if settings.audit_store == "none":
        console.print("[red]The audit log is off (DATAPORT_AUDIT_STORE=none).[/red]")
        raise typer.Exit(2)
    return store_from_settings(settings)


async def verify_store(store: AuditStore) -> chain.Report:
    """The whole chain checked from the anchor; a broken link told apart (changed, deleted, reordered)."""
    report = await chain.verify(store.scan(), await store.anchor())
    if report.broken is not None:
        report = chain.Report(report.records, report.head, await chain.classify(report.broken, store.scan()))
    return report


@audit_app.command()
def verify() -> None:
    """Check every record's hash and link, oldest first; name the first broken link (exit 1)."""

    async def run() -> chain.Report:
        store = _store()
        try:
            return await verify_store(store)
        finally:
            await store.close()

    report = asyncio.run(run())
    if report.broken is not None:
        console.print(f"[red]BROKEN ({report.broken.kind}) after {report.records - 1:,} good records:[/red]")
        console.print(report.broken.message)
        raise typer.Exit(1)
    console.print(f"OK: {report.records:,} records, the chain is whole; head {report.head}")


def _moment(text: str | None, option: str) -> str | None:
    """An ISO 8601 date or time (UTC unless it says otherwise) as a record time."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        console.print(f"[red]{option}:[/red] '{text}' is not an ISO 8601 date or time")
        raise typer.Exit(2) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return time_text(moment.timestamp())


def write_records(out: IO[str], records: list[AuditRecord] | Any, file_format: str) -> None:
    """NDJSON: one record a line as ``AuditRecord.as_dict``; CSV: the same fields, ``detail`` and
    ``roles`` as JSON text."""
    if file_format == "csv":
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for record in records:
            _write_csv_row(writer, record)
    else:
        for record in records:
            out.write(orjson.dumps(record.as_dict(), option=orjson.OPT_SORT_KEYS).decode() + "\n")


@audit_app.command("export")
def export_records(
    since: Annotated[str | None, typer.Option("--since", help="from this time on (ISO 8601, UTC by default)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="before this time (ISO 8601)")] = None,
    file_format: Annotated[str, typer.Option("--format", help="ndjson or csv")] = "ndjson",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="a file (default: standard output)")] = None,
) -> None:
    """Write the records between --since and --until out, oldest first, with their hashes."""
    file_format = file_format.lower()
    if file_format not in ("ndjson", "csv"):
        console.print(f"[red]--format:[/red] ndjson or csv, not '{file_format}'")
        raise typer.Exit(2)
    filters = Filters(since=_moment(since, "--since"), until=_moment(until, "--until"))

    async def run(target: IO[str]) -> int:
        store = _store()
        count = 0
        batch: list[AuditRecord] = []
        header = file_format == "csv"
        try:
            async for record in store.scan(filters):
                batch.append(record)
                if len(batch) == 1000:
                    count += _flush(target, batch, file_format, header)
                    header = False
            count += _flush(target, batch, file_format, header)
        finally:
            await store.close()
        return count

    if out is None:
        count = asyncio.run(run(sys.stdout))
    else:
        with out.open("w", newline="") as f:
            count = asyncio.run(run(f))
    console.print(f"{count:,} records")


def _flush(target: IO[str], batch: list[AuditRecord], file_format: str, header: bool) -> int:
    if not batch and not header:
        return 0
    if file_format == "csv" and not header:
        writer = csv.writer(target)
        for record in batch:
            _write_csv_row(writer, record)
    else:
        write_records(target, batch, file_format)
    count = len(batch)
    batch.clear()
    return count


def _write_csv_row(writer: Any, record: AuditRecord) -> None:
    row = record.as_dict()
    actor = row.pop("actor")
    row.update(actor=actor["user"], roles=dumps(actor["roles"]), address=actor["address"])
    row.update(user_agent=actor["user_agent"], detail=dumps(row["detail"]))
    writer.writerow([row[c] for c in CSV_COLUMNS])
