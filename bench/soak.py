"""Bounded soak on loopback at a concurrency above the server's queue: the server must shed load with 503 and
Retry-After, never hang, keep the p99 of the requests it accepts bounded, not grow its RSS, and answer every
accepted request with that request's own result.

    python -m bench.soak                                   # 120 s, 96 clients, queue 32, checkpoints/mnist
    python -m bench.soak --duration 60 --clients 64 --queue-size 16

Starts `python -m service` on a free port (one model, `--queue-size`, `--max-batch-size`), then `--clients`
keep-alive connections send requests back to back for `--warmup` + `--duration` seconds: single-image seeded
encodes (multipart, `sample=true`), decodes of seeded latents and seeded prior samples (JSON pixels), drawn in turn
from a pool of distinct requests whose answers were computed beforehand by the same model, unbatched, in this
process. A 503 is followed by a short random pause (5-20 ms: the clients keep the pressure on, they do not honour
Retry-After). Every answer is checked after the run: accepted (200) answers against the known result of the request
sent on that connection (a batching mix-up would show as a wrong answer), 503s for their Retry-After header, and
anything else (another status, a connection error, no answer within --hang-s) is a failure. The server's RSS is
sampled every second. The tables and verdict lines are Markdown, for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import loadgen, memory


@dataclass
class Known:
    """One request of the pool and the answer it must get."""

    label: str
    raw: bytes
    field: str  # the answer's field to compare: "results" (encode) or "pixels"
    expected: list


@dataclass
class Tally:
    accepted: list[tuple[float, float]] = field(default_factory=list)  # (time since start, latency s) of 200s
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # (pool index, body) of 200s, checked later
    shed: int = 0
    shed_without_retry_after: int = 0
    other_status: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    hung: int = 0

    @property
    def tried(self) -> int:
        return len(self.accepted) + self.shed + sum(self.other_status.values()) + self.connection_errors + self.hung


# -- the pool of requests with known answers -----------------------------------------------------------------------
def digit(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    image = np.zeros((h, w), dtype=np.uint8)
    top, left = rng.integers(0, h // 2, size=2)
    image[top : top + h // 2, left : left + w // 3] = rng.integers(100, 256)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def http(method: str, path: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {loadgen.HOST}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def pool(checkpoint: Path, size: int) -> list[Known]:
    """`size` distinct requests (a third each: encode, decode, sample) and their answers from the model itself."""
    from service import media
    from service.predictor import VAEPredictor, generator

    p = VAEPredictor.load(checkpoint.name, checkpoint, torch.device("cpu"))
    c, h, w = p.input_shape
    known = []
    for i in range(size):
        kind = ("encode", "decode", "sample")[i % 3]
        if kind == "encode":
            data = digit(i, (h, w))
            x = p.image_tensor(media.open_image(data, h * w))[None]
            out = p.predict("encode", {"x": x, "eps": p.noise(1, generator(i))})
            expected = [{"mu": out["mu"][0].tolist(), "logvar": out["logvar"][0].tolist(), "z": out["z"][0].tolist()}]
            content_type, body = loadgen.multipart_body([data], fields={"sample": "true", "seed": str(i)})
            raw = http("POST", "/v1/encode", body, content_type)
            known.append(Known(f"encode seed={i}", raw, "results", expected))
        elif kind == "decode":
            z = torch.randn(1, p.latent_dim, generator=torch.Generator().manual_seed(10_000 + i))
            expected = p.predict("decode", {"z": z})["image"].tolist()
            body = json.dumps({"latents": z.tolist(), "encoding": "pixels"}).encode()
            known.append(
                Known(f"decode #{i}", http("POST", "/v1/decode", body, "application/json"), "pixels", expected)
            )
        else:
            eps = p.prior_noise(1, generator(i))
            expected = p.predict("sample", {"eps": eps, "temperature": torch.ones(1)})["image"].tolist()
            raw = http("GET", f"/v1/sample?n=1&seed={i}&encoding=pixels")
            known.append(Known(f"sample seed={i}", raw, "pixels", expected))
    return known


def close(a: object, b: object, tol: float = 1e-4) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    return isinstance(a, float | int) and isinstance(b, float | int) and abs(a - b) <= tol * (1 + abs(b))


# -- the load --------------------------------------------------------------------------------------------------------
async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0][9:12]), headers, body


async def client(
    n: int,
    clients: int,
    port: int,
    known: list[Known],
    start: float,
    measure_from: float,
    until: float,
    hang_s: float,
    tally: Tally,
) -> None:
    index = n
    rng = random.Random(n)
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < until:
        i = index % len(known)
        index += clients
        counted = time.monotonic() >= measure_from
        try:
            if connection is None:
                connection = await asyncio.open_connection(loadgen.HOST, port)
            reader, writer = connection
            sent = time.monotonic()
            writer.write(known[i].raw)
            status, headers, body = await asyncio.wait_for(read_answer(reader), hang_s)
        except TimeoutError:
            tally.hung += counted
            connection = None
            continue
        except (OSError, asyncio.IncompleteReadError):
            tally.connection_errors += counted
            connection = None
            await asyncio.sleep(0.05)
            continue
        if not counted:
            continue
        if status == 200:
            tally.accepted.append((sent - start, time.monotonic() - sent))
            tally.answers.append((i, body))
        elif status == 503:
            tally.shed += 1
            tally.shed_without_retry_after += "retry-after" not in headers
            await asyncio.sleep(rng.uniform(0.005, 0.02))
        else:
            tally.other_status[status] = tally.other_status.get(status, 0) + 1
    if connection is not None:
        connection[1].close()


async def sample_rss(pid: int, until: float, samples: list[tuple[float, float]], start: float) -> None:
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, memory.rss_mb(pid)))
        await asyncio.sleep(1.0)


async def soak(port: int, pid: int, known: list[Known], args: argparse.Namespace) -> tuple[Tally, list, float]:
    tally, rss = Tally(), []
    start = time.monotonic()
    measure_from = start + args.warmup
    until = measure_from + args.duration
    tasks = [
        client(n, args.clients, port, known, start, measure_from, until, args.hang_s, tally)
        for n in range(args.clients)
    ]

    async def rss_from_measure() -> None:
        await asyncio.sleep(args.warmup)
        memory.reset_peak(pid)
        await sample_rss(pid, until, rss, start)

    await asyncio.gather(*tasks, rss_from_measure())
    return tally, rss, memory.peak_mb(pid)


# -- the report ------------------------------------------------------------------------------------------------------
def ms(seconds: list[float], q: float) -> float:
    return loadgen.percentile(seconds, q) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=loadgen.REPO / "checkpoints" / "mnist")
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    parser.add_argument("--clients", type=int, default=96, help="concurrent connections (above --queue-size)")
    parser.add_argument("--queue-size", type=int, default=32, help="the server's VAE_QUEUE_SIZE")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's VAE_MAX_BATCH_SIZE")
    parser.add_argument("--pool", type=int, default=96, help="distinct requests with known answers")
    parser.add_argument("--hang-s", type=float, default=30.0, help="no answer within this is a hang")
    parser.add_argument("--p99-bound-ms", type=float, default=1000.0, help="verdict: p99 of accepted below this")
    parser.add_argument("--rss-growth-mb", type=float, default=20.0, help="verdict: RSS growth below this")
    args = parser.parse_args(argv)
    assert args.clients > args.queue_size, "the point is a concurrency above the queue limit"

    known = pool(args.checkpoint, args.pool)
    port = loadgen.free_port()
    command = loadgen.service_command(
        args.checkpoint,
        port,
        "--cpu-threads",
        "1",
        "--queue-size",
        str(args.queue_size),
        "--max-batch-size",
        str(args.max_batch_size),
    )
    print(loadgen.machine())
    with loadgen.Server("soak", command, port, ready_path="/readyz") as server:
        pid = server.pid
        rss_ready = memory.rss_mb(pid)
        tally, rss, peak = asyncio.run(soak(port, server.pid, known, args))
        end_rss = memory.rss_mb(pid)
        time.sleep(1.0)
        ready_after = json.loads(loadgen.fetch(port, "/readyz"))["status"] == "ready"

    wrong = [
        known[i].label
        for i, body in tally.answers
        if not close(json.loads(body).get(known[i].field), known[i].expected)
    ]
    latencies = [s for _, s in tally.accepted]
    half = args.warmup + args.duration / 2
    first = [s for t, s in tally.accepted if t < half]
    second = [s for t, s in tally.accepted if t >= half]
    window = max(1, len(rss) // 10)
    rss_first = statistics.median(r for _, r in rss[:window])
    rss_last = statistics.median(r for _, r in rss[-window:])
    failed = sum(tally.other_status.values()) + tally.connection_errors + tally.hung
    p99 = ms(latencies, 99)

    print(
        loadgen.table(
            [
                "requests tried",
                "accepted (200)",
                "shed (503)",
                "failed",
                "wrong answers",
                "req/s accepted",
                "p50 ms",
                "p99 ms",
                "p99 1st half ms",
                "p99 2nd half ms",
            ],
            [
                [
                    tally.tried,
                    len(tally.accepted),
                    tally.shed,
                    failed,
                    len(wrong),
                    f"{len(latencies) / args.duration:.0f}",
                    f"{ms(latencies, 50):.1f}",
                    f"{p99:.1f}",
                    f"{ms(first, 99):.1f}",
                    f"{ms(second, 99):.1f}",
                ]
            ],
        )
    )
    print()
    print(
        loadgen.table(
            [
                "server RSS MiB: when ready",
                "soak start",
                "peak during the soak",
                "end",
                "growth (last 10% - first 10%)",
            ],
            [[f"{rss_ready:.0f}", f"{rss[0][1]:.0f}", f"{peak:.0f}", f"{end_rss:.0f}", f"{rss_last - rss_first:+.1f}"]],
        )
    )
    print()
    print(
        f"settings: {args.clients} clients, queue_size {args.queue_size}, max_batch_size {args.max_batch_size}, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured, pool of {len(known)} known requests"
    )
    if tally.other_status or tally.connection_errors or tally.hung:
        print(
            f"failures: other statuses {tally.other_status}, connection errors {tally.connection_errors}, "
            f"hung {tally.hung}"
        )
    verdicts = [
        (
            "sheds load with 503 + Retry-After",
            tally.shed > 0 and tally.shed_without_retry_after == 0,
            f"{tally.shed} shed, {tally.shed_without_retry_after} without Retry-After",
        ),
        ("never hangs", tally.hung == 0, f"{tally.hung} requests without an answer within {args.hang_s:g} s"),
        ("no accepted request lost or failed", failed == 0, f"{failed} failed"),
        ("every answer is its own request's", not wrong, f"{len(wrong)} wrong of {len(tally.answers)} checked"),
        ("p99 of accepted bounded", p99 < args.p99_bound_ms, f"{p99:.1f} ms < {args.p99_bound_ms:g} ms"),
        (
            "RSS does not grow",
            rss_last - rss_first < args.rss_growth_mb,
            f"{rss_last - rss_first:+.1f} MiB < {args.rss_growth_mb:g} MiB",
        ),
        ("still ready afterwards", ready_after, "/readyz 200"),
    ]
    for name, good, detail in verdicts:
        print(f"verdict: {'PASS' if good else 'FAIL'}: {name} ({detail})")
    return 0 if all(good for _, good, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
