"""The server's life: start-up (load and warm every model, tune the process's memory for a long-lived server: see
service.memory) and shutdown, and the one-line message a failed start-up leaves instead of a traceback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import memory, torch_threads
from service.errors import StartupError
from service.registry import ModelRegistry
from service.v2 import grpc_server


def lifespan(
    registry: ModelRegistry, startup: dict[str, str]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the registry started, then the gRPC service when the settings ask for it (a
    StartupError's message kept in `startup` for StartupMessage); on shutdown, after the HTTP server has drained,
    the gRPC service drains (graceful_shutdown_s at most) before the models stop."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        memory.tune_malloc()
        settings = registry.settings
        grpc = None
        try:
            await registry.start()
            torch_threads.run_alone()  # the event loop's torch ops (rendering, stacking) stay off OpenMP teams
            if settings.grpc:
                grpc = await grpc_server.start(registry, settings, app.state.metrics)
        except StartupError as e:
            startup["error"] = str(e)
            await registry.stop()
            raise
        app.state.grpc_port = grpc.port if grpc is not None else None
        trimmer = asyncio.get_running_loop().create_task(memory.trim_after_growth(), name="trim-heap")
        try:
            with memory.collector_for_serving():
                yield
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
            if grpc is not None:
                await grpc.stop(settings.graceful_shutdown_s)
            await registry.stop()

    return run


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
