"""Loopback benchmark of micro-batching: requests/s and latency of single-image `POST /v1/encode` from N concurrent
clients, with batching on and then off (`--batching` / `--no-batching`), against a given checkpoint.

    python bench/batching.py --checkpoint checkpoints/mnist --concurrency 64 --duration 15

Each mode starts `python -m service` on a free loopback port, waits for /readyz, warms up, then runs N client
connections (bench/loadgen.py: HTTP/1.1 keep-alive, each sending its next request when the previous answer arrives)
until --requests answers or --duration seconds, whichever comes first, and prints one table row per mode. The load
generator costs far less CPU than the server, but it shares the machine: on a small or busy host, figures are noisy
and relative, not absolute.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen  # noqa: E402


def scrape_batches(port: int, op: str = "encode") -> tuple[float, float]:
    """(images, forward passes) of `op` so far, from /metrics."""
    text = loadgen.fetch(port, "/metrics").decode()
    pattern = 'vae_batch_size_{}\\{{model="[^"]+",op="' + op + '"\\}} ([0-9.e+]+)'
    found = [re.search(pattern.format(key), text) for key in ("sum", "count")]
    return (float(found[0].group(1)), float(found[1].group(1))) if found[0] and found[1] else (0.0, 0.0)


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> str:
    images, passes = after[0] - before[0], after[1] - before[1]
    return f"{images / passes:.1f}" if passes > 0 else "-"


def run_mode(args: argparse.Namespace, mode: str, image: bytes) -> list[list[object]]:
    port = loadgen.free_port()
    flags = [
        "--cpu-threads",
        str(args.server_threads),
        "--max-batch-size",
        str(args.max_batch_size),
        "--batching" if mode == "on" else "--no-batching",
    ]
    with loadgen.Server(f"batching {mode}", loadgen.service_command(args.checkpoint, port, *flags), port, "/readyz"):
        encode = loadgen.multipart_request(port, "/v1/encode", [image])
        loadgen.run(port, encode, args.concurrency, 200, args.warmup)
        rows = []
        if args.healthz:
            health = loadgen.run(
                port, loadgen.get_request(port, "/healthz"), args.concurrency, args.requests, args.duration
            )
            rows.append([*loadgen.load_row(f"{mode}: /healthz", health), "-"])
        before = scrape_batches(port)
        result = loadgen.run(port, encode, args.concurrency, args.requests, args.duration)
        rows.append([*loadgen.load_row(f"batching {mode}", result), mean_batch(before, scrape_batches(port))])
        return rows


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
    c, h, w = card["config"]["input_shape"]
    image = loadgen.digit_png((w, h), c)
    rows = []
    for mode in args.modes:
        rows += run_mode(args, mode, image)
    print(f"\n{len(image)}-byte PNG, server torch threads {args.server_threads}; {loadgen.machine()}\n")
    print(loadgen.table(["mode", *loadgen.LOAD_HEADERS[1:], "mean batch"], rows))


if __name__ == "__main__":
    main()
