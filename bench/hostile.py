"""Hostile uploads against a real server: each case's status and error code, and the server's peak RSS while it
handles it (the kernel's high-water mark, reset before each case).

    python -m bench.hostile                                  # checkpoints/mnist, default limits
    python -m bench.hostile --checkpoint checkpoints/mnist --concurrent 8

Starts `python -m service` on a free loopback port (one model, one CPU thread, default limits: 16 MiB bodies,
4096x4096 pixels), sends each case once on a fresh connection, and prints one table row per case: what was sent,
the status and code expected and received, the time, and the server's peak RSS during the case and its RSS after.
Then `--concurrent` copies of the heaviest legal uploads at once, and the RSS at the start and the end. Exit status
1 when any case got another status or code than the documented one.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench import loadgen, memory

MiB = 1024 * 1024
SIDE = 4096  # the default max_image_pixels is SIDE * SIDE


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    expect: tuple[int, str | None]  # status and error code (None: a success)
    body: Callable[[], tuple[str, bytes]]  # -> (content type, body)
    path: str = "/v1/encode"
    slow: bool = False  # sent chunked, in 64 KiB pieces 2 ms apart, with no Content-Length


# -- payloads ----------------------------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def ramp(side: int, dtype: type = np.uint8) -> np.ndarray:
    """side x side, every value of `dtype` in turn: compresses well (a noise image at the pixel cap would be over
    the byte cap), decodes to the full size."""
    return (np.arange(side * side, dtype=np.uint32) % (np.iinfo(dtype).max + 1)).astype(dtype).reshape(side, side)


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header (with a correct CRC) claims width x height: a decompression bomb's shape."""
    data = encoded(Image.fromarray(np.zeros((8, 8), np.uint8)))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 JPEG whose SOF0 frame header claims width x height."""
    data = bytearray(encoded(Image.fromarray(np.zeros((8, 8), np.uint8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def flipped(data: bytes, start: int, n: int = 64) -> bytes:
    out = bytearray(data)
    for i in range(start, start + n):
        out[i] ^= 0x5A
    return bytes(out)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(noise(28, 28, seed)) for seed in range(3)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def upload(make: Callable[[], bytes]) -> Callable[[], tuple[str, bytes]]:
    return lambda: loadgen.multipart_body([make()])


def as_json(make: Callable[[], object]) -> Callable[[], tuple[str, bytes]]:
    return lambda: ("application/json", json.dumps(make()).encode())


def cases() -> list[Case]:
    png256 = lambda: encoded(Image.fromarray(noise(256, 256)))  # noqa: E731
    jpeg256 = lambda: encoded(Image.fromarray(noise(256, 256)), "JPEG")  # noqa: E731
    bad, big, ok = (400, "invalid_payload"), (413, "image_too_large"), (200, None)
    return [
        Case("random-bytes", "1 MiB of random bytes", bad, upload(lambda: np.random.default_rng(1).bytes(MiB))),
        Case("truncated-png", "256x256 PNG cut in half", bad, upload(lambda: png256()[: len(png256()) // 2])),
        Case(
            "corrupt-png",
            "256x256 PNG, 64 bytes of IDAT flipped",
            bad,
            upload(lambda: flipped(png256(), len(png256()) // 2)),
        ),
        Case("truncated-jpeg", "256x256 JPEG cut in half", bad, upload(lambda: jpeg256()[: len(jpeg256()) // 2])),
        Case(
            "corrupt-jpeg-header",
            "256x256 JPEG, header zeroed",
            bad,
            upload(lambda: jpeg256()[:2] + bytes(38) + jpeg256()[40:]),
        ),
        Case(
            "corrupt-jpeg-scan",
            "256x256 JPEG, 64 bytes of scan data flipped (libjpeg decodes it)",
            ok,
            upload(lambda: flipped(jpeg256(), len(jpeg256()) // 2)),
        ),
        Case("bomb-png-header", "8x8 PNG claiming 100000x100000", big, upload(lambda: png_claiming(100_000, 100_000))),
        Case(
            "bomb-png-real",
            f"real {2 * SIDE}x{2 * SIDE} PNG of zeros (4x the cap)",
            big,
            upload(lambda: encoded(Image.new("L", (2 * SIDE, 2 * SIDE)), compress_level=9)),
        ),
        Case("bomb-jpeg-header", "8x8 JPEG claiming 65000x65000", big, upload(lambda: jpeg_claiming(65_000, 65_000))),
        Case("one-pixel", "1x1 PNG", ok, upload(lambda: encoded(Image.new("L", (1, 1), 200)))),
        Case("10000-wide", "10000x1 PNG", ok, upload(lambda: encoded(Image.fromarray(noise(1, 10_000))))),
        Case("10000-square", "10000x10000 PNG header (6x the cap)", big, upload(lambda: png_claiming(10_000, 10_000))),
        Case("at-cap-grey", f"{SIDE}x{SIDE} 8-bit grey PNG", ok, upload(lambda: encoded(Image.fromarray(ramp(SIDE))))),
        Case(
            "at-cap-16-bit",
            f"{SIDE}x{SIDE} 16-bit grey PNG",
            ok,
            upload(lambda: encoded(Image.fromarray(ramp(SIDE, np.uint16)), compress_level=1)),
        ),
        Case(
            "at-cap-palette",
            f"{SIDE}x{SIDE} palette PNG with transparency",
            ok,
            upload(lambda: encoded(Image.fromarray(ramp(SIDE)).convert("P"), transparency=0)),
        ),
        Case(
            "at-cap-rgba",
            f"{SIDE}x{SIDE} RGBA PNG",
            ok,
            upload(lambda: encoded(Image.new("RGBA", (SIDE, SIDE), (9, 200, 30, 128)), compress_level=1)),
        ),
        Case(
            "at-cap-cmyk",
            f"{SIDE}x{SIDE} CMYK JPEG",
            ok,
            upload(lambda: encoded(Image.new("CMYK", (SIDE, SIDE), (10, 20, 30, 0)), "JPEG")),
        ),
        Case("animated-gif", "3-frame animated GIF", bad, upload(lambda: animated("GIF"))),
        Case("animated-png", "3-frame APNG (the first frame is used)", ok, upload(lambda: animated("PNG"))),
        Case("webp", "a WebP image", bad, upload(lambda: encoded(Image.fromarray(noise(28, 28)), "WEBP"))),
        Case(
            "over-cap-declared",
            "17 MiB body, Content-Length declared",
            (413, "payload_too_large"),
            lambda: loadgen.multipart_body([bytes(17 * MiB)]),
        ),
        Case(
            "over-cap-slow",
            "17 MiB chunked body in 64 KiB pieces, 2 ms apart",
            (413, "payload_too_large"),
            lambda: loadgen.multipart_body([bytes(17 * MiB)]),
            slow=True,
        ),
        Case(
            "many-parts",
            "20000 empty multipart parts",
            (422, "invalid_input"),
            lambda: loadgen.multipart_body([b""] * 20_000),
        ),
        Case(
            "deep-json",
            "pixels nested 100000 deep",
            (422, "invalid_request"),
            lambda: ("application/json", b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ),
        Case(
            "many-latents",
            "1M latents (8 MiB of JSON)",
            (422, "invalid_input"),
            as_json(lambda: {"latents": [[0, 0]] * 1_000_000}),
            path="/v1/decode",
        ),
        Case(
            "huge-pixels",
            "2M pixel values (one 16 MB array)",
            (422, "invalid_input"),
            lambda: ("application/json", b'{"pixels": [[' + b"0.5," * 2_000_000 + b"0.5]]}"),
        ),
        Case("huge-base64", "12 MiB of base64 garbage", bad, as_json(lambda: {"images": ["QUFB" * (3 * MiB)]})),
    ]


# -- sending -----------------------------------------------------------------------------------------------------------
def chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


@functools.cache
def payload(case: Case) -> tuple[str, bytes]:
    return case.body()


def send(port: int, case: Case, timeout: float = 120.0) -> tuple[int, str | None, int]:
    """One request on a fresh connection -> (status, error code or None, bytes of the body actually sent)."""
    content_type, body = payload(case)
    length = "Transfer-Encoding: chunked" if case.slow else f"Content-Length: {len(body)}"
    head = (
        f"POST {case.path} HTTP/1.1\r\nHost: {loadgen.HOST}\r\nContent-Type: {content_type}\r\n{length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((loadgen.HOST, port), timeout=timeout) as sock:
        sock.sendall(head)
        sent = 0
        pieces = chunks(body) if case.slow else iter([body[i : i + MiB] for i in range(0, len(body), MiB)])
        answer = b""
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed: stop sending
                break
            sent += len(piece)
            if case.slow:
                time.sleep(0.002)
                sock.setblocking(False)
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                if answer:
                    break
        sock.settimeout(timeout)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:  # reset after the answer, because the rest of the body was never read
            pass
    head_end = answer.find(b"\r\n\r\n")
    if not answer.startswith(b"HTTP/1.1 ") or head_end < 0:
        return 0, "no answer", sent
    status = int(answer[9:12])
    content = answer[head_end + 4 :]
    if b"transfer-encoding: chunked" in answer[:head_end].lower():
        content = content.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    code = None
    if status >= 400:
        try:
            code = json.loads(content).get("code")
        except ValueError:
            code = "not JSON"
    return status, code, sent


def concurrent(port: int, case: Case, n: int) -> list[tuple[int, str | None, int]]:
    results: list[tuple[int, str | None, int]] = []
    threads = [threading.Thread(target=lambda: results.append(send(port, case))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def measured(pid: int, run: Callable[[], object]) -> tuple[object, float, float, float, float]:
    """run() -> (its result, seconds, RSS before, peak RSS during, RSS after), MiB."""
    memory.reset_peak(pid)
    before = memory.rss_mb(pid)
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started, before, memory.peak_mb(pid), memory.rss_mb(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=loadgen.REPO / "checkpoints" / "mnist")
    parser.add_argument("--concurrent", type=int, default=8, help="copies of the heaviest legal uploads sent at once")
    parser.add_argument("--rounds", type=int, default=2, help="run everything this many times (RSS must not grow)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to wait after a round before its RSS is read"
    )
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)

    selected = [case for case in cases() if not args.only or case.name in args.only]
    heavy = [c for c in selected if c.name.startswith("at-cap") or c.name in ("over-cap-slow", "many-latents")]
    for case in selected:
        payload(case)  # built before the server starts: not part of any timing
    port = loadgen.free_port()
    command = loadgen.service_command(args.checkpoint, port, "--cpu-threads", "1")
    failures, peak, rounds = 0, 0.0, []
    print(loadgen.machine())
    with loadgen.Server("hostile", command, port, ready_path="/readyz") as server:
        pid = server.pid
        start_rss = memory.rss_mb(pid)
        peak_ok = memory.reset_peak(pid)
        for round_ in range(1, args.rounds + 1):
            singles, crowds = [], []
            for case in selected:
                (status, code, sent), seconds, before, high, after = measured(pid, functools.partial(send, port, case))
                good = (status, code) == case.expect
                failures += not good
                peak = max(peak, high)
                singles.append(
                    [
                        case.name,
                        case.what,
                        f"{sent / MiB:.2f}",
                        f"{case.expect[0]} {case.expect[1] or ''}",
                        f"{status} {code or ''}",
                        "yes" if good else "**NO**",
                        f"{seconds:.2f}",
                        f"{before:.0f}",
                        f"{high:.0f}",
                        f"{after:.0f}",
                    ]
                )
            for case in heavy:
                crowd = functools.partial(concurrent, port, case, args.concurrent)
                results, seconds, before, high, after = measured(pid, crowd)
                good = sum((status, code) == case.expect for status, code, _ in results)
                failures += len(results) - good
                peak = max(peak, high)
                crowds.append(
                    [
                        f"{args.concurrent} x {case.name}",
                        f"{good}/{len(results)}",
                        f"{seconds:.2f}",
                        f"{before:.0f}",
                        f"{high:.0f}",
                        f"{after:.0f}",
                    ]
                )
            time.sleep(args.settle)  # the server hands a burst's freed heap back within a second (service.memory)
            rounds.append(f"round {round_}: RSS {memory.rss_mb(pid):.0f} MiB after it, peak {peak:.0f} MiB so far")
            if round_ == 1:
                print(
                    loadgen.table(
                        [
                            "case",
                            "sent",
                            "MiB sent",
                            "expected",
                            "got",
                            "ok",
                            "s",
                            "RSS before MiB",
                            "peak RSS MiB",
                            "RSS after MiB",
                        ],
                        singles,
                        "llrllrrrrr",
                    )
                )
                print()
                print(
                    loadgen.table(
                        ["concurrent", "as documented", "s", "RSS before MiB", "peak RSS MiB", "RSS after MiB"], crowds
                    )
                )
        end_rss = memory.rss_mb(pid)
        alive = json.loads(loadgen.fetch(port, "/readyz"))["status"] == "ready"
    print()
    print("\n".join(rounds))
    print(
        f"server RSS: {start_rss:.0f} MiB at start, {peak:.0f} MiB peak, {end_rss:.0f} MiB at the end"
        + ("" if peak_ok else " (peak RSS could not be reset: per-case peaks are peaks since start)")
    )
    print(
        f"verdict: {'PASS' if failures == 0 and alive else 'FAIL'}: {failures} answer(s) not as documented over "
        f"{args.rounds} round(s); server still ready: {alive}"
    )
    return 1 if failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
