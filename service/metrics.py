"""Prometheus metrics: a pure-ASGI middleware for requests, and the batcher's observer. One registry per app."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import BatchObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(BatchObserver):
    """The app's collectors; also the MicroBatcher's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vae_http_requests",
            "HTTP requests by endpoint and status",
            ["method", "path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vae_http_request_duration_seconds",
            "HTTP request latency by endpoint and status",
            ["method", "path", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("vae_http_requests_in_flight", "requests being handled", registry=self.registry)
        self.batch_size = Histogram(
            "vae_batch_size",
            "images per forward pass",
            ["model", "op"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "vae_forward_duration_seconds",
            "time of one batched forward pass",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "vae_images_processed",
            "images (or latents) through forward passes",
            ["model", "op"],
            registry=self.registry,
        )
        self.queue = Gauge("vae_queue_depth", "images waiting for a forward pass", ["model"], registry=self.registry)
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._queues: dict[str, Any] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path, str(status))
        children = self._children.get(key)
        if children is None:  # label lookups take a lock; cache the children per label set
            children = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    # BatchObserver
    def batch(self, model: str, op: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model, op).observe(size)
        self.forward_seconds.labels(model, op).observe(seconds)
        self.images.labels(model, op).inc(size)

    def queue_depth(self, model: str, images: int) -> None:
        gauge = self._queues.get(model)
        if gauge is None:
            gauge = self._queues[model] = self.queue.labels(model)
        gauge.set(images)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): counts and times each HTTP request by its route template and status.
    Requests matching no route are labelled `path="other"` so scanners cannot blow up the label set."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.observe_request(scope["method"], path, status, time.perf_counter() - started)
