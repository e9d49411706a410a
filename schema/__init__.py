"""The GraphQL schema: the contract's root types, each field a resolver from ``resolvers/``."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.types import ExecutionContext

from api.graphql_cache import CachedDocuments
from api.graphql_errors import MaskUnexpectedErrors, code_client_errors, forget_tracebacks, log_errors
from api.graphql_executor import Executor
from api.graphql_limits import GraphQLLimits
from resolvers import audit, mutations, queries, subscriptions
from resolvers.auth import IsAuthenticated
from schema.types import (
    AuditEventConnection,
    Dataset,
    ExportPayload,
    ExportTask,
    ExportTaskConnection,
    ImportPayload,
    ImportTask,
    ImportTaskConnection,
    TaskUpdate,
)

_auth = [IsAuthenticated]


@strawberry.type
class Query:
    datasets: list[Dataset] = strawberry.field(resolver=queries.datasets, permission_classes=_auth)
    export_task: ExportTask | None = strawberry.field(resolver=queries.export_task, permission_classes=_auth)
    export_tasks: ExportTaskConnection = strawberry.field(resolver=queries.export_tasks, permission_classes=_auth)
    import_task: ImportTask | None = strawberry.field(resolver=queries.import_task, permission_classes=_auth)
    import_tasks: ImportTaskConnection = strawberry.field(resolver=queries.import_tasks, permission_classes=_auth)
    audit_events: AuditEventConnection = strawberry.field(resolver=audit.audit_events, permission_classes=_auth)


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
    task_updates: TaskUpdate = strawberry.subscription(
        resolver=subscriptions.task_updates,
        permission_classes=_auth,
        description="Every change of the caller's tasks: their active tasks as they are now, then each change.",
    )


class Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """A traceback for our own failures only, never for a refused request (api/graphql_errors.py);
        then none kept (``forget_tracebacks``)."""
        code_client_errors(errors)
        log_errors(errors)
        forget_tracebacks(errors)


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    # Factories and classes, so each request gets fresh extensions (Strawberry's advice for stateful
    # ones). The limits come first: a refused document is never validated in full.
    extensions=[
        GraphQLLimits,
        CachedDocuments,  # after the limits: their parser options are part of its key
        MaskUnexpectedErrors,
    ],
    # A subscription's selection runs once per task snapshot per process, not once per subscriber;
    # and no execution is left for the cyclic collector (api/graphql_executor.py).
    execution_context_class=Executor,
)
