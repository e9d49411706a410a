"""PostgreSQL source: psycopg 3 (async), server-side cursors, JSONB documents as columns.

Reading
    One connection per read. ``batches`` runs in ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY``
    (one snapshot: rows committed by others during the export are not seen) and reads through a
    named server-side cursor, ``FETCH``-ing one batch at a time; the next batch is already asked
    for while the current one is converted and written, so PostgreSQL and Python work at once.
    Memory holds about two batches, and batches of wide rows are made smaller (``_CELLS_PER_BATCH``).
    Closing the generator early, or ``close()``, cancels a statement in flight and closes the
    connection, so the server drops the cursor and the snapshot at once. A large table read in
    key order uses two connections (below), both in one snapshot and both released the same
    way. Session settings are
    ``SET LOCAL`` in that transaction (UTC time zone, ISO dates, shortest exact float text,
    standard-conforming strings), so they also hold behind a transaction-pooling proxy.

Queries
    ``sources.sql.compile_query`` with ``POSTGRES`` and ``column_sql``: identifiers come only from
    the registry and are quoted, every value is bound (the semantics of sources/sql.py: NE and
    NOT_IN keep NULLs, CONTAINS and PREFIX are case-sensitive, NULLs last ascending, the dataset key
    ends every ORDER BY). A dataset without a key is ordered by its sort alone: give PostgreSQL
    datasets a key, or reruns may order ties differently. Text compares and sorts in code-point
    order (``COLLATE "C"``), as in SQLite and OpenSearch, whatever the column's collation; an
    index on a text column helps those filters only if it is built ``COLLATE "C"`` as well.

Where each part lives (one job per module; ``source.py`` reads as the table of contents)
    - ``source.py``: ``PostgresSource``, the ``Source`` interface: connections, counting, reading
      in batches, the CSV fast path; each step calls into the modules below.
    - ``dialect.py``: quoting, the ``POSTGRES`` query dialect, the session settings, type names.
    - ``columns.py``: the table's columns as PostgreSQL has them (``TableInfo``) and column
      discovery at start-up (``discover_columns``), JSONB fields typed from a sample.
    - ``fields.py``: where a dataset column lives (``Field``) and its SQL: typed values, the cells
      ``batches`` reads, the cells of the COPY fast path.
    - ``plans.py``: the read plan: which expressions are read, which JSONB documents are fetched
      whole and flattened in Python, and how rows (or CSV) are made from them.
    - ``extract.py``: a JSON value typed the way the SQL casts type it, and the errors that name
      the row and column of a value that does not fit.
    - ``decode.py``: msgspec decoders of just the fields a read needs from a document.
    - ``readers.py``: rows off one connection: COPY data taken from libpq in bulk, batches through
      a server-side cursor.
    - ``ranges.py``: large tables read by key ranges on two connections in one exported snapshot.
    - ``helper_reads.py``: flattening documents (and reading their key ranges) in helper processes.
    - ``errors.py``: psycopg's errors as source errors (retry or not); a bad value's column and row.

The names other modules import (``PostgresSource``, ``POSTGRES``, ``quote_ident``,
``discover_columns``…) are re-exported here; the tests also reach the private helpers through
this package (a test that patches one patches it in the module that looks it up).
"""

from sources.postgres.columns import TableInfo, discover_columns
from sources.postgres.decode import _decoder
from sources.postgres.dialect import CONNECT_TIMEOUT_SECONDS, POSTGRES, quote_ident, quote_literal
from sources.postgres.errors import _translate
from sources.postgres.fields import Field, column_sql_for, resolve
from sources.postgres.helper_reads import HELPERS_AFTER_CELLS
from sources.postgres.plans import INLINE_FIELDS, SMALL_DOCUMENT_BYTES
from sources.postgres.ranges import RANGE_BYTES, SPLIT_BYTES
from sources.postgres.readers import _copy_chunks, _cursor_batches
from sources.postgres.source import PostgresSource

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "HELPERS_AFTER_CELLS",
    "INLINE_FIELDS",
    "POSTGRES",
    "RANGE_BYTES",
    "SMALL_DOCUMENT_BYTES",
    "SPLIT_BYTES",
    "Field",
    "PostgresSource",
    "TableInfo",
    "_copy_chunks",
    "_cursor_batches",
    "_decoder",
    "_translate",
    "column_sql_for",
    "discover_columns",
    "quote_ident",
    "quote_literal",
    "resolve",
]
