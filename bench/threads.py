"""Where a server's CPU goes, thread by thread: CPU time per answered request of every thread of `python -m service`
under a closed-loop load, from /proc/<pid>/task/*/stat (Linux), for single-image `POST /v1/encode` (a PNG upload,
or a raw uint8 tensor with `--loads "encode v1 tensor"`) and `GET /healthz`. The event loop is the process's main
thread; the others are the forward's worker thread and the helper threads of torch's intra-op pool (OpenMP), which
spin between parallel regions. Prints one table.

    python bench/threads.py                                   # encode and healthz at 64 clients, 6 s each
    python bench/threads.py --clients 16 --loads encode
    python bench/threads.py -- --cpu-threads 1                # flags after -- go to python -m service
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen, serving  # noqa: E402
from model.checkpoint import read_card  # noqa: E402


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread of `pid` (thread id -> user + system)."""
    stats = {int(tid): loadgen.proc_stat(f"/proc/{pid}/task/{tid}/stat") for tid in os.listdir(f"/proc/{pid}/task")}
    return {tid: stat.cpu_seconds for tid, stat in stats.items() if stat is not None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=6.0, help="seconds of load per run (after 1 s of warm-up)")
    binary = [f"encode {protocol}" for protocol in serving.BINARY_BUILDERS]  # e.g. "encode v1 tensor"
    p.add_argument("--loads", nargs="+", choices=("encode", "healthz", *binary), default=["encode", "healthz"])
    p.add_argument("flags", nargs="*", help="extra flags for python -m service (after --)")
    args = p.parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("skipped: per-thread CPU times need Linux's /proc")
        return
    port = loadgen.free_port()
    command = loadgen.service_command(Path(args.checkpoint), port, *args.flags)
    rows = []
    with loadgen.Server("ours", command, port, "/readyz", env={"PYTHONPATH": str(loadgen.REPO)}) as server:
        requests = serving.requests_for("ours", port, loadgen.digit_png(), bulk_images=1)  # the same requests
        c, h, w = read_card(args.checkpoint)["input"]["shape"]  # a raw tensor must have the model's own shape
        pixels = loadgen.digit_pixels((w, h), c)
        requests |= serving.binary_requests(port, pixels, 1, Path(args.checkpoint).resolve().name)
        for load in args.loads:
            loadgen.run(port, requests[load], args.clients, 10**6, 1.0)
            before = thread_cpu_seconds(server.pid)
            result = loadgen.run(port, requests[load], args.clients, 10**7, args.duration)
            failed = {status: n for status, n in result.statuses.items() if status != 200}
            if failed or result.errors:
                print(f"{load}: answers other than 200: {failed}, connection errors: {result.errors}")
            after = thread_cpu_seconds(server.pid)
            spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            busy = sorted((t for t in spent if t != server.pid and spent[t] > 0.01), key=spent.get, reverse=True)
            for tid in [server.pid, *busy]:
                name = "main (event loop)" if tid == server.pid else f"thread {tid}"
                rows.append(
                    [
                        load,
                        f"{result.rps:,.0f}",
                        name,
                        f"{spent[tid] / max(1, result.requests) * 1e6:,.0f}",
                        f"{spent[tid] / args.duration:.2f}",
                    ]
                )
    name = Path(args.checkpoint).name
    print(f"\n{name}, {args.clients} clients, {args.duration:g} s per load; {loadgen.machine()}\n")
    print(loadgen.table(["load", "req/s", "thread", "CPU µs/request", "cores"], rows, "lrlrr"))


if __name__ == "__main__":
    main()
