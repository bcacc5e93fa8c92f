"""Liveness, readiness, Prometheus metrics, and the web page at /."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse

from service.deps import MetricsDep, RegistryDep
from service.errors import error_response
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorResponse, Health, Readiness

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (says nothing about the models)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}})
async def readyz(registry: RegistryDep) -> Response:
    """200 once every model is loaded and warm; 503 before that and while shutting down."""
    if not registry.ready:
        return error_response(503, "not_ready", "models are not loaded and warmed up yet")
    return JSONResponse({"status": "ready", "models": list(registry.models)})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format: requests and latency per endpoint and status, batch sizes, queue depth, images."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False, response_model=None)
async def index() -> Response:
    """service/static/index.html when present, else a pointer to the API docs."""
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page)
    return JSONResponse({"service": "vae-serve", "docs": "/docs", "models": "/v1/models"})
