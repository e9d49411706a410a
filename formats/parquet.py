"""Parquet through ``pyarrow.parquet.ParquetWriter``, row groups streamed out as they are made.

Column types come from the dataset's column types, not from the cells: integer ``int64``, float
``float64``, boolean ``bool``, string ``string`` (UTF-8), date ``date32``, datetime
``timestamp[us, tz=UTC]`` (the ISO text every source hands the writers, parsed by Arrow), each
nullable. So an export of no rows, or of a column that is all nulls, still has the dataset's
schema, and a warehouse loads the file without guessing.

Rows are converted a batch at a time (one ``pyarrow.array`` call per column) and held until
``ROW_GROUP_ROWS`` rows or ``ROW_GROUP_BYTES`` of Arrow buffers gather, then written as one row
group; the bytes the Parquet writer produced for it are handed on at once (``_Spout``), so memory
holds at most one row group, whatever the row count. The footer comes in ``finish()``.
Compression inside the file: Snappy (pyarrow's default, the cheapest to write and read).

No formula guard: Parquet is not opened by spreadsheets, and warehouses want the text as stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from dataport.columns import Column, Row

ROW_GROUP_ROWS = 16_384
ROW_GROUP_BYTES = 16 * 1024 * 1024

ARROW_TYPES: dict[str, Any] = {
    "integer": pa.int64(),
    "float": pa.float64(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us", tz="UTC"),
}


class _Spout:
    """The file object ParquetWriter writes to: it keeps what was written until ``drain()``."""

    closed = False

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._position = 0

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self._pieces.append(piece)
        self._position += len(piece)
        return len(piece)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        out = b"".join(self._pieces)
        self._pieces.clear()
        return out


def arrow_column(column: Column, cells: Sequence[Any]) -> Any:
    """One column's cells as an Arrow array of the column's type. ``ValueError`` naming the column
    when a cell is not of it (text in an integer column, a date that is no date)."""
    kind = ARROW_TYPES.get(column.type, pa.string())
    try:
        if column.type in ("date", "datetime"):
            return pc.cast(pa.array(cells, type=pa.string()), kind)
        try:
            return pa.array(cells, type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if column.type == "boolean":  # 0/1 from a store without booleans
                return pa.array([None if v is None else bool(v) for v in cells], type=kind)
            if column.type == "string":
                return pa.array([None if v is None else str(v) for v in cells], type=kind)
            raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        problem = f"column '{column.name}' ({column.type}) holds a value Parquet cannot store as such: {e}"
        raise ValueError(problem) from e


class ParquetWriter:
    extension = "parquet"
    content_type = "application/vnd.apache.parquet"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.columns = tuple(columns)
        self.schema = pa.schema([pa.field(c.name, ARROW_TYPES.get(c.type, pa.string())) for c in self.columns])
        self._spout = _Spout()
        self._writer: Any = None
        self._pending: list[Any] = []  # record batches of the next row group
        self._pending_rows = 0
        self._pending_bytes = 0

    def begin(self) -> bytes:
        self._writer = pq.ParquetWriter(self._spout, self.schema)
        return self._spout.drain()

    def write(self, rows: Sequence[Row]) -> bytes:
        if not rows:
            return b""
        cells = list(zip(*rows, strict=True))
        batch = pa.record_batch([arrow_column(c, cells[i]) for i, c in enumerate(self.columns)], schema=self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._write_group()
        return self._spout.drain()

    def finish(self) -> Iterator[bytes]:
        self._write_group()
        self._writer.close()
        yield self._spout.drain()

    def _write_group(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._pending.clear()
        self._pending_rows = self._pending_bytes = 0
