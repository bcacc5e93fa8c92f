"""Access to app.state for the routes: Annotated dependency aliases, and plain accessors for the hot path.

The model verbs (routes/vae.py) call `registry(request)` / `settings(request)` directly: every FastAPI dependency
is one more resolution step per request, and those routes are the ones measured by requests/s. The API key is
checked before routing, by service.security.APIKeyMiddleware.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


def settings(request: Request) -> Settings:
    value: Settings = request.app.state.settings
    return value


def registry(request: Request) -> ModelRegistry:
    value: ModelRegistry = request.app.state.registry
    return value


async def get_settings(request: Request) -> Settings:
    return settings(request)


async def get_registry(request: Request) -> ModelRegistry:
    return registry(request)


async def get_metrics(request: Request) -> Metrics:
    value: Metrics = request.app.state.metrics
    return value


# `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per request.
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
