"""Read plans: which SQL expressions a read selects, and how rows (or CSV) are made from them.

Large JSONB documents, flattened in Python
    PostgreSQL de-TOASTs (decompresses) a large document once per expression that reads it: a
    field costs ~0.1 ms per row on a 2,897-key document, against ~1 µs on a small one. So the
    average stored size of each JSONB column is read with the table's columns (``pg_column_size``
    of 100 rows, nothing decompressed): fields of small documents (< ``SMALL_DOCUMENT_BYTES``) are
    always read in SQL; of a large document, up to ``INLINE_FIELDS``; beyond that the document is
    fetched once as text, parsed with orjson and flattened in Python (``_Extract``, the same typing
    rules as the casts, errors naming row and column); filters and sorts stay in SQL. That is also
    how a dataset wider than a SELECT list (1,664 entries) is read.

    A plan that flattens documents in Python (see above) uses the Python writer inside
    ``csv_batches`` instead: same signature, exact Python output. Its cells go to the writer by
    column (``CsvWriter.render``) rather than as row tuples: a run of float fields of a document
    is handed over as each row's looked-up values, already type-checked, and written by one
    orjson call per batch. 40,000 documents × 2,897 float fields (2 GB of JSON text) took 31-38 s
    (was 117-150 s), CPU-bound in Python: ~20 s of CPU flattening, about half of it orjson
    parsing the documents (~0.1 µs a field, dict building included; an array of the same numbers
    parses in a third of that, but no cheap SQL gives the values in a known key order: listing
    a document's keys costs PostgreSQL more than rendering it), a fifth looking the fields up
    (``list(doc.values())`` sliced, when the keys repeat, costs as much: memory-bound), the rest
    type checks and writing; PostgreSQL spends ~12 s rendering the documents as text (its
    ``psql \\copy`` floor), on the other core. So a large read of flattened documents hands its
    batches to helper processes (``sources.helpers``), in order, and only fetches and writes itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from operator import itemgetter
from typing import Any

import orjson

import formats.csv as csv_format
from sources.base import DECODED_CELL_TYPES, Column, Row, SourceError
from sources.postgres.columns import TableInfo
from sources.postgres.decode import _decoder
from sources.postgres.dialect import quote_ident
from sources.postgres.extract import _CellError, _Extract, _RowError
from sources.postgres.fields import Field
from sources.query import Query

# More fields than this from one document: fetch the document once and flatten it in Python.
INLINE_FIELDS = 8
# Documents stored in fewer bytes than this (on average) are not TOASTed: reading a field is cheap,
# so any number of their fields is read in SQL (up to what a SELECT list holds).
SMALL_DOCUMENT_BYTES = 2000
_MAX_SELECT = 1600

# Python types a document's value may already have for each column type (no conversion needed).
_NONE = type(None)
_FAST_TYPES = {
    "string": frozenset((str, _NONE)), "float": frozenset((float, _NONE)), "integer": frozenset((int, _NONE)),
    "boolean": frozenset((bool, _NONE)),
}  # fmt: skip


_INT_FLOAT = frozenset((int, float, _NONE))


def _getter(keys: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The values of ``keys`` in a document, as a tuple; ``KeyError`` if one is missing."""
    if len(keys) == 1:
        key = keys[0]
        return lambda doc: (doc[key],)
    return itemgetter(*keys)


@dataclass
class _Plan:
    """What one read selects and how its rows become the query's rows."""

    exprs: list[str]  # the SELECT list (without documents' fields read in Python)
    csv_exprs: list[str] | None  # the same, rendered as CSV text; None: no SQL fast path
    build: Callable[[list[Row], int], list[Row]] | None  # None: rows are already right
    # The fetched rows as CSV through the given writer (documents flattened in Python), by column.
    csv_build: Callable[[csv_format.CsvWriter, list[Row], int], bytes] | None = None


def _plan(fields: Sequence[Field], formula_guard: bool, info: TableInfo) -> _Plan:
    per_document: dict[str, int] = {}
    for f in fields:
        if f.path:
            per_document[f.source] = per_document.get(f.source, 0) + 1
    flattened = {
        doc
        for doc, n in per_document.items()
        if n > INLINE_FIELDS and info.document_bytes.get(doc, 0) > SMALL_DOCUMENT_BYTES
    }
    if len(fields) - sum(per_document[d] for d in flattened) > _MAX_SELECT:
        flattened = set(per_document)
    if not flattened:
        return _Plan([f.out_sql for f in fields], [f.csv_sql(formula_guard) for f in fields], None)

    exprs: list[str] = []
    doc_slot: dict[str, int] = {}
    for f in fields:
        if f.path and f.source in flattened and f.source not in doc_slot:
            doc_slot[f.source] = len(exprs)
            exprs.append(quote_ident(f.source))  # read as its JSON text's bytes (see _fetched)
    # Each output cell comes from one place in a "combined" list per row: the SQL cells first,
    # then per (document, kind) group of one-key fields the values looked up with one C-level
    # map(dict.get, keys), then the nested fields one by one. A group whose values all have the
    # kind's Python type (the common case: floats are floats) needs no per-cell work at all.
    sql_cells: list[int] = []  # SELECT slots of the SQL-read columns
    groups: dict[tuple[int, str], list[_Extract]] = {}
    nested: list[tuple[int, _Extract]] = []
    where: list[tuple[str, Any, int]] = []  # per output column: ("sql", i) / ("group", key, i) / ("nested", i)
    for f in fields:
        if f.path and f.source in flattened:
            ex = _Extract(f)
            if len(f.path) == 1:
                members = groups.setdefault((doc_slot[f.source], f.column.type), [])
                where.append(("group", (doc_slot[f.source], f.column.type), len(members)))
                members.append(ex)
            else:
                where.append(("nested", None, len(nested)))
                nested.append((doc_slot[f.source], ex))
        else:
            where.append(("sql", None, len(sql_cells)))
            sql_cells.append(len(exprs))
            exprs.append(f.out_sql)
    group_list = [
        (slot, _getter(keys), keys, members, _FAST_TYPES.get(kind, frozenset()), kind == "float")
        for (slot, kind), members in groups.items()
        for keys in [[ex.path[0] for ex in members]]
    ]
    group_kind = [kind for _, kind in groups]
    starts, at = {}, len(sql_cells)
    for key, members in groups.items():
        starts[key] = at
        at += len(members)
    nested_start = at
    order = [i if kind == "sql" else starts[key] + i if kind == "group" else nested_start + i for kind, key, i in where]
    pick = itemgetter(*order) if len(order) > 1 else (lambda combined: (combined[order[0]],))
    doc_slots = sorted(doc_slot.values())
    take_sql = (
        itemgetter(*sql_cells)
        if len(sql_cells) > 1
        else ((lambda row: (row[sql_cells[0]],)) if sql_cells else (lambda row: ()))
    )
    loads = orjson.loads
    empty: dict[str, Any] = {}
    slot_groups = {slot: [g for g, group in enumerate(group_list) if group[0] == slot] for slot in doc_slots}
    decoders = {
        slot: _decoder([group_list[g][2] for g in mine], [group_kind[g] for g in mine])
        for slot, mine in slot_groups.items()
        if not any(s == slot for s, _ in nested)
    }

    def raw_values(doc: Any, get: Callable[[dict[str, Any]], tuple[Any, ...]], keys: list[str]) -> Sequence[Any]:
        if doc.__class__ is dict:
            try:  # every key there (the common case): one C-level lookup per key
                return get(doc)
            except KeyError:
                return tuple(map(doc.get, keys))
        return (None,) * len(keys)

    # per document: the groups that a typed decoding of it leaves with nothing to check
    slot_typed = {slot: [g for g in mine if group_kind[g] in DECODED_CELL_TYPES] for slot, mine in slot_groups.items()}

    def documents(row: Row) -> tuple[list[Sequence[Any]], list[bool], dict[int, Any]]:
        """The row's documents: each group's values as they are in the JSON, whether they are
        typed already, and the parsed documents that nested fields are read from."""
        raws: list[Sequence[Any]] = [()] * len(group_list)
        typed = [False] * len(group_list)
        docs: dict[int, Any] = {}
        for slot in doc_slots:
            text = row[slot]
            decode = decoders.get(slot)
            if decode is not None and text is not None:
                decoded = decode(text)
                if decoded is not None:
                    values, checked = decoded
                    for g, cells in zip(slot_groups[slot], values, strict=True):
                        raws[g] = cells
                    if checked:
                        for g in slot_typed[slot]:
                            typed[g] = True
                    continue
            doc = docs[slot] = loads(text) if text is not None else empty
            for g in slot_groups[slot]:
                raws[g] = raw_values(doc, *group_list[g][1:3])
        return raws, typed, docs

    def group_values(
        values: Sequence[Any], typed: bool, members: list[_Extract], fast: frozenset[Any], to_float: bool
    ) -> tuple[Sequence[Any], bool]:
        """A group's values typed, and whether some were converted from text (a float from text
        may be NaN or infinite, one from a JSON number never is)."""
        if typed:
            return values, False
        types = set(map(type, values))
        if types <= fast:
            return values, False
        if to_float and types <= _INT_FLOAT:  # integral numbers in a float field
            return [float(v) if v.__class__ is int else v for v in values], False
        return [ex.convert(v) for ex, v in zip(members, values, strict=True)], True

    def refuse(e: _CellError, row_number: int) -> SourceError:
        return _RowError(
            row_number,
            f"column '{e.name}' holds {e.value!r}, which is not "
            f"{'an' if e.kind == 'integer' else 'a'} {e.kind}. Correct the document in "
            f"the source table, or declare the column as string.",
        )

    def build(rows: list[Row], offset: int) -> list[Row]:
        out = []
        for n, row in enumerate(rows):
            raws, typed, docs = documents(row)
            combined = list(take_sql(row))
            try:
                for values, known, group in zip(raws, typed, group_list, strict=True):
                    combined += group_values(values, known, *group[3:])[0]
                for slot, ex in nested:
                    v = ex.get(docs[slot])
                    combined.append(v if v.__class__ is ex.native else ex.convert(v))
            except _CellError as e:
                raise refuse(e, offset + n + 1) from None
            out.append(pick(combined))
        return out

    # CSV: the same cells, kept by group rather than gathered into row tuples, so that a run of
    # number columns goes to the writer as the groups' values (or slices of them) as they are.
    group_index = {key: g for g, key in enumerate(groups)}
    group_size = [len(members) for members in groups.values()]
    run_pieces: dict[tuple[int, int], list[tuple[int, int, int]]] = {}

    def pieces_of(start: int, stop: int) -> list[tuple[int, int, int]]:
        """Columns start..stop as pieces: (group, first member, members) for consecutive members
        of one group, (-1, column, 1) for any other column."""
        if (start, stop) not in run_pieces:
            pieces, i = [], start
            while i < stop:
                kind, key, first = where[i]
                j = i + 1
                if kind == "group":
                    while j < stop and where[j] == ("group", key, first + j - i):
                        j += 1
                    pieces.append((group_index[key], first, j - i))
                else:
                    pieces.append((-1, i, 1))
                i = j
            run_pieces[start, stop] = pieces
        return run_pieces[start, stop]

    def csv_build(writer: csv_format.CsvWriter, rows: list[Row], offset: int) -> bytes:
        by_group: list[list[Sequence[Any]]] = [[] for _ in group_list]
        by_nested: list[list[Any]] = [[] for _ in nested]
        converted = [False] * len(group_list)
        for n, row in enumerate(rows):
            raws, typed, docs = documents(row)
            try:
                for g, group in enumerate(group_list):
                    values, text = group_values(raws[g], typed[g], *group[3:])
                    by_group[g].append(values)
                    converted[g] = converted[g] or text
                for values, (slot, ex) in zip(by_nested, nested, strict=True):
                    v = ex.get(docs[slot])
                    values.append(v if v.__class__ is ex.native else ex.convert(v))
            except _CellError as e:
                raise refuse(e, offset + n + 1) from None

        def column(i: int) -> Sequence[Any]:
            kind, key, j = where[i]
            if kind == "sql":
                return list(map(itemgetter(sql_cells[j]), rows))
            if kind == "group":
                return list(map(itemgetter(j), by_group[group_index[key]]))
            return by_nested[j]

        def run(start: int, stop: int) -> tuple[Sequence[Sequence[Any]], int]:
            # The cells of number columns are ints, floats and None: the SQL casts, the groups'
            # type checks and the conversions see to that. A document's numbers are finite unless
            # converted from text ("nan"); SQL cells may be NaN.
            parts: list[Sequence[Sequence[Any]]] = []
            known = csv_format.FINITE
            for g, first, size in pieces_of(start, stop):
                if g < 0:
                    parts.append([(v,) for v in column(first)])
                    known = csv_format.NUMBERS
                    continue
                if converted[g]:
                    known = csv_format.NUMBERS
                if first == 0 and size == group_size[g]:
                    parts.append(by_group[g])
                else:
                    parts.append([values[first : first + size] for values in by_group[g]])
            if len(parts) == 1:
                return parts[0], known
            return [tuple(chain.from_iterable(cells)) for cells in zip(*parts, strict=True)], known

        return writer.render(len(rows), column, run)

    return _Plan(exprs, None, build, csv_build)


def _output_query(query: Query, exprs: list[str]) -> tuple[Query, Callable[[Column], str]]:
    """``query`` with its SELECT list replaced by ``exprs``; filters, sort and limit unchanged.

    compile_query takes one expression per column for both the SELECT list and the conditions;
    here the SELECT list differs (text for dates, CSV renderings, whole documents), so stand-in
    columns carry the output expressions and every other column compiles to its typed value."""
    stand_ins = tuple(Column(f"\0{i}") for i in range(len(exprs)))
    return replace(query, columns=stand_ins), lambda c: exprs[int(c.name[1:])] if c.name[:1] == "\0" else ""


def _flattened_csv(plan: _Plan, writer: csv_format.CsvWriter, rows: list[Row], offset: int) -> bytes:
    if csv_format.FAST and plan.csv_build is not None:
        return plan.csv_build(writer, rows, offset)
    return writer.write(plan.build(rows, offset) if plan.build else rows)
