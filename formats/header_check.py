"""A CSV or XLSX header checked against the dataset's columns, before any row is read.

``header_problems`` names the file's columns that the dataset does not have (with the name the
user probably meant, when one is close) and the required columns the file lacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from formats.limits import listed
from sources.base import Column

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
            close = difflib.get_close_matches(field, [n for n in names if n in unused], n=1, cutoff=0.8)
            match = close[0] if close else None
        if match is not None:
            hints.append(f"{_quoted(match)} for {_quoted(field)}")
    return hints
