"""The service under load, side by side with the alternatives, on loopback: single-image `POST /v1/encode` (a PNG
upload) and `GET /v1/sample?n=1` from 1, 16, 64 and 256 concurrent clients, `GET /healthz` at 64 (each server's
HTTP-stack ceiling), bulk encode requests of 256 PNGs against the in-process limit, and the binary path (ours only):
single-image encode at 64 clients and bulk encode of 256 images as a raw uint8 tensor body with a tensor answer
(`POST /v1/encode?shape=...&dtype=uint8`, docs/binary-tensors.md), for

    ours          python -m service, as configured by default (batching on), access log off
    ours-nobatch  the same with --no-batching
    plain         bench/peers/plain_fastapi.py: the FastAPI app people write by hand, one forward per request
    litserve      bench/peers/litserve_app.py: LitServe with its batching on (max_batch_size 64)

all serving the same checkpoint and measured by the same load generator (bench/loadgen.py) in the same run, one
server at a time, the servers interleaved cell by cell so that a busy moment hits all of them alike.

    python bench/serving.py --checkpoint checkpoints/mnist                       # about 4 minutes
    python bench/serving.py --checkpoint checkpoints/mnist --repeat 3            # medians of 3 runs
    python bench/serving.py --servers ours plain --clients 64 --duration 3       # a quick look
    python bench/serving.py --device cuda --servers ours ours-nobatch            # skips cleanly without CUDA
    python bench/serving.py --servers ours --clients 64 --bulk-clients 1 4       # the binary path against PNG

The peers run in their own environment, .bench-venv/ (torch==2.13.0 first, then bench/peers/requirements.txt),
made on first use. Every run is bounded by --duration seconds and --requests answers. Prints one table (medians
over --repeat runs) and the issue's targets computed from it. "server CPU" is the CPU time of the server's whole
process tree per answered request: the least noisy figure on a busy machine; "page faults" its page faults per
answered request, near 0 once warm unless memory is handed back and faulted in again on every request.

The in-process limits (bench/inprocess.py's bulk rows: the same work with no HTTP) are measured in each repeat just
before its bulk cells, one run of --duration seconds each, and reported as medians over the repeats like every
cell: on a machine whose speed drifts by tens of percent within minutes, a limit taken once at the start (best of
three 0.3-s rounds, as before 2026-12-03) and a served median from later compared two different machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen  # noqa: E402

REPO = loadgen.REPO
VENV = REPO / ".bench-venv"
PEERS = REPO / "bench" / "peers"
SERVERS = ("ours", "ours-nobatch", "plain", "litserve")
CLIENTS = (1, 16, 64, 256)


# -- the peers' environment --------------------------------------------------------------------------------------------
def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """.bench-venv with torch==2.13.0 and the peers' requirements; rebuilt when requirements.txt changes."""
    requirements = PEERS / "requirements.txt"
    stamp = VENV / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and venv_python().is_file():
        return venv_python()
    print(f"making the peers' environment in {VENV} (once) ...", flush=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first and pinned: never a CUDA build pulled in by a peer
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(digest)
    return venv_python()


# -- servers -----------------------------------------------------------------------------------------------------------
def server_command(name: str, args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str], Path]:
    """The command, extra environment and working directory that start server `name`."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    env = {"PYTHONPATH": str(REPO)}
    if name.startswith("ours"):
        # Configured for the bulk loads: requests of --bulk-images images are allowed and run as one forward pass,
        # as the in-process limit does (docs/api.md, "Batching"); single-image batches stay far below either.
        bulk = str(args.bulk_images)
        flags = ["--device", args.device, "--max-images-per-request", bulk, "--max-batch-size", bulk]
        flags += ["--cpu-threads", str(args.threads)] if args.threads else []
        flags += ["--no-batching"] if name == "ours-nobatch" else []
        if name == "ours-baseline":  # the same service from another source tree, e.g. a git worktree
            src = Path(args.baseline).resolve()
            command = loadgen.service_command(args.checkpoint, port, *flags, grpc_off=has_grpc_flag(src))
            return command, {"PYTHONPATH": str(src)}, src
        return loadgen.service_command(args.checkpoint, port, *flags), env, REPO
    script = {"plain": "plain_fastapi.py", "litserve": "litserve_app.py"}[name]
    command = [
        str(venv_python()),
        str(PEERS / script),
        "--checkpoint",
        str(Path(args.checkpoint).resolve()),
        "--port",
        str(port),
        *threads,
    ]
    if name == "litserve":
        command += ["--batch-timeout", str(args.litserve_batch_timeout)]
    return command, env, REPO


def has_grpc_flag(src: Path) -> bool:
    """Whether the service in source tree `src` has a gRPC port to turn off (it came with the v2 protocol)."""
    return (src / "service" / "v2").is_dir()


def requests_for(name: str, port: int, png: bytes, bulk_images: int) -> dict[str, bytes]:
    """The same load for every server. LitServe serves POST only: its sample is `POST {"n": 1}`."""
    if name == "litserve":
        body = b'{"n": 1}'
        sample = (
            f"POST /v1/sample HTTP/1.1\r\nHost: {loadgen.HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    else:
        sample = loadgen.get_request(port, "/v1/sample?n=1")
    return {
        "encode": loadgen.multipart_request(port, "/v1/encode", [png]),
        "sample?n=1": sample,
        "healthz": loadgen.get_request(port, "/healthz"),
        "bulk encode": loadgen.multipart_request(port, "/v1/encode", [png] * bulk_images),
    }


# -- the binary path: one request builder per protocol -----------------------------------------------------------------
def v1_tensor_request(port: int, images: Any, model: str) -> bytes:
    """/v1/encode with a raw uint8 tensor body (N, C, H, W), answered with a raw float32 tensor of the means."""
    shape = ",".join(str(n) for n in images.shape)
    return loadgen.post_request(
        port,
        f"/v1/encode?shape={shape}&dtype=uint8",  # the server's one model
        images.tobytes(),
        "application/octet-stream",
        {"Accept": "application/octet-stream"},
    )


def v2_binary_request(port: int, images: Any, model: str) -> bytes:
    """The Open Inference Protocol's binary extension (docs/protocols.md): POST /v2/models/{model}-encoder/infer, a
    JSON header naming the UINT8 input (Inference-Header-Content-Length) followed by its bytes, the posterior mean
    asked for as binary data: the same work and answer size as the v1 tensor request."""
    header = {
        "inputs": [
            {
                "name": "images",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "parameters": {"binary_data_size": images.nbytes},
            }
        ],
        "outputs": [{"name": "mu", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    return loadgen.post_request(
        port,
        f"/v2/models/{model}-encoder/infer",
        head + images.tobytes(),
        "application/octet-stream",
        {"Inference-Header-Content-Length": str(len(head))},
    )


# (port, uint8 images (N, C, H, W), the served model's name) -> one encode request. Each entry adds an
# "encode <name>" cell at --binary-clients and a "bulk encode <name>" cell at --bulk-clients, for our servers.
BINARY_BUILDERS: dict[str, Callable[[int, Any, str], bytes]] = {
    "v1 tensor": v1_tensor_request,
    "v2 binary": v2_binary_request,
}
BINARY_SERVERS = ("ours", "ours-nobatch")  # the peers speak no binary protocol; a --baseline build may not either


def binary_requests(port: int, pixels: Any, bulk_images: int, model: str) -> dict[str, bytes]:
    """The binary cells' requests: one image, and `bulk_images` of them, per protocol in BINARY_BUILDERS."""
    import numpy as np

    requests = {}
    for name, build in BINARY_BUILDERS.items():
        requests[f"encode {name}"] = build(port, pixels[None], model)
        requests[f"bulk encode {name}"] = build(port, np.repeat(pixels[None], bulk_images, axis=0), model)
    return requests


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and page faults so far of `pid` and every process below it (LitServe runs several), from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    used: dict[int, loadgen.ProcStat] = {}
    for entry in Path("/proc").iterdir():
        stat = loadgen.proc_stat(entry / "stat") if entry.name.isdigit() else None
        if stat is not None:
            children[stat.parent].append(int(entry.name))
            used[int(entry.name)] = stat
    cpu, faults, todo = 0.0, 0, [pid]
    while todo:
        p = todo.pop()
        if p in used:
            cpu, faults = cpu + used[p].cpu_seconds, faults + used[p].page_faults
        todo += children.get(p, [])
    return cpu, faults


# -- the runs ----------------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One (scenario, clients, server) cell: one load run per repeat."""

    results: list[loadgen.Result] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    page_faults: list[float] = field(default_factory=list)  # per answered request

    def median(self, value: str) -> float:
        pick = {
            "rps": lambda r: r.rps,
            "p50": lambda r: r.percentile(50),
            "p90": lambda r: r.percentile(90),
            "p99": lambda r: r.percentile(99),
        }[value]
        return loadgen.median([pick(r) for r in self.results])


def run_cell(
    server: loadgen.Server, request: bytes, clients: int, args: argparse.Namespace, requests: int
) -> tuple[loadgen.Result, float, float]:
    """One measured run after a warm-up: its result, and the server's CPU µs and page faults per answered request."""
    loadgen.run(server.port, request, clients, max(clients, 200), args.warmup)
    cpu_before, faults_before = tree_usage(server.pid)
    result = loadgen.run(server.port, request, clients, requests, args.duration)
    cpu_after, faults_after = tree_usage(server.pid)
    answered = max(1, result.requests)
    return result, (cpu_after - cpu_before) / answered * 1e6, (faults_after - faults_before) / answered


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    cells = [(scenario, c) for scenario in ("encode", "sample?n=1") for c in args.clients]
    cells += [(f"encode {protocol}", c) for protocol in args.binary for c in args.binary_clients]
    cells.append(("healthz", 64))
    cells += [("bulk encode", c) for c in args.bulk_clients]
    cells += [(f"bulk encode {protocol}", c) for protocol in args.binary for c in args.bulk_clients]
    return cells


def is_bulk(scenario: str) -> bool:
    return scenario.startswith("bulk encode")


def runs_on(scenario: str, server: str) -> bool:
    """The peers run the single-request loads; bulk loads are ours only, binary loads BINARY_SERVERS only."""
    if any(scenario.endswith(f"encode {protocol}") for protocol in BINARY_BUILDERS):
        return server in BINARY_SERVERS
    return not is_bulk(scenario) or server.startswith("ours")


def rotation(names: list[str], repeat: int) -> list[str]:
    """The order the servers run in each cell of repeat `repeat`: rotated one place each repeat. A cell's first server
    runs right after the previous cell's last, whose load the machine can still feel: with a fixed order, one-client
    `sample?n=1` read 1.20x the plain app's p50 with ours first and 0.83x with the plain app first (docs/benchmarks.md,
    section 00000000)."""
    shift = repeat % len(names) if names else 0
    return names[shift:] + names[:shift]


def run_all(
    args: argparse.Namespace, png: bytes, pixels: Any, limits: Callable[[], dict[str, float]] | None = None
) -> tuple[dict[tuple[str, int, str], Cell], dict[str, list[float]]]:
    """Every cell of plan(args) on every server it runs on (in rotation's order), --repeat times; and the in-process
    limits beside them:
    `limits()` (images/s by name) runs once per repeat, just before that repeat's bulk cells, so that each served
    bulk figure and its limit are measured minutes apart at most, and both are medians over the repeats."""
    cells: dict[tuple[str, int, str], Cell] = defaultdict(Cell)
    limit_runs: dict[str, list[float]] = defaultdict(list)
    servers: dict[str, loadgen.Server] = {}
    loads: dict[str, dict[str, bytes]] = {}
    try:
        for name in args.servers:
            port = loadgen.free_port()
            command, env, cwd = server_command(name, args, port)
            ready = "/readyz" if name.startswith("ours") else "/healthz"
            print(f"starting {name} on port {port} ...", flush=True)
            servers[name] = loadgen.Server(name, command, port, ready, env=env, cwd=cwd)
            loads[name] = requests_for(name, port, png, args.bulk_images)
            if name in BINARY_SERVERS:
                loads[name] |= binary_requests(port, pixels, args.bulk_images, Path(args.checkpoint).resolve().name)
        for repeat in range(args.repeat):
            measured = False
            for scenario, clients in plan(args):
                if limits is not None and is_bulk(scenario) and not measured:
                    for what, images_per_s in limits().items():
                        limit_runs[what].append(images_per_s)
                        print(f"  [{repeat + 1}/{args.repeat}] in-process limit, {what}: {images_per_s:,.0f} images/s")
                    measured = True
                for name in rotation(list(servers), repeat):
                    server = servers[name]
                    if not runs_on(scenario, name):
                        continue
                    request = loads[name][scenario]
                    budget = args.requests if not is_bulk(scenario) else max(1, args.requests // args.bulk_images)
                    result, cpu, faults = run_cell(server, request, clients, args, budget)
                    cell = cells[(scenario, clients, name)]
                    cell.results.append(result)
                    cell.cpu_us.append(cpu)
                    cell.page_faults.append(faults)
                    print(
                        f"  [{repeat + 1}/{args.repeat}] {scenario:22s} {clients:4d} clients {name:13s} "
                        f"{result.rps:8.0f} req/s  p99 {result.percentile(99):7.1f} ms  errors {result.errors}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    return cells, limit_runs


# -- the report --------------------------------------------------------------------------------------------------------
def report(cells: dict[tuple[str, int, str], Cell], bulk_images: int) -> str:
    rows = []
    for (scenario, clients, name), cell in cells.items():
        rps = cell.median("rps")
        shown = f"{rps:,.0f}" if not is_bulk(scenario) else f"{rps:,.1f} ({rps * bulk_images:,.0f} img/s)"
        rows.append(
            [
                scenario,
                clients,
                name,
                sum(r.requests for r in cell.results),
                sum(r.errors for r in cell.results),
                shown,
                f"{cell.median('p50'):.1f}",
                f"{cell.median('p90'):.1f}",
                f"{cell.median('p99'):.1f}",
                f"{loadgen.median(cell.cpu_us):,.0f}",
                f"{loadgen.median(cell.page_faults):,.1f}" if cell.page_faults else "",
            ]
        )
    headers = [
        "load",
        "clients",
        "server",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "server CPU µs/req",
        "page faults/req",
    ]
    return loadgen.table(headers, rows, "lrlrrrrrrrr")


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def targets(
    cells: dict[tuple[str, int, str], Cell],
    limit_images_per_s: float | None,
    bulk_images: int,
    tensor_limit_images_per_s: float | None = None,
) -> list[str]:
    """The issue's targets, each with the measured figures behind it (cells that did not run are left out)."""

    def get(scenario: str, clients: int, name: str) -> Cell | None:
        return cells.get((scenario, clients, name))

    lines = []
    ours, plain, lit = (get("encode", 64, n) for n in ("ours", "plain", "litserve"))
    if ours is not None:
        # against the plain app the target is 3x since issue 15 (it was 2x); against LitServe still 2x
        for peer, cell, target in (("plain FastAPI", plain, 3), ("LitServe", lit, 2)):
            if cell is not None:
                ratio = ours.median("rps") / cell.median("rps")
                p99_ok = ours.median("p99") < cell.median("p99")
                lines.append(
                    f"encode at 64 clients, ours vs {peer}: {ratio:.2f}x the req/s (target >= {target}x: "
                    f"{verdict(ratio >= target)}); p99 {ours.median('p99'):.1f} vs "
                    f"{cell.median('p99'):.1f} ms (target below: {verdict(p99_ok)})"
                )
        health = get("healthz", 64, "ours")
        if health is not None:
            share = ours.median("rps") / health.median("rps")
            lines.append(
                f"encode at 64 clients vs the same server's /healthz: {share:.0%} ({ours.median('rps'):,.0f} "
                f"vs {health.median('rps'):,.0f} req/s; target >= 70%: "
                f"{verdict(share >= 0.7)})"
            )
    health, plain_health = get("healthz", 64, "ours"), get("healthz", 64, "plain")
    if health is not None and plain_health is not None:
        ratio = health.median("rps") / plain_health.median("rps")
        lines.append(f"/healthz at 64 clients, ours vs plain: {ratio:.2f}x (target >= 1x: {verdict(ratio >= 1)})")
    for scenario in ("encode", "sample?n=1"):
        ours1, plain1 = get(scenario, 1, "ours"), get(scenario, 1, "plain")
        if ours1 is not None and plain1 is not None:
            ratio = ours1.median("p50") / plain1.median("p50")
            lines.append(
                f"{scenario} at 1 client, p50 ours vs plain: {ours1.median('p50'):.2f} vs "
                f"{plain1.median('p50'):.2f} ms = {ratio:.2f}x (target <= 1x: {verdict(ratio <= 1)})"
            )
    if limit_images_per_s:
        for (scenario, clients, name), cell in cells.items():
            if scenario == "bulk encode" and name == "ours":
                share = cell.median("rps") * bulk_images / limit_images_per_s
                lines.append(
                    f"bulk encode ({bulk_images} PNGs per request, {clients} client(s)): "
                    f"{cell.median('rps') * bulk_images:,.0f} images/s = {share:.0%} of the in-process "
                    f"limit {limit_images_per_s:,.0f} (target >= 60%: {verdict(share >= 0.6)})"
                )
    for protocol in BINARY_BUILDERS:
        binary = get(f"encode {protocol}", 64, "ours")
        if ours is not None and binary is not None:
            ratio = binary.median("rps") / ours.median("rps")
            lines.append(
                f"single-image encode at 64 clients, {protocol} vs the PNG upload: {binary.median('rps'):,.0f} vs "
                f"{ours.median('rps'):,.0f} req/s = {ratio:.2f}x, p99 {binary.median('p99'):.1f} vs "
                f"{ours.median('p99'):.1f} ms (target >= 1x: {verdict(ratio >= 1)})"
            )
        for (scenario, clients, name), cell in cells.items():
            if scenario != f"bulk encode {protocol}" or name != "ours":
                continue
            images_per_s = cell.median("rps") * bulk_images
            against = [(tensor_limit_images_per_s, "uint8 tensor"), (limit_images_per_s, "PNG")]
            shares = [(images_per_s / limit, what, limit) for limit, what in against if limit]
            if shares:
                share = shares[0][0]
                said = "; ".join(f"{s:.0%} of the {what} in-process limit {limit:,.0f}" for s, what, limit in shares)
                lines.append(
                    f"bulk encode, {protocol} ({bulk_images} images per request, {clients} client(s)): "
                    f"{images_per_s:,.0f} images/s = {said} (target >= 80% of the first: "
                    f"{verdict(share >= 0.8)})"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist", help="checkpoint directory every server serves")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="concurrent clients per run")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (after --warmup)")
    p.add_argument("--requests", type=int, default=30000, help="most answers per run")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load before each run")
    p.add_argument("--repeat", type=int, default=1, help="run everything this many times; the table shows medians")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for every server (default: torch's choice, as ours is by default)",
    )
    p.add_argument("--bulk-images", type=int, default=256, help="images per bulk encode request")
    p.add_argument("--bulk-clients", type=int, nargs="*", default=[1, 4], help="clients for the bulk runs")
    p.add_argument(
        "--binary", nargs="*", default=list(BINARY_BUILDERS), choices=list(BINARY_BUILDERS), help="binary protocols"
    )
    p.add_argument("--binary-clients", type=int, nargs="*", default=[64], help="clients for single-image binary runs")
    p.add_argument("--litserve-batch-timeout", type=float, default=0.005, help="LitServe's batch_timeout (s)")
    p.add_argument("--device", default="cpu", help="device for ours (cuda: the peers are left out)")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="also run our service from this source tree as 'ours-baseline', to compare two builds "
        "side by side (e.g. `git worktree add /tmp/base HEAD~3`)",
    )
    args = p.parse_args(argv)
    if args.baseline is not None:
        if not (Path(args.baseline) / "service" / "__main__.py").is_file():
            p.error(f"--baseline {args.baseline}: not a vae-serve source tree (no service/__main__.py)")
        args.servers = [*args.servers, "ours-baseline"]
    if loadgen.cuda_missing(args.device):
        return
    if args.device.startswith("cuda"):
        args.servers = [s for s in args.servers if s.startswith("ours")]
    if any(not s.startswith("ours") for s in args.servers):
        ensure_venv()
    from bench import inprocess

    predictor = inprocess.load_predictor(args.checkpoint, args.device, args.threads)
    c, h, w = predictor.input_shape
    png, pixels = loadgen.digit_png((w, h), c), loadgen.digit_pixels((w, h), c)
    png_label = f"bulk encode of {args.bulk_images} PNGs (decode + one forward)"
    tensor_label = f"bulk encode of a ({args.bulk_images}, {c}, {h}, {w}) uint8 tensor (bytes -> input + one forward)"

    def limits() -> dict[str, float]:
        """Each in-process limit as one run of --duration seconds: the statistic of a served cell."""
        runs = {png_label: inprocess.bulk_limit(predictor, png, args.bulk_images, args.duration, rounds=1)}
        if args.binary:
            runs[tensor_label] = inprocess.bulk_tensor_limit(predictor, pixels, args.bulk_images, args.duration, 1)
        return {label: timing.images_per_s for label, timing in runs.items()}

    started = time.monotonic()
    cells, limit_runs = run_all(args, png, pixels, limits if args.bulk_clients else None)
    print(
        f"\n{Path(args.checkpoint).resolve().name}, {len(png)}-byte PNG, torch threads "
        f"{args.threads or 'default'}, {args.duration:g} s per run, {args.repeat} repeat(s), "
        f"{time.monotonic() - started:.0f} s in all; {loadgen.machine()}\n"
    )
    print(report(cells, args.bulk_images))
    limit = {label: loadgen.median(runs) for label, runs in limit_runs.items()}
    for label, runs in limit_runs.items():
        each = ", ".join(f"{r:,.0f}" for r in runs)
        print(f"\nin-process limit, {label}: {limit[label]:,.0f} images/s (median of {len(runs)} runs: {each})")
    found = targets(cells, limit.get(png_label), args.bulk_images, limit.get(tensor_label))
    print("\n" + "\n".join(f"- {line}" for line in found))


if __name__ == "__main__":
    main()
