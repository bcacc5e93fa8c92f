"""create_app(settings): the FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import __version__
from service.errors import install_handlers
from service.lifespan import StartupMessage, lifespan
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import with_definitions
from service.registry import ModelRegistry
from service.routes import admin, health, metrics, models, vae, web
from service.routing import add_routes, check_lean_inclusion
from service.security import APIKeyMiddleware, with_security_schemes
from service.settings import Settings, get_settings
from service.v2 import rest as v2

DESCRIPTION = """Serves Variational Autoencoders (Kingma & Welling 2014) trained by `model/`.

Every `/v1` endpoint takes an optional model name (`model`, in the query string or the body); images go in as
multipart uploads (field `image`) or JSON (base64 or pixel arrays) and come back as JSON or, by `Accept` /
`?format=`, PNG (or GIF for interpolation). Errors always have the body `{"detail": "...", "code": "..."}`; see
docs/api.md for the table."""


OPENAPI_TAGS = [
    {"name": "health", "description": "liveness, readiness and Prometheus metrics"},
    {"name": "vae", "description": "encode, decode, sample, reconstruct, score, interpolate, manifold"},
    {"name": "models", "description": "what is served: models, versions and their cards"},
    {"name": "admin", "description": "reload, load and unload models (only with an admin key)"},
    {"name": "v2", "description": "the Open Inference Protocol (KServe v2) over REST: health, metadata, inference"},
    {"name": "v2 repository", "description": "v2's model repository extension (only with an admin key)"},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (default: from VAE_* environment variables, e.g. for
    `uvicorn --factory service.main:create_app`). Nothing is loaded until the lifespan starts."""
    settings = settings or get_settings()
    registry_metrics = Metrics()
    registry = ModelRegistry(settings, observer=registry_metrics)
    startup: dict[str, str] = {}
    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN.
    app = FastAPI(  # /docs and /redoc: routes/web.py, with their assets served from here
        title="vae-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan(registry, startup),
        docs_url=None,
        redoc_url=None,
        # FastAPI asks OpenTelemetry for its global providers on every request unless told it is off
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
        openapi_tags=OPENAPI_TAGS,  # the docs' sections in this order, whatever order the routes are matched in
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = registry_metrics
    install_handlers(app)
    check_lean_inclusion(app)
    # Routes are matched in order. The probes, the verbs and v2 are the app's own routes (routing.add_routes: an
    # included router costs every request that passes it); the rest are included.
    add_routes(app, health.router)
    # v2 inference before the /v1 verbs: a request is matched against each route before its own (~2 us each), and
    # v2 infer was the 11th (docs/benchmarks.md, section 00000); /v1/encode is now the 6th. Neither path can match
    # the other's routes, so the order changes no answer.
    add_routes(app, v2.infer_router)
    add_routes(app, vae.router)
    add_routes(app, v2.router)  # the Open Inference Protocol's health and metadata (docs/protocols.md)
    app.include_router(models.router)
    app.include_router(admin.router)  # 404 for every call unless the settings hold an admin key
    app.include_router(v2.repository_router)  # its repository extension: 404s unless there is an admin key
    app.include_router(metrics.router)
    web.mount(app)
    app.openapi = with_definitions(app.openapi)  # type: ignore[method-assign]
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, key=settings.api_key.get_secret_value())
        app.openapi = with_security_schemes(app.openapi)  # type: ignore[method-assign]
    if settings.cors_origins:
        # Outside the API key check, so a browser's preflight (which never carries the key) gets its answer.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Accept", "Authorization", "Content-Type", "X-API-Key"],
            expose_headers=["Retry-After", "X-Input-Converted", vae.VERSION_HEADER, "shape", "dtype", "seed", "fields"],
        )
    app.add_middleware(MetricsMiddleware, metrics=registry_metrics)
    app.add_middleware(StartupMessage, holder=startup)
    return app
