"""Prometheus metrics: a pure-ASGI middleware for requests, and the registry's and batchers' observer. One registry per
app."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.registry import RegistryObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RETIRED_KEPT = 4  # series of unloaded versions kept per model (a scrape or two sees their last counts), then dropped


class RequestStats(Collector):
    """Requests by method, route template and status: a count, a latency histogram and the number in flight, kept
    in plain Python and turned into Prometheus metric families when scraped. Every request pays this, and
    prometheus_client's own Counter/Histogram/Gauge take a lock per update: ~10 us a request together, against ~1 us
    here (bench/stack.py). Updated and read on the event loop only."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], list[Any]] = {}  # key -> [count, sum of seconds, per-bucket counts]
        self.in_flight = 0

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path, str(status))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
        series[0] += 1
        series[1] += seconds
        series[2][bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: a value equal to a bound falls in its bucket

    def collect(self) -> Iterator[Any]:
        labels = ["method", "path", "status"]
        requests = CounterMetricFamily("vae_http_requests", "HTTP requests by endpoint and status", labels=labels)
        latency = HistogramMetricFamily(
            "vae_http_request_duration_seconds", "HTTP request latency by endpoint and status", labels=labels
        )
        for key, (count, total, per_bucket) in list(self.series.items()):
            requests.add_metric(list(key), count)
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), per_bucket, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            latency.add_metric(list(key), buckets, total)
        yield requests
        yield latency
        yield GaugeMetricFamily("vae_http_requests_in_flight", "requests being handled", value=self.in_flight)


class VersionSeries:
    """One model version's requests: answered (and their latency) or failed. The request holding the version counts
    itself when it releases it (ServedModel.record): ~0.3 us, on the event loop."""

    __slots__ = ("answered", "failed", "seconds", "buckets")

    def __init__(self) -> None:
        self.answered = 0
        self.failed = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def __call__(self, seconds: float | None) -> None:
        if seconds is None:
            self.failed += 1
            return
        self.answered += 1
        self.seconds += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class VersionStats(Collector):
    """Requests by model and version, `vae_model_requests_total{model, version, outcome}`, and the latency of the
    answered ones from the version chosen to the response ready, `vae_model_request_duration_seconds{model,
    version}`. The label values stay bounded: the versions serving, plus the RETIRED_KEPT last unloaded per model."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], VersionSeries] = {}
        self.live: dict[
            tuple[str, str], int
        ] = {}  # served versions per key (a replaced version overlaps its successor)
        self.retired: dict[str, list[str]] = {}

    def serving(self, model: str, version: str) -> VersionSeries:
        key = (model, version)
        self.live[key] = self.live.get(key, 0) + 1
        retired = self.retired.get(model, [])
        if version in retired:
            retired.remove(version)
        return self.series.setdefault(key, VersionSeries())

    def unloaded(self, model: str, version: str) -> None:
        key = (model, version)
        self.live[key] = self.live.get(key, 1) - 1
        if self.live[key] > 0:
            return
        del self.live[key]
        retired = self.retired.setdefault(model, [])
        retired.append(version)
        while len(retired) > RETIRED_KEPT:
            self.series.pop((model, retired.pop(0)), None)

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "vae_model_requests", "requests by model version and outcome (ok, error)", labels=[*labels, "outcome"]
        )
        latency = HistogramMetricFamily(
            "vae_model_request_duration_seconds", "answered requests' time from the version chosen on", labels=labels
        )
        for key, series in list(self.series.items()):
            requests.add_metric([*key, "ok"], series.answered)
            requests.add_metric([*key, "error"], series.failed)
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), series.buckets, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            latency.add_metric(list(key), buckets, series.seconds)
        yield requests
        yield latency


class Metrics(RegistryObserver):
    """The app's collectors; also the registry's and the MicroBatchers' observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http = RequestStats()
        self.registry.register(self.http)
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
        self._queues: dict[str, Any] = {}
        self._batches: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.versions = VersionStats()
        self.registry.register(self.versions)
        self.loads = Counter(
            "vae_model_loads",
            "loads and reloads of a model, by result (ok, failed: the versions serving before still serve)",
            ["model", "result"],
            registry=self.registry,
        )
        self.load_failing = Gauge(
            "vae_model_load_failing",
            "1 while the model's last load or reload failed",
            ["model"],
            registry=self.registry,
        )
        self.versions_loaded = Gauge(
            "vae_model_versions_loaded", "versions of the model serving", ["model"], registry=self.registry
        )
        self.grpc_requests = Counter(
            "vae_grpc_requests",
            "gRPC calls (Open Inference Protocol) by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_seconds = Histogram(
            "vae_grpc_request_duration_seconds",
            "gRPC call latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def grpc_request(self, method: str, code: str, seconds: float) -> None:
        self.grpc_requests.labels(method, code).inc()
        self.grpc_seconds.labels(method).observe(seconds)

    # BatchObserver
    def batch(self, model: str, op: str, size: int, seconds: float) -> None:
        # Each series looked up once: labels() takes a lock and validates its arguments on every call. Called from
        # the worker thread and, for lone requests, the event loop: both would store the same children.
        series = self._batches.get((model, op))
        if series is None:
            args = (model, op)
            series = self._batches[args] = (
                self.batch_size.labels(*args),
                self.forward_seconds.labels(*args),
                self.images.labels(*args),
            )
        sizes, durations, images = series
        sizes.observe(size)
        durations.observe(seconds)
        images.inc(size)

    def queue_depth(self, model: str, images: int) -> None:
        gauge = self._queues.get(model)
        if gauge is None:
            gauge = self._queues[model] = self.queue.labels(model)
        gauge.set(images)

    # RegistryObserver
    def version_loaded(self, model: str, version: str) -> Callable[[float | None], None]:
        return self.versions.serving(model, version)

    def version_unloaded(self, model: str, version: str) -> None:
        self.versions.unloaded(model, version)

    def load_result(self, model: str, ok: bool) -> None:
        self.loads.labels(model, "ok" if ok else "failed").inc()
        self.load_failing.labels(model).set(0 if ok else 1)

    def versions_served(self, model: str, count: int) -> None:
        self.versions_loaded.labels(model).set(count)


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

        stats = self.metrics.http
        stats.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            stats.in_flight -= 1
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            stats.observe(scope["method"], path, status, time.perf_counter() - started)
