"""The FastAPI app: GraphQL (HTTP + WebSocket, GraphiQL, size-limited), signed downloads, health, dev tokens."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import HTTPConnection, Request
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from api import downloads, stream, uploads
from api.admission import Admission
from api.auth import Authenticator, claim_value, issue_token
from api.context import Context
from api.graphql_errors import RETRY_AFTER_SECONDS, STORE_DOWN, STORE_DOWN_MESSAGE
from api.graphql_view import GraphQLHTTP, GraphQLView
from api.metrics import ServiceMetrics, exposition
from api.readiness import Readiness
from api.request_limits import VERIFIED, RequestSizeLimit
from audit.outbox import RequestActor
from dataport import errors
from dataport.settings import Settings, get_settings
from schema import schema
from sources.registry import Registry
from tasks.fanout import TaskFanout
from tasks.services import Services

log = logging.getLogger("dataport.api")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    # The one token verifier (api/auth.py), shared by GraphQL, WebSockets and the plain routes.
    authenticator = Authenticator(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.services = await Services.start(settings, registry)
        # Every subscription of this process shares one Redis subscription (tasks/fanout.py).
        fanout = app.state.services.fanout = TaskFanout.connect(app.state.services.redis, settings.redis_url)
        await fanout.start()
        try:
            yield
        finally:
            await fanout.stop()
            await app.state.services.close()
            await authenticator.aclose()

    app = FastAPI(title="Dataport", lifespan=lifespan, docs_url=None, redoc_url=None)

    app.state.authenticator = authenticator

    async def context(connection: HTTPConnection) -> Context:
        """An HTTP request's token is verified here (api/request_limits.py did, for /graphql); a
        WebSocket's when its connection_init arrives (api/graphql_view.py)."""
        ctx = Context(connection.app.state.services, authenticator)
        ctx.request = connection
        if connection.scope["type"] == "http":
            await ctx.authenticate(connection.scope.get("state", {}).get(VERIFIED))
        return ctx

    # api/graphql_view.py: bodies it cannot read are 400s, WebSockets need a token to be acknowledged.
    graphql = GraphQLView(
        schema,
        settings,
        context_getter=context,
        graphql_ide="graphiql",
        subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL],
    )
    app.include_router(graphql, prefix="/graphql")  # its WebSockets; HTTP is GraphQLHTTP's, below
    # Innermost: GET and POST /graphql go straight to the view, past FastAPI's routing and
    # dependency injection (api/graphql_view.py), after admission control like every request.
    app.add_middleware(GraphQLHTTP, view=graphql, context_getter=context)
    # Past capacity, 503 + Retry-After at once (api/admission.py); inside the size limit, so a body
    # is read before its request takes a slot.
    app.add_middleware(Admission, settings=settings)
    # A body over the limit is refused before it is read whole (api/request_limits.py).
    app.add_middleware(RequestSizeLimit, settings=settings, authenticator=authenticator)
    # Outermost: audit records made while serving a request name its address and user agent.
    app.add_middleware(RequestActor)

    app.include_router(stream.router)
    app.include_router(uploads.router)
    app.include_router(downloads.router)

    @app.exception_handler(STORE_DOWN[0])
    @app.exception_handler(STORE_DOWN[1])
    async def store_down(request: Request, e: Exception) -> JSONResponse:
        """Redis down (after redis-py's retries): the plain routes say so, as GraphQL does."""
        log.warning("%s %s: the task store is down (%s: %s)", request.method, request.url.path, type(e).__name__, e)
        return JSONResponse(
            {"error": {"code": errors.SERVICE_UNAVAILABLE, "message": STORE_DOWN_MESSAGE}},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    service_metrics = ServiceMetrics()

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text format: this process's metrics and the service's, read from Redis."""
        body = await exposition(request.app.state.services, service_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz():
        # pid: which of `dataport api --workers N`'s processes answered (api/serve.py).
        return {"status": "ok", "pid": os.getpid()}

    app.state.readiness = Readiness()

    @app.get("/readyz")
    async def readyz(request: Request):
        """Redis, storage and every dataset's source, checked side by side (api/readiness.py);
        503 when any of them fails."""
        report = await request.app.state.readiness.report(request.app.state.services)
        return JSONResponse(report.body, status_code=200 if report.ready else 503)

    @app.get("/auth/config")
    async def auth_config():
        """What the browser page needs to offer sign-in through the identity provider
        (authorization code + PKCE, a public client): nulls when no provider is configured."""
        configured = bool(settings.oidc_issuer and settings.oidc_client_id)
        return {
            "issuer": settings.oidc_issuer or None,
            "clientId": settings.oidc_client_id or None,
            "audience": settings.oidc_audience or None,
            "scopes": settings.oidc_scopes if configured else None,
        }

    if settings.dev_mode:

        @app.post("/dev/token", response_class=PlainTextResponse)
        async def dev_token(
            user: str = "dev",
            email: str | None = None,
            role: list[str] = Query(default=[]),
            claim: list[str] = Query(default=[]),
        ):
            """A token as ``dataport token`` makes one: ``?role=analyst&claim=org=acme``."""
            claims = {name: claim_value(value) for name, _, value in (c.partition("=") for c in claim)}
            if any(name in ("sub", "iat", "exp", "iss") for name in claims):
                raise HTTPException(400, "sub, iat, exp and iss are set by the route itself.")
            return issue_token(settings, user, email, roles=role, claims=claims)

    if WEB_DIR.is_dir():  # the browser client's modules and styles; `/` serves its page
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/")
    async def index():
        page = WEB_DIR / "index.html"
        if page.exists():
            return FileResponse(page)
        return PlainTextResponse("Dataport is running. GraphQL: /graphql\n")

    return app
