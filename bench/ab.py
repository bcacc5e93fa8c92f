"""Two or more builds of the service, side by side under one load: which is faster, as a ratio of medians.

    python bench/ab.py encode 64 before=/tmp/wt-before after=. --rounds 5

Each NAME=DIR is a source tree (a git worktree of another commit, or this one) started as `python -m service` on
the same checkpoint and flags, plus any given after `+` (`one=.+--cpu-threads=1`); NAME=plain is the hand-written
FastAPI app of bench/serving.py instead (bench/peers/plain_fastapi.py, in the peers' environment), for the loads it
serves (encode, sample?n=1, healthz). Every round drives each server in turn with the same load for --seconds (after
--warmup unmeasured), reversing the order every other round so that a machine getting faster or slower hits all
alike; the table gives each build's median req/s and p50, its ratio to the first build's median, and the median
(and range) of its per-round ratios to the first build, req/s and p50, each round's pair measured back to back. On a
shared 2-core machine a change under ~5 % needs more rounds than that to tell from noise (docs/benchmarks.md, 0000):
many short rounds (--rounds 20 --seconds 1.5) read the per-round ratios best.

Loads: encode, sample?n=1, healthz (as bench/serving.py sends them), bulk encode (--bulk-images PNGs), and the binary
path: tensor (one uint8 image as a raw /v1/encode body), bulk tensor, v2 (one image, v2 binary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen  # noqa: E402
from bench.serving import requests_for, server_command, v1_tensor_request, v2_binary_request  # noqa: E402

KINDS = ("encode", "sample?n=1", "healthz", "bulk encode", "tensor", "bulk tensor", "v2")


def loads(port: int, checkpoint: Path, bulk: int) -> dict[str, bytes]:
    """Every load's request for the server on `port`, at the checkpoint's input size."""
    c, h, w = json.loads((checkpoint / "model_card.json").read_text())["input"]["shape"]
    png, pixels = loadgen.digit_png((w, h), c), loadgen.digit_pixels((w, h), c)
    many = pixels[None].repeat(bulk, axis=0)
    return requests_for("ours", port, png, bulk) | {
        "tensor": v1_tensor_request(port, pixels[None], checkpoint.name),
        "bulk tensor": v1_tensor_request(port, many, checkpoint.name),
        "v2": v2_binary_request(port, pixels[None], checkpoint.name),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("load", choices=KINDS)
    p.add_argument("clients", type=int)
    p.add_argument(
        "builds",
        nargs="+",
        metavar="NAME=DIR[+FLAG...]",
        help="source trees to compare, the first the reference; each may add its own server flags after +, "
        "e.g. one=.+--cpu-threads=1",
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist-fast", help="checkpoint directory every build serves")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per server per round")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each measurement")
    p.add_argument("--bulk-images", type=int, default=256, help="images per bulk request (and max batch size)")
    args = p.parse_args(argv)
    builds = [spec.split("=", 1) for spec in args.builds]
    if any(
        len(b) != 2 or not (b[1] == "plain" or (Path(b[1].split("+")[0]) / "service" / "__main__.py").is_file())
        for b in builds
    ):
        p.error("each build is NAME=plain or NAME=DIR[+FLAG...], DIR a vae-serve source tree (service/__main__.py)")
    if any(b[1] == "plain" for b in builds) and args.load not in ("encode", "sample?n=1", "healthz"):
        p.error("the plain app serves encode, sample?n=1 and healthz only")
    checkpoint = Path(args.checkpoint).resolve()
    servers: dict[str, loadgen.Server] = {}
    requests: dict[str, bytes] = {}
    results: dict[str, list[loadgen.Result]] = {name: [] for name, _ in builds}
    try:
        for name, spec in builds:
            port = loadgen.free_port()
            directory, *extra = spec.split("+")
            # bench/serving.py's commands: a source tree as its ours-baseline (bulk requests one forward pass, no
            # gRPC port), or its plain peer; device auto, as `python -m service` chooses by default
            options = argparse.Namespace(
                checkpoint=checkpoint, baseline=directory, device="auto", bulk_images=args.bulk_images, threads=None
            )
            command, env, cwd = server_command("plain" if spec == "plain" else "ours-baseline", options, port)
            ready = "/healthz" if spec == "plain" else "/readyz"
            servers[name] = loadgen.Server(name, [*command, *extra], port, ready, env=env, cwd=cwd)
            requests[name] = loads(port, checkpoint, args.bulk_images)[args.load]
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for name in order:
                port = servers[name].port
                loadgen.run(port, requests[name], args.clients, 10**9, args.warmup)
                result = loadgen.run(port, requests[name], args.clients, 10**9, args.seconds)
                results[name].append(result)
                print(f"  round {round_ + 1} {name:14s} {result.rps:8.0f} req/s  p50 {result.percentile(50):.2f} ms")
    finally:
        for server in servers.values():
            server.stop()
    print(
        f"\n{args.load} at {args.clients} client(s), {args.rounds} rounds of {args.seconds:g} s; {loadgen.machine()}\n"
    )
    print(summary(results, builds[0][0]))


def summary(results: dict[str, list[loadgen.Result]], reference: str) -> str:
    """Each build's median req/s and p50 over the rounds, and its ratios to the reference: of the medians, and the
    median of the per-round ratios (each round's pair measured back to back, so a machine that drifts between
    rounds moves both sides of a pair alike), with their range."""
    rows = []
    base = results[reference]
    for name, runs in results.items():
        rps = statistics.median(r.rps for r in runs)
        p50 = statistics.median(r.percentile(50) for r in runs)
        paired = [r.rps / b.rps for r, b in zip(runs, base, strict=True)]
        paired_p50 = [r.percentile(50) / b.percentile(50) for r, b in zip(runs, base, strict=True)]
        rows.append(
            [
                name,
                f"{rps:,.0f}",
                f"{p50:.2f}",
                f"{rps / statistics.median(b.rps for b in base):.3f}",
                f"{statistics.median(paired):.3f} ({min(paired):.2f}-{max(paired):.2f})",
                f"{statistics.median(paired_p50):.3f} ({min(paired_p50):.2f}-{max(paired_p50):.2f})",
            ]
        )
    head = ["build", "req/s (median)", "p50 ms (median)", f"req/s ratio to {reference}"]
    head += ["req/s ratio, per round (median, range)", "p50 ratio, per round (median, range)"]
    return loadgen.table(head, rows)


if __name__ == "__main__":
    main()
