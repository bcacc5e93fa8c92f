"""Loopback benchmark of micro-batching: requests/s and latency of single-image `POST /v1/encode` from N concurrent
clients, with batching on and then off (`--batching` / `--no-batching`), against a given checkpoint.

    python bench/batching.py --checkpoint checkpoints/mnist --concurrency 64 --duration 15

Each mode starts `python -m service` on a free loopback port, waits for /readyz, warms up, then runs N client
connections (HTTP/1.1 keep-alive, each sending its next request when the previous answer arrives) until
--requests answers or --duration seconds, whichever comes first, and prints one table row per mode. The clients are
plain asyncio sockets with a pre-built multipart request, so the load generator costs far less CPU than the server
(it still shares the machine: on a small or busy host, figures are noisy and relative, not absolute).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "vae-bench-boundary"


@dataclass
class Result:
    mode: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    mean_batch: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digit_png(size: tuple[int, int]) -> bytes:
    """A small grey-level PNG at the model's input size (decoding it is part of the request's cost)."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("L", (w, h), 0)
    ImageDraw.Draw(image).ellipse((w * 0.25, h * 0.15, w * 0.75, h * 0.85), outline=255, width=max(1, w // 9))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_request(port: int, image: bytes) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /v1/encode HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if match is None:
        raise RuntimeError("benchmark client expects Content-Length responses")
    await reader.readexactly(int(match.group(1)))
    return status


async def load(port: int, request: bytes, clients: int, max_requests: int, duration: float) -> Result:
    result = Result(mode="")
    budget = max_requests
    deadline = time.perf_counter() + duration

    async def one_client() -> None:
        nonlocal budget
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while budget > 0 and time.perf_counter() < deadline:
                budget -= 1
                started = time.perf_counter()
                writer.write(request)
                try:
                    status = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    result.errors += 1
                    return
                result.latencies.append(time.perf_counter() - started)
                if status != 200:
                    result.errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def scrape_batches(port: int) -> tuple[float, float]:
    """(images, forward passes) of the encode op so far, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = [
        re.search(rf'vae_batch_size_{key}\{{model="[^"]+",op="encode"\}} ([0-9.e+]+)', text) for key in ("sum", "count")
    ]
    return (float(found[0].group(1)), float(found[1].group(1))) if found[0] and found[1] else (0.0, 0.0)


def start_server(args: argparse.Namespace, port: int, batching: bool) -> subprocess.Popen[bytes]:
    ckpt = Path(args.checkpoint).resolve()
    command = [
        sys.executable, "-m", "service", "--models", str(ckpt), "--default-model", ckpt.name,
        "--port", str(port), "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning",
        "--cpu-threads", str(args.server_threads), "--max-batch-size", str(args.max_batch_size),
        "--batching" if batching else "--no-batching",
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit("server not ready within 120 s")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def run_mode(args: argparse.Namespace, mode: str, image: bytes) -> list[Result]:
    port = free_port()
    server = start_server(args, port, batching=mode == "on")
    try:
        encode = encode_request(port, image)
        asyncio.run(load(port, encode, args.concurrency, 200, args.warmup))
        rows = []
        if args.healthz:
            health = asyncio.run(load(port, get_request(port, "/healthz"), args.concurrency, args.requests,
                                      args.duration))  # fmt: skip
            health.mode = f"{mode}: /healthz"
            rows.append(health)
        images0, passes0 = scrape_batches(port)
        result = asyncio.run(load(port, encode, args.concurrency, args.requests, args.duration))
        images1, passes1 = scrape_batches(port)
        result.mode = f"batching {mode}"
        result.mean_batch = (images1 - images0) / (passes1 - passes0) if passes1 > passes0 else None
        rows.append(result)
        return rows
    finally:
        stop_server(server)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(rows: list[Result], clients: int) -> str:
    lines = [
        "| mode | clients | requests | errors | req/s | p50 ms | p90 ms | p99 ms | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = [v * 1000 for v in r.latencies]
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
        lines.append(
            f"| {r.mode} | {clients} | {len(r.latencies)} | {r.errors} | {len(r.latencies) / r.seconds:.0f} | "
            f"{statistics.median(ms):.1f} | {percentile(ms, 90):.1f} | {percentile(ms, 99):.1f} | {batch} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory to serve")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent client connections")
    p.add_argument("--requests", type=int, default=20000, help="stop after this many answers (per mode)")
    p.add_argument("--duration", type=float, default=10.0, help="stop after this many seconds (per mode)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    p.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--server-threads", type=int, default=1, help="the server's torch CPU threads")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--healthz", action="store_true", help="also measure GET /healthz (the server's own ceiling)")
    args = p.parse_args(argv)
    card = json.loads((Path(args.checkpoint) / "model_card.json").read_text())
    _, h, w = card["config"]["input_shape"]
    image = digit_png((w, h))
    rows = []
    for mode in args.modes:
        rows += run_mode(args, mode, image)
    print(f"\n{len(image)}-byte PNG, {os.cpu_count()} CPU(s), server torch threads {args.server_threads}\n")
    print(report(rows, args.concurrency))


if __name__ == "__main__":
    main()
