"""create_app(settings): the FastAPI application. The lifespan loads and warms every model and starts its batcher."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.errors import StartupError, install_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.registry import ModelRegistry
from service.routes import health, models, vae
from service.security import APIKeyMiddleware, with_security_schemes
from service.settings import Settings, get_settings

logger = logging.getLogger("vae_serve")

DESCRIPTION = """Serves Variational Autoencoders (Kingma & Welling 2014) trained by `model/`.

Every `/v1` endpoint takes an optional model name (`model`); images go in as multipart uploads (field `image`) or
JSON (base64 or pixel arrays) and come back as JSON or, by `Accept` / `?format=`, PNG (or GIF for interpolation).
Errors always have the body `{"detail": "...", "code": "..."}`; see docs/api.md for the table."""


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with a mapping of its own, given back to the system when
    freed. Its default threshold rises after the first large free (up to 32 MiB), after which big buffers (request
    bodies, decoded images) come from per-thread heaps that keep them: a burst of large uploads left the process
    holding ~1 GB it no longer used (docs/reliability.md). False (and nothing done) without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class StartupMessage:
    """Pure ASGI: when start-up fails with a StartupError, the server logs its one line instead of a traceback."""

    def __init__(self, app: ASGIApp, holder: dict[str, str]) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and "error" in self.holder:
                message = {**message, "message": f"vae-serve cannot start: {self.holder['error']}"}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (default: from VAE_* environment variables, e.g. for
    `uvicorn --factory service.main:create_app`). Nothing is loaded until the lifespan starts."""
    settings = settings or get_settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, observer=metrics)
    startup: dict[str, str] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        return_freed_memory()
        try:
            await registry.start()
        except StartupError as e:
            startup["error"] = str(e)  # the server logs it (see StartupMessage)
            raise
        # What is alive now (torch, the app, the models: ~200k objects) lives as long as the server. Frozen, the
        # collector's full passes stop walking it: they took 50-100 ms each under load (docs/benchmarks.md).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await registry.stop()

    app = FastAPI(
        title="vae-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(vae.router)  # before models: routes are matched in order, and these are the hot ones
    app.include_router(models.router)
    if health.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=health.STATIC_DIR), name="static")
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, key=settings.api_key.get_secret_value())
        app.openapi = with_security_schemes(app.openapi)  # type: ignore[method-assign]
    if settings.cors_origins:
        # Outside the API key check, so a browser's preflight (which never carries the key) gets its answer.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Accept", "Authorization", "Content-Type", "X-API-Key"], expose_headers=["Retry-After"],
        )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(StartupMessage, holder=startup)
    return app
