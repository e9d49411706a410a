"""A CSV or XLSX header checked against the dataset's columns, before any row is read.

``map_header`` says which column each field of the header stands for: the one the request's
``columnMap`` names for it (its key as written, else ignoring case and surrounding spaces), else
the column of that name, else the column whose name it is but for case and surrounding spaces
(``" Site"`` is ``site``); a column two fields would fill is a problem. ``header_problems`` then
names the fields that are no column of the dataset (with the name the user probably meant, by
difflib, when one is close) and the required columns the file lacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

from dataport.columns import Column
from formats.limits import listed

SHOWN_NAMES = 10
SHOWN_UNKNOWN = 20


def _quoted(name: str) -> str:
    """A column name as a message lists it: bare, unless spaces or commas would hide where it ends."""
    return name if name and name.strip() == name and "," not in name else repr(name)


def header_problems(fields: Sequence[str], columns: Sequence[Column]) -> list[str]:
    """What is wrong with a CSV/XLSX header for these columns, before any row is read: names that
    are not columns of the dataset, and required columns the file lacks. ``[]`` when fine."""
    names = [c.name for c in columns]
    known = set(names)
    problems = []
    unknown = [f for f in fields if f not in known]
    if unknown:
        # (a 100,000-column header once made a 789 KB message, stored in the task and sent on every poll)
        message = f"unknown columns: {listed([_quoted(u) for u in unknown[:SHOWN_UNKNOWN]] + unknown[SHOWN_UNKNOWN:])}"
        hints = _suggestions(unknown, names, known.difference(fields))
        if hints:
            message += f" (did you mean {'; '.join(hints)}?)"
        if len(fields) == 1 and any(sep in fields[0] for sep in ";\t|"):
            sep = next(sep for sep in ";\t|" if sep in fields[0])
            message += f" (the header seems separated by {sep!r}: a CSV import needs commas)"
        shown = ", ".join(map(_quoted, names[:SHOWN_NAMES]))
        more = f" and {len(names) - SHOWN_NAMES:,} more" if len(names) > SHOWN_NAMES else ""
        message += f" (the dataset has: {shown}{more})"
        problems.append(message)
    present = set(fields)
    missing = [c.name for c in columns if c.required and c.name not in present]
    if missing:
        problems.append(f"missing required columns: {', '.join(map(_quoted, missing))}")
    return problems


def _suggestions(unknown: Sequence[str], names: Sequence[str], unused: set[str]) -> list[str]:
    """'name' for ' Name ': the same name but for case and spaces, else a close spelling, among the
    columns the file does not name yet (only for the first few unknown names: difflib is slow)."""
    folded = {name.strip().casefold(): name for name in names if name in unused}
    hints = []
    for field in unknown[:5]:
        match = folded.get(field.strip().casefold())
        if match is None:
            close = difflib.get_close_matches(field, [n for n in names if n in unused], n=1, cutoff=0.6)
            match = close[0] if close else None
        if match is not None:
            hints.append(f"{_quoted(match)} for {_quoted(field)}")
    return hints


def fold(name: str) -> str:
    """A header as it is matched: without surrounding spaces, case folded."""
    return name.strip().casefold()


def header_resolver(columns: Sequence[Column], column_map: Mapping[str, str] | None) -> Callable[[str], str | None]:
    """The column a field of a file names (``map_header``'s rule), or None when it names none."""
    names = {c.name for c in columns}
    folded: dict[str, str] = {}
    for c in columns:
        folded.setdefault(fold(c.name), c.name)
    mapped = dict(column_map or {})
    mapped_folded = {fold(k): v for k, v in mapped.items()}

    def resolve(field: str) -> str | None:
        if field in mapped:
            return mapped[field]
        if fold(field) in mapped_folded:
            return mapped_folded[fold(field)]
        if field in names:
            return field
        return folded.get(fold(field))

    return resolve


def map_header(
    fields: Sequence[str], columns: Sequence[Column], column_map: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """The column each field stands for (an unknown field keeps its own text, for
    ``header_problems`` to name), and the problems of the mapping itself: a column that two
    fields would fill."""
    resolve = header_resolver(columns, column_map)
    out = [resolve(f) or f for f in fields]
    problems = []
    by_column: dict[str, list[str]] = {}
    for f, name in zip(fields, out, strict=True):
        by_column.setdefault(name, []).append(f)
    twice = {name: given for name, given in by_column.items() if len(given) > 1}
    for name, given in list(twice.items())[:SHOWN_NAMES]:
        problems.append(f"column {_quoted(name)} is given by more than one field ({', '.join(map(repr, given))})")
    return out, problems
