"""Annotated dependency aliases over app.state, as the FastAPI template's api/deps.py has them.

`async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per request. The API
key is checked before routing, by service.security.APIKeyMiddleware."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


# The getters service/routing.LeanRoute may call itself, without FastAPI's dependency solving: each takes only the
# Request and reads app.state.
STATE_GETTERS = frozenset({get_settings, get_registry, get_metrics})

SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
