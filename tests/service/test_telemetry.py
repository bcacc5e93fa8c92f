"""`otel` (VAE_OTEL): FastAPI's native OpenTelemetry is used only when turned on; off, FastAPI never asks for the
global providers on a request."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider
from service_helpers import serve

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("otel", [False, True])
async def test_requests_are_traced_only_with_otel_on(
    settings_for: Any, monkeypatch: pytest.MonkeyPatch, otel: bool
) -> None:
    provider = NoOpTracerProvider()  # a configured provider (not the API's deferred default)
    looked_up = []

    def get_tracer_provider() -> trace.TracerProvider:
        looked_up.append(1)
        return provider

    monkeypatch.setattr(trace, "get_tracer_provider", get_tracer_provider)
    async with serve(settings_for(otel=otel)) as (_, client):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/sample?n=1")).status_code == 200
    assert bool(looked_up) == otel  # asked for on every request when on, never when off
    if otel:
        assert len(looked_up) >= 2
