"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import RegistryDep
from service.errors import error_response
from service.routing import LeanRoute
from service.schemas import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"], route_class=LeanRoute)


HEALTHY = Health(status="ok").model_dump_json().encode()


@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    """The process is alive (says nothing about the models)."""
    # The schema's JSON, written once: probes call this every few seconds, and it measures the stack's own cost.
    return Response(HEALTHY, media_type="application/json")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}})
async def readyz(registry: RegistryDep) -> Response:
    """200 once every model is loaded and warm; 503 before that and while shutting down."""
    if not registry.ready:
        return error_response(503, "not_ready", "models are not loaded and warmed up yet")
    return JSONResponse({"status": "ready", "models": list(registry.models)})
