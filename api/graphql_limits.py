"""Bounds on a GraphQL document, checked before the costly work: tokens while parsing, then depth,
aliases, fields and operations in one linear pass, before the standard validation rules run.

Why not Strawberry's ``QueryDepthLimiter`` and ``MaxAliasesLimiter``: they are validation rules, so
they run beside the standard rules (the overlapping-fields rule alone takes ~0.7 s on a 5,000-token
document) and a refusal saves none of that; they walk every fragment spread again, so a chain of
fragments that each spread the previous one twice takes exponential time (18 levels: 0.7 s, each
more level doubles it); their errors carry no code. Strawberry's ``MaxTokensLimiter`` is only the
parser's ``max_tokens`` option, which is what this module sets (with ``max_source_length``).

A refusal is a top-level error with ``extensions.code`` ``QUERY_TOO_COMPLEX`` and
``extensions.limit``; the standard validation is then skipped (Strawberry validates only when no
extension has reported errors first).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql.language.parser import MAX_NESTING_DEPTH
from graphql.validation.validate import ValidationAbortedError
from strawberry.extensions import SchemaExtension

from api.graphql_cache import measured
from dataport import errors
from dataport.settings import Settings

# Counts saturate here: a chain of fragments can stand for 2^500 fields, and no limit is that high.
_SATURATED = 1 << 40


@dataclass(frozen=True)
class QueryLimits:
    depth: int
    aliases: int
    tokens: int
    fields: int
    operations: int
    source_length: int

    @classmethod
    def from_settings(cls, settings: Settings, anonymous: bool = False) -> QueryLimits:
        """Without a valid token all a request can do is introspect, so it gets the smaller token and
        size budget and no aliases: fields of the same name then merge, and one introspection is
        done once (20 aliased ones cost 0.16 s)."""
        return cls(
            depth=settings.graphql_max_depth,
            aliases=0 if anonymous else settings.graphql_max_aliases,
            tokens=settings.graphql_anonymous_max_tokens if anonymous else settings.graphql_max_tokens,
            fields=settings.graphql_max_fields,
            operations=settings.graphql_max_operations,
            source_length=settings.max_anonymous_request_bytes if anonymous else settings.max_request_bytes,
        )


DEFAULT_LIMITS = QueryLimits.from_settings(Settings.model_construct())


@dataclass(frozen=True)
class Shape:
    """What the limits measure. ``depth``: fields nested in each other, a root field is 1 (below
    ``__schema``/``__type`` nothing counts: graphql-core's MaxIntrospectionDepthRule bounds that);
    ``aliases`` and ``fields``: each fragment counted as often as it is spread."""

    depth: int = 0
    aliases: int = 0
    fields: int = 0

    def plus(self, other: Shape, depth_offset: int = 0) -> Shape:
        return Shape(
            max(self.depth, other.depth + depth_offset if other.depth else 0),
            min(self.aliases + other.aliases, _SATURATED),
            min(self.fields + other.fields, _SATURATED),
        )


def too_complex(message: str, limit: int) -> GraphQLError:
    return GraphQLError(message, extensions={"code": errors.QUERY_TOO_COMPLEX, "limit": limit})


def measure(document: DocumentNode) -> tuple[int, Shape]:
    """The number of operations, and the largest shape of any one of them, in time linear in the
    document's size (each fragment is measured once)."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    shapes: dict[str, Shape] = {}
    for name in _dependencies_first(fragments):
        shapes[name] = _selection_shape(fragments[name].selection_set, shapes, introspection=False)
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    worst = Shape()
    for operation in operations:
        shape = _selection_shape(operation.selection_set, shapes, introspection=False)
        worst = Shape(max(worst.depth, shape.depth), max(worst.aliases, shape.aliases), max(worst.fields, shape.fields))
    return len(operations), worst


def _dependencies_first(fragments: dict[str, FragmentDefinitionNode]) -> Iterator[str]:
    """Fragment names, each after the fragments it spreads (iteratively: a chain of 500 fragments
    must not exhaust the interpreter's stack). A cycle is cut where it closes; the standard rules
    refuse it later."""
    done: set[str] = set()
    for root in fragments:
        if root in done:
            continue
        stack = [(root, iter(_spreads(fragments[root].selection_set)))]
        entered = {root}
        while stack:
            name, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                done.add(name)
                yield name
            elif child in fragments and child not in done and child not in entered:
                entered.add(child)
                stack.append((child, iter(_spreads(fragments[child].selection_set))))


def _spreads(selection_set: SelectionSetNode | None) -> Iterator[str]:
    for selection in selection_set.selections if selection_set else ():
        if isinstance(selection, FragmentSpreadNode):
            yield selection.name.value
        elif selection.selection_set is not None:
            yield from _spreads(selection.selection_set)


def _selection_shape(selection_set: SelectionSetNode | None, fragments: dict[str, Shape], introspection: bool) -> Shape:
    """Recursion here follows the document's own nesting, which the parser caps (200 levels)."""
    shape = Shape()
    for selection in selection_set.selections if selection_set else ():
        if isinstance(selection, FieldNode):
            inside = introspection or selection.name.value.startswith("__")
            below = _selection_shape(selection.selection_set, fragments, inside)
            own = Shape(0 if inside else 1, 1 if selection.alias else 0, 1)
            shape = shape.plus(own).plus(below, depth_offset=1)
        elif isinstance(selection, InlineFragmentNode):
            shape = shape.plus(_selection_shape(selection.selection_set, fragments, introspection))
        elif isinstance(selection, FragmentSpreadNode):
            spread = fragments.get(selection.name.value, Shape())  # unknown or cyclic: the standard rules say so
            shape = shape.plus(Shape(0, spread.aliases, spread.fields) if introspection else spread)
    return shape


def check(document: DocumentNode, limits: QueryLimits) -> GraphQLError | None:
    """The first limit the document exceeds, as a coded error; None when it is within all."""
    operations, shape = measured(document, measure)  # once per cached document (api/graphql_cache.py)
    if operations > limits.operations:
        return too_complex(
            f"The document holds {operations} operations; at most {limits.operations} are allowed.", limits.operations
        )
    if shape.depth > limits.depth:
        return too_complex(
            f"The query nests fields {shape.depth} deep; at most {limits.depth} levels are allowed.", limits.depth
        )
    if shape.aliases > limits.aliases:
        allowed = f"at most {limits.aliases} are allowed" if limits.aliases else "sign in to use aliases"
        return too_complex(f"The query uses {shape.aliases} aliases; {allowed}.", limits.aliases)
    if shape.fields > limits.fields:
        return too_complex(
            f"The query selects {shape.fields} fields (fragments counted each time they are "
            f"spread); at most {limits.fields} are allowed.",
            limits.fields,
        )
    return None


class GraphQLLimits(SchemaExtension):
    """Applies the caller's ``QueryLimits`` (from the context, so anonymous callers get theirs);
    a context without them (the schema used on its own) gets the defaults."""

    def _limits(self) -> QueryLimits:
        limits = getattr(self.execution_context.context, "query_limits", None)
        return limits if isinstance(limits, QueryLimits) else DEFAULT_LIMITS

    def on_operation(self) -> Iterator[None]:
        limits = self._limits()
        self.execution_context.parse_options["max_tokens"] = limits.tokens
        self.execution_context.parse_options["max_source_length"] = limits.source_length
        yield

    def on_parse(self) -> Iterator[None]:
        yield
        for error in self.execution_context.pre_execution_errors or ():
            # The parser's own bounds (tokens, source length, nesting): the client went too far,
            # not a typo, so the error says which limit.
            if isinstance(error, GraphQLSyntaxError) and error.message.endswith("Parsing aborted."):
                limits = self._limits()
                limit = (
                    limits.tokens
                    if "tokens" in error.message
                    else limits.source_length
                    if "code points" in error.message
                    else MAX_NESTING_DEPTH
                )
                error.extensions = {"code": errors.QUERY_TOO_COMPLEX, "limit": limit}

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if context.pre_execution_errors is None and context.graphql_document is not None:
            refusal = check(context.graphql_document, self._limits())
            if refusal is not None:
                context.pre_execution_errors = [refusal]
        yield
        for error in context.pre_execution_errors or ():
            # graphql-core gives up when the overlapping-fields check spends its budget
            if isinstance(error, ValidationAbortedError) and not error.extensions:
                error.extensions = {"code": errors.QUERY_TOO_COMPLEX}
