"""Which fields a client selected below the field being resolved, read from the document itself.

Strawberry's ``info.selected_fields`` converts the whole selection (arguments, directives, every
fragment) into its own objects on each call; a resolver that only wants to know whether one field
is asked for (``exportTask`` and ``pollAfterSeconds``, resolvers/queries.py) walks graphql-core's
nodes instead: direct fields, inline fragments and named fragments, one level down.
"""

from __future__ import annotations

from graphql import FieldNode, FragmentSpreadNode, InlineFragmentNode, SelectionSetNode

from api.context import Info


def selects(info: Info, name: str) -> bool:
    """Whether ``name`` is selected directly under the field being resolved (through fragments too;
    ``@skip``/``@include`` are not evaluated, so a field they might drop counts as selected)."""
    raw = info._raw_info
    fragments = raw.fragments
    seen: set[str] = set()
    stack: list[SelectionSetNode | None] = [node.selection_set for node in raw.field_nodes]
    while stack:
        selection_set = stack.pop()
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                if selection.name.value == name:
                    return True
            elif isinstance(selection, InlineFragmentNode):
                stack.append(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                seen.add(selection.name.value)
                fragment = fragments.get(selection.name.value)
                stack.append(fragment.selection_set if fragment else None)
    return False
