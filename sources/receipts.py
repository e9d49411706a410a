"""Import receipts: proof, kept in the dataset's own database, that a run of an import committed.

A worker killed between an import's COMMIT and the task's SUCCEEDED left the rows in the table and
the task PROCESSING; the next worker ran the import again, met its own rows and failed with "a row
with id=… already exists" (INSERT), and the dataset was never marked written, so stale exports of
it were reused. Now the SQL sinks write a receipt ``(task id, run, rows)`` into
``dataport_import_receipts`` in the same transaction as the rows: the rows and the receipt are
committed together or not at all. An import that finds its receipt before it writes knows that its
rows are in, and ends SUCCEEDED with the committed count instead of writing again.

The table is made on first use, beside the dataset's table (same schema); the import's database
user needs to be allowed to create it once, or an administrator creates it (DDL below). OpenSearch
needs no receipt: document ids come from the key and a re-run converges (``opensearch_sink``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sources.base import Dataset
from sources.sink_base import SinkError

TABLE = "dataport_import_receipts"
COLUMNS = (
    "(task_id TEXT NOT NULL, run INTEGER NOT NULL, rows_written BIGINT NOT NULL, "
    "committed_at TEXT NOT NULL, PRIMARY KEY (task_id, run))"
)


@dataclass(frozen=True)
class Receipt:
    task_id: str
    run: int
    rows: int = 0  # filled in by the sink at commit


def table_for(dataset: Dataset, quote_name: Callable[[str], str]) -> str:
    """The receipts table, quoted, in the schema of the dataset's table (``schema.table``)."""
    schema, dot, _ = dataset.table.rpartition(".")
    return f"{quote_name(schema)}.{quote_name(TABLE)}" if dot else quote_name(TABLE)


async def find_receipt(dataset: Dataset, task_id: str, run: int) -> Receipt | None:
    """The receipt of ``task_id``'s run ``run`` in the dataset's database; None if it never
    committed (or the store keeps no receipts). A store that cannot be asked is a transient
    ``SinkError``: the import must not write before it knows."""
    try:
        if dataset.source == "sqlite":
            return await asyncio.to_thread(_find_sqlite, dataset, task_id, run)
        if dataset.source == "postgres":
            return await _find_postgres(dataset, task_id, run)
    except SinkError:
        raise
    except Exception as e:  # sqlite3's and psycopg's errors: locked, connection lost, ...
        raise SinkError(
            f"dataset '{dataset.name}': cannot tell whether an earlier attempt committed ({type(e).__name__}: {e})",
            transient=True,
        ) from e
    return None


def _find_sqlite(dataset: Dataset, task_id: str, run: int) -> Receipt | None:
    path = Path(dataset.url)
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute(
            f'SELECT rows_written FROM "{TABLE}" WHERE task_id = ? AND run = ?', (task_id, run)
        ).fetchone()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return None
        raise
    finally:
        conn.close()
    return Receipt(task_id, run, int(row[0])) if row else None


async def _find_postgres(dataset: Dataset, task_id: str, run: int) -> Receipt | None:
    import psycopg.errors

    from sources.postgres.dialect import POSTGRES
    from sources.postgres_sink import _connect  # the sink's connection settings

    conn = await _connect(dataset)
    try:
        cursor = await conn.execute(
            f"SELECT rows_written FROM {table_for(dataset, POSTGRES.quote)} WHERE task_id = %s AND run = %s",
            (task_id, run),
        )
        row = await cursor.fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    finally:
        await conn.close()
    return Receipt(task_id, run, int(row[0])) if row else None
