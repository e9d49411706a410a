"""Which fields a client selected below the field being resolved, read from the document itself.

Strawberry's ``info.selected_fields`` converts the whole selection (arguments, directives, every
fragment) into its own objects on each call; a resolver that only wants to know whether a field or
two are asked for (``exportTask``: ``pollAfterSeconds`` and ``queuePosition``, resolvers/queries.py)
walks graphql-core's nodes instead: direct fields, inline fragments and named fragments, one level
down.
"""

from __future__ import annotations

from graphql import FieldNode, FragmentSpreadNode, InlineFragmentNode, SelectionSetNode

from api.context import Info


def selected(info: Info, *names: str) -> tuple[bool, ...]:
    """Whether each of ``names`` is selected directly under the field being resolved, in one walk
    (through fragments too; ``@skip``/``@include`` are not evaluated, so a field they might drop
    counts as selected)."""
    raw = info._raw_info
    fragments = raw.fragments
    wanted = set(names)
    found: set[str] = set()
    seen: set[str] = set()
    stack: list[SelectionSetNode | None] = [node.selection_set for node in raw.field_nodes]
    while stack and found != wanted:
        selection_set = stack.pop()
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                if selection.name.value in wanted:
                    found.add(selection.name.value)
            elif isinstance(selection, InlineFragmentNode):
                stack.append(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                seen.add(selection.name.value)
                fragment = fragments.get(selection.name.value)
                stack.append(fragment.selection_set if fragment else None)
    return tuple(name in found for name in names)
