"""GET /metrics: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import MetricsDep
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format: requests and latency per endpoint and status, batch sizes, queue depth, images."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)
