"""The HTTP stack's cost per request, in process and without sockets: each app is called as uvicorn calls it (one
ASGI call per request, on one event loop), and the CPU time of the whole process is divided by the requests, so a
busy machine slows the figures less than it slows wall-clock load tests. Side by side:

    ours          service.main.create_app serving the checkpoint (batching on, as `python -m service` runs it)
    plain         bench/peers/plain_fastapi.py: the hand-written FastAPI app, one forward inline per request

for GET /healthz (the stack alone), POST /v1/encode with one PNG, and GET /v1/sample?n=1; and, for ours, the same
requests with each layer around the route taken away in turn, to say what each costs.

    python bench/stack.py --checkpoint checkpoints/mnist
    python bench/stack.py --checkpoint checkpoints/mnist --requests 4000 --repeat 5

Prints one table: CPU microseconds per request (median of --repeat rounds) and the ratio to the plain app.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.peers.common import Peer  # noqa: E402
from bench.peers.plain_fastapi import create_app as plain_app  # noqa: E402
from service.main import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

ASGIApp = Callable[..., Any]


def scope(method: str, target: str, headers: dict[str, str]) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: ASGIApp, method: str, target: str, headers: dict[str, str], body: bytes) -> int:
    """One request; returns its status."""
    sent_body = False
    status = 0
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope(method, target, headers), receive, send)
    return status


def requests(png: bytes) -> dict[str, tuple[str, str, dict[str, str], bytes]]:
    content_type, body = loadgen.multipart_body([png])
    return {
        "healthz": ("GET", "/healthz", {}, b""),
        "encode": ("POST", "/v1/encode", {"content-type": content_type, "content-length": str(len(body))}, body),
        "sample?n=1": ("GET", "/v1/sample?n=1&seed=0", {}, b""),
    }


async def cpu_us_per_request(app: ASGIApp, request: tuple[str, str, dict[str, str], bytes], n: int) -> float:
    method, target, headers, body = request
    for _ in range(20):  # warm-up
        assert await call(app, method, target, headers, body) == 200
    started = time.process_time()
    for _ in range(n):
        await call(app, method, target, headers, body)
    return (time.process_time() - started) / n * 1e6


def variants(checkpoint: Path) -> dict[str, Callable[[], Any]]:
    """Apps to measure: ours, plain, and ours without each layer around the route."""
    path = checkpoint.resolve()
    settings = Settings(models=[str(path)], default_model=path.name, warmup=True, grpc=False)

    def ours_without(*layers: str) -> Any:
        app = create_app(settings)
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in layers]
        return app

    return {
        "ours": lambda: create_app(settings),
        "ours, no MetricsMiddleware": lambda: ours_without("MetricsMiddleware"),
        "ours, no pure-ASGI middleware": lambda: ours_without("MetricsMiddleware", "StartupMessage"),
        "plain": lambda: plain_app(Peer(path)),
    }


async def measure(checkpoint: Path, png: bytes, n: int, repeat: int) -> dict[tuple[str, str], list[float]]:
    results: dict[tuple[str, str], list[float]] = {}
    apps = {name: make() for name, make in variants(checkpoint).items()}
    stacks = [app.router.lifespan_context(app) for app in apps.values()]
    for stack in stacks:
        await stack.__aenter__()  # the lifespan: ours loads and warms its model, starts its batcher
    try:
        for _ in range(repeat):  # interleaved: a busy moment hits every app alike
            for what, request in requests(png).items():
                for name, app in apps.items():
                    results.setdefault((what, name), []).append(await cpu_us_per_request(app, request, n))
    finally:
        for stack in stacks:
            await stack.__aexit__(None, None, None)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/mnist")
    p.add_argument("--requests", type=int, default=2000, help="requests per app and round")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both apps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    c, h, w = Peer(checkpoint).shape
    png = loadgen.digit_png((w, h), c)
    results = asyncio.run(measure(checkpoint, png, args.requests, args.repeat))
    print(f"\n{checkpoint.name}, torch threads {args.threads}; {loadgen.machine()}\n")
    rows = []
    for (what, name), values in results.items():
        plain = statistics.median(results[(what, "plain")])
        median = statistics.median(values)
        rows.append([what, name, f"{median:,.1f}", f"{median / plain:.2f}"])
    print(loadgen.table(["request", "app", "CPU µs/request", "vs plain"], rows, "llrr"))


if __name__ == "__main__":
    main()
