"""The ``/graphql`` endpoint: Strawberry's FastAPI router, made to refuse what it cannot read with a
400 and a coded error instead of a 500.

Request bodies are decoded with orjson, which refuses what Python's json module crashed on (a
4,301-digit number: ValueError; 100k nested brackets: RecursionError; bytes that are not UTF-8:
UnicodeDecodeError) and lone surrogates; nesting is further held to ``MAX_JSON_DEPTH``. A body
that is valid JSON but not an object (a string, ``null``, a number) is refused too (Strawberry
called ``.get`` on it). Every refusal of Strawberry's own (unsupported content type, batching, no
query, a mutation over GET) is answered as a GraphQL-shaped JSON body, ``extensions.code``
``BAD_REQUEST``, with its status (400, or 405 for other methods).

HTTP statuses, as GraphQL-over-HTTP has them: with ``Accept: application/json`` (what clients send
today) a request that reached GraphQL is answered 200 whatever its errors, a request refused by a
query limit included; a client that accepts ``application/graphql-response+json`` gets that media
type and 400 for a request error (unparsable, invalid, over a limit: no ``data``). A body over the
size limit is 413 (``api.request_limits``), whichever it accepts.

WebSockets: the token is checked in ``on_ws_connect`` (the hook Strawberry calls on
``connection_init``); the protocol handlers and the message bound are in ``api.websockets``.

HTTP requests reach the view without FastAPI's routing and dependency injection (``GraphQLHTTP``):
for a polled read those were ~15 % of the api's CPU (resolving the router's four dependencies, six
more ASGI layers, matching every route), and they added nothing the view does not do itself. The
view answers exactly as through the router's routes, which still serve WebSockets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from cross_web import HTTPException
from starlette.background import BackgroundTasks
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import GraphQLRouter
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.unset import UNSET, UnsetType

from api.auth import AuthError
from api.graphiql import graphiql_html
from api.request_limits import error_body
from api.websockets import CONNECTION_INIT_TIMEOUT, BoundedWebSocketAdapter, LegacyWSHandler, TransportWSHandler
from dataport import errors
from dataport.settings import Settings

MAX_JSON_DEPTH = 64
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"


def json_depth_exceeds(value: object, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` (iteratively: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class GraphQLView(GraphQLRouter):
    websocket_adapter_class = BoundedWebSocketAdapter  # type: ignore[assignment]
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(self, schema: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(schema, connection_init_wait_timeout=CONNECTION_INIT_TIMEOUT, **kwargs)
        self.settings = settings

    @property
    def graphql_ide_html(self) -> str:
        """GraphiQL with its scripts and styles served by Dataport, so it works offline (api/graphiql.py)."""
        return graphiql_html()

    # -- bodies -----------------------------------------------------------------------------------

    def decode_json(self, data: str | bytes) -> object:
        """orjson, with nesting held to MAX_JSON_DEPTH; refusals are ``JSONDecodeError`` (Strawberry
        answers those 400 over HTTP and closes a WebSocket with 4400)."""
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise json.JSONDecodeError(e.msg, e.doc if isinstance(e.doc, str) else "", e.pos) from None
        if json_depth_exceeds(value, MAX_JSON_DEPTH):
            raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0)
        return value

    def parse_json(self, data: str | bytes) -> Any:
        try:
            value = self.decode_json(data)
        except json.JSONDecodeError as e:
            raise HTTPException(400, f"The request is not valid JSON: {e.msg}.") from None
        if not isinstance(value, dict | list):
            raise HTTPException(400, "The request must be a JSON object: {query, variables, operationName}.")
        return value

    async def parse_http_body(self, request: Any) -> GraphQLRequestData | list[GraphQLRequestData]:
        data = await super().parse_http_body(request)
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item.operation_name, str | None):
                raise HTTPException(400, "The GraphQL operation's `operationName` must be a string or null.")
        return data

    # -- responses --------------------------------------------------------------------------------

    def create_response(self, response_data: Any, sub_response: Response) -> Response:
        """The router's response, its body encoded by orjson (Strawberry's json.dumps was ~2 % of
        a polled read's CPU). The same JSON, but for characters past ASCII, which are sent as UTF-8
        instead of escaped; a value orjson refuses (an integer past 64 bits) falls back to json."""
        try:
            body = orjson.dumps(response_data)
        except TypeError:
            encoded = self.encode_json(response_data)
            body = encoded.encode() if isinstance(encoded, str) else encoded
        response = Response(body, media_type="application/json", status_code=sub_response.status_code or 200)
        response.headers.raw.extend(sub_response.headers.raw)
        return response

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response = await super().process_result(request, result)
        if isinstance(result, PreExecutionError) and _accepts_graphql_response(request):
            request.state.graphql_request_error = True
            response.pop("data", None)  # a request error has no data entry
        return response

    async def run(self, request: Any, context: Any = UNSET, root_value: Any = UNSET) -> Any:
        if self.is_websocket_request(request):
            return await super().run(request, context, root_value)
        try:
            response = await super().run(request, context, root_value)
        except HTTPException as e:
            return Response(
                error_body(e.reason, errors.BAD_REQUEST), status_code=e.status_code, media_type="application/json"
            )
        if _accepts_graphql_response(request) and response.media_type == "application/json":
            response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
            if getattr(request.state, "graphql_request_error", False):
                response.status_code = 400
        return response

    async def handle_http(self, request: Request, context: Any) -> Response:
        """What the router's GET and POST routes do with a request (``GraphQLHTTP``): the context
        gets the request, a sub-response and background tasks as FastAPI's dependency gave them."""
        sub_response = Response()  # as FastAPI injects one: no content-length, no status
        del sub_response.headers["content-length"]
        sub_response.status_code = None  # type: ignore[assignment]
        context.request, context.response, context.background_tasks = request, sub_response, BackgroundTasks()
        self.temporal_response = sub_response  # what the router's get_sub_response returns
        try:
            response = await self.run(request, context=context, root_value=None)
        except HTTPException as e:
            response = PlainTextResponse(e.reason, status_code=e.status_code)
        if response.background is None:
            response.background = context.background_tasks
        return response

    # -- WebSockets -------------------------------------------------------------------------------

    async def on_ws_connect(self, context: Any) -> UnsetType | dict[str, object] | None:
        """connection_init: acknowledged only with a valid token in its payload (or on the upgrade),
        verified here once for the socket's life."""
        await context.authenticate()
        try:
            _ = context.credentials
        except AuthError as e:
            error = {"message": str(e), "extensions": {"code": errors.UNAUTHENTICATED}}
            raise ConnectionRejectionError(error) from None
        return UNSET


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GraphQLHTTP:
    """ASGI middleware, innermost of api/app.py's: a GET or POST to ``path`` goes straight to the
    view's ``handle_http`` with the context ``context_getter`` makes; everything else (WebSockets
    too) goes on to the app's routes."""

    def __init__(
        self,
        app: ASGIApp,
        view: GraphQLView,
        context_getter: Callable[[HTTPConnection], Awaitable[Any]],
        path: str = "/graphql",
    ) -> None:
        self.app = app
        self.view = view
        self.context_getter = context_getter
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] not in ("GET", "POST"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        response = await self.view.handle_http(request, await self.context_getter(request))
        await response(scope, receive, send)


def _accepts_graphql_response(request: Request) -> bool:
    return GRAPHQL_RESPONSE_JSON in request.headers.get("accept", "")
