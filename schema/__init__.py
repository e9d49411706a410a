"""The GraphQL schema: the contract's root types, each field a resolver from ``resolvers/``."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import MaskErrors

from resolvers import mutations, queries, subscriptions
from resolvers.auth import IsAuthenticated
from schema.types import (
    Dataset,
    ExportPayload,
    ExportTask,
    ExportTaskConnection,
    ImportPayload,
    ImportTask,
    ImportTaskConnection,
)

_auth = [IsAuthenticated]


@strawberry.type
class Query:
    datasets: list[Dataset] = strawberry.field(resolver=queries.datasets, permission_classes=_auth)
    export_task: ExportTask | None = strawberry.field(resolver=queries.export_task, permission_classes=_auth)
    export_tasks: ExportTaskConnection = strawberry.field(resolver=queries.export_tasks, permission_classes=_auth)
    import_task: ImportTask | None = strawberry.field(resolver=queries.import_task, permission_classes=_auth)
    import_tasks: ImportTaskConnection = strawberry.field(resolver=queries.import_tasks, permission_classes=_auth)


@strawberry.type
class Mutation:
    request_export: ExportPayload = strawberry.mutation(resolver=mutations.request_export, permission_classes=_auth)
    cancel_export: ExportPayload = strawberry.mutation(resolver=mutations.cancel_export, permission_classes=_auth)
    retry_export: ExportPayload = strawberry.mutation(resolver=mutations.retry_export, permission_classes=_auth)
    delete_export: ExportPayload = strawberry.mutation(resolver=mutations.delete_export, permission_classes=_auth)
    request_import: ImportPayload = strawberry.mutation(resolver=mutations.request_import, permission_classes=_auth)
    start_import: ImportPayload = strawberry.mutation(resolver=mutations.start_import, permission_classes=_auth)
    cancel_import: ImportPayload = strawberry.mutation(resolver=mutations.cancel_import, permission_classes=_auth)


@strawberry.type
class Subscription:
    export_progress: ExportTask = strawberry.subscription(
        resolver=subscriptions.export_progress, permission_classes=_auth
    )
    import_progress: ImportTask = strawberry.subscription(
        resolver=subscriptions.import_progress, permission_classes=_auth
    )


def _is_unexpected(error: GraphQLError) -> bool:
    """Errors we raise on purpose carry a code; anything else is masked, so that no internal
    detail or stack trace reaches a client (it is logged instead)."""
    original = error.original_error
    if original is None:
        return False  # validation and parsing errors describe the client's query
    return not (error.extensions or {}).get("code") and not isinstance(original, GraphQLError)


schema = strawberry.Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    # A factory, so each request gets a fresh extension (Strawberry's advice for stateful ones).
    extensions=[
        lambda: MaskErrors(should_mask_error=_is_unexpected, error_message="Internal error; it has been logged.")
    ],
)
