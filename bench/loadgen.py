"""The one load generator every bench script uses, and the helpers they share (servers on loopback, tables).

Clients are asyncio Protocols over HTTP/1.1 keep-alive connections (uvloop when installed), each sending a
pre-built request and the next one as soon as the previous answer is complete: a closed loop, N requests in flight
for N clients. Parsing an answer is two `bytes.find` calls, so the generator costs far less CPU per request than any
server it measures; it still shares the machine with it, so on a small host the figures are relative, not absolute.
A run stops after `max_requests` answers or `duration` seconds, whichever comes first. Given a list of requests,
client n sends the list's entries n, n + clients, n + 2 * clients, ... (wrapping), and `on_answer` sees every answer.

    from bench import loadgen
    request = loadgen.get_request(port, "/healthz")
    result = loadgen.run(port, request, clients=64, max_requests=20000, duration=5.0)
    print(result.rps, result.percentile(99))
"""

from __future__ import annotations

import asyncio
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "vae-bench-boundary"
HOST = "127.0.0.1"


# -- requests ----------------------------------------------------------------------------------------------------------
def get_request(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n".encode()


def multipart_body(
    files: Sequence[bytes], field_name: str = "image", fields: dict[str, str] | None = None
) -> tuple[str, bytes]:
    """(Content-Type, body) of a form with one file part per entry of `files` (PNG) plus plain fields, as curl -F
    sends it."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    return f"multipart/form-data; boundary={BOUNDARY}", b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def multipart_request(
    port: int, path: str, files: Sequence[bytes], field_name: str = "image", fields: dict[str, str] | None = None
) -> bytes:
    """POST `path` with multipart_body(files, field_name, fields)."""
    content_type, body = multipart_body(files, field_name, fields)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def post_request(port: int, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    """POST `path` with a body of its own kind (a raw tensor, JSON)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def cuda_missing(device: str) -> bool:
    """True, after saying so, when `device` asks for CUDA and this machine has none: the benchmark then skips."""
    if not device.startswith("cuda"):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    print(f"skipped: --device {device} but CUDA is not available on this machine")
    return True


def digit_png(size: tuple[int, int] = (28, 28), channels: int = 1, variant: int = 0) -> bytes:
    """A small PNG at the model's input size, like a drawn digit (decoding it is part of a request's cost)."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("L" if channels == 1 else "RGB", (w, h), 0)
    shift = variant % 4
    box = (w * 0.25 + shift, h * 0.15, w * 0.75 - shift, h * 0.85)
    ImageDraw.Draw(image).ellipse(box, outline=255 if channels == 1 else (255,) * 3, width=max(1, w // 9))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def digit_pixels(size: tuple[int, int] = (28, 28), channels: int = 1, variant: int = 0) -> Any:
    """digit_png's pixels as a uint8 numpy array (C, H, W): the same image as a raw tensor body."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(digit_png(size, channels, variant))))
    return np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


# -- the load ----------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What one load run measured: one latency (seconds) per answered request."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        ok = self.requests - sum(n for s, n in self.statuses.items() if s != 200)
        return ok / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile latency in milliseconds (nearest rank; NaN when nothing was answered)."""
        return percentile(self.latencies, q) * 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# on_answer(request index, status, response head, body, when sent (perf_counter), latency s)
OnAnswer = Callable[[int, int, bytes, bytes, float, float], None]


class _Shared:
    def __init__(self, result: Result, budget: int, deadline: float, on_answer: OnAnswer | None = None) -> None:
        self.result = result
        self.budget = budget
        self.deadline = deadline
        self.on_answer = on_answer


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, read one whole answer (Content-Length framing), send again."""

    def __init__(
        self,
        shared: _Shared,
        request: bytes | Sequence[bytes],
        done: asyncio.Future[None],
        first: int = 0,
        step: int = 1,
    ) -> None:
        self.shared = shared
        self.requests = [request] if isinstance(request, bytes) else request
        self.index = first - step  # of the request in flight, in self.requests (wrapping)
        self.step = step
        self.done = done
        self.buffer = bytearray()
        self.need = -1  # bytes of the answer in flight once its head is parsed
        self.head_end = 0
        self.status = 0
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        self._send()

    def _send(self) -> None:
        s = self.shared
        if s.budget <= 0 or time.perf_counter() >= s.deadline:
            self._finish()
            return
        s.budget -= 1
        self.index += self.step
        self.started = time.perf_counter()
        self.transport.write(self.requests[self.index % len(self.requests)])  # type: ignore[union-attr]

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._fail()  # chunked or close-delimited answers are not supported: count it and stop
                return
            value_end = head.find(b"\r\n", at + 2)
            self.need = end + 4 + int(head[at + 17 : value_end if value_end >= 0 else None])
            self.status = int(head[9:12])
            self.head_end = end
        if len(self.buffer) < self.need:
            return
        latency = time.perf_counter() - self.started
        r = self.shared.result
        r.latencies.append(latency)
        r.statuses[self.status] = r.statuses.get(self.status, 0) + 1
        if self.status != 200:
            r.errors += 1
        if self.shared.on_answer is not None:
            head, body = bytes(self.buffer[: self.head_end]), bytes(self.buffer[self.head_end + 4 : self.need])
            index = self.index % len(self.requests)
            self.shared.on_answer(index, self.status, head, body, self.started, latency)
        del self.buffer[: self.need]
        self.need = -1
        self._send()

    def _fail(self) -> None:
        self.shared.result.errors += 1
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.shared.result.errors += 1  # the server closed the connection with an answer pending
            self.done.set_result(None)


async def load(
    port: int,
    request: bytes | Sequence[bytes],
    clients: int,
    max_requests: int,
    duration: float,
    on_answer: OnAnswer | None = None,
) -> Result:
    """`clients` connections to 127.0.0.1:`port`, each sending `request` (or its share of a list of requests) back
    to back, until `max_requests` answers or `duration` seconds; `on_answer` sees each answer."""
    loop = asyncio.get_running_loop()
    result = Result(clients=clients)
    shared = _Shared(result, max_requests, time.perf_counter() + duration, on_answer)
    done = [loop.create_future() for _ in range(clients)]
    started = time.perf_counter()
    for n, future in enumerate(done):
        try:
            await loop.create_connection(
                lambda f=future, n=n: _Client(shared, request, f, n, clients),  # type: ignore[misc]
                HOST,
                port,
            )
        except OSError:
            result.errors += 1
            future.set_result(None)
    await asyncio.gather(*done)
    result.seconds = time.perf_counter() - started
    return result


def run(port: int, request: bytes, clients: int, max_requests: int, duration: float) -> Result:
    """`load` on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(load(port, request, clients, max_requests, duration))


# -- servers -----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as answer:
        return bytes(answer.read())


class Server:
    """A server subprocess on loopback: started, polled until `ready_path` answers 200, stopped with SIGINT."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int,
        ready_path: str = "/healthz",
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        startup_s: float = 180.0,
    ) -> None:
        self.name = name
        self.port = port
        # A session of its own: stop() signals the whole process group, so servers that fork workers (LitServe) go
        # with their parent instead of lingering on the machine.
        self.process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True
        )
        deadline = time.monotonic() + startup_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name}: server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}{ready_path}", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name}: not ready within {startup_s:g} s")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGINT to the server's process group, SIGKILL to what is left of it after 30 s."""
        group = self.process.pid  # start_new_session: the group's id is the server's pid
        self._signal_group(group, signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 30
        while self._signal_group(group, 0) and time.monotonic() < deadline:  # forked workers still shutting down
            time.sleep(0.1)
        self._signal_group(group, signal.SIGKILL)
        self.process.wait()

    @staticmethod
    def _signal_group(group: int, sig: int) -> bool:
        """Send `sig` to the group; False when no process of it is left."""
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def service_command(checkpoint: Path, port: int, *flags: str, grpc_off: bool = True) -> list[str]:
    """`python -m service` serving one checkpoint quietly on loopback (no access log, warnings only), without its
    gRPC port (which would collide between servers; `grpc_off=False` for a source tree older than the flag)."""
    ckpt = Path(checkpoint).resolve()
    if grpc_off:
        flags = (*flags, "--no-grpc")
    return [
        sys.executable,
        "-m",
        "service",
        "--models",
        str(ckpt),
        "--default-model",
        ckpt.name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        *flags,
    ]


# -- reporting ---------------------------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; `align` is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_row(label: str, r: Result) -> list[Any]:
    """The standard columns for one load run: label, clients, answers, errors, req/s, p50/p90/p99 ms."""
    return [
        label,
        r.clients,
        r.requests,
        r.errors,
        f"{r.rps:.0f}",
        f"{r.percentile(50):.1f}",
        f"{r.percentile(90):.1f}",
        f"{r.percentile(99):.1f}",
    ]


LOAD_HEADERS = ["server", "clients", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line: CPU count and model, Python and the versions of the stack, the date."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for package in ("torch", "fastapi", "uvicorn", "pydantic"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            versions.append(f"{package} -")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU(s) ({cpu}), Python {platform.python_version()}, {', '.join(versions)}; "
        f"load average {load}; {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


class ProcStat(NamedTuple):
    parent: int
    cpu_seconds: float  # user + system
    page_faults: int  # minor + major, of every thread that ran in the process (or of the one thread)


def proc_stat(path: str | Path) -> ProcStat | None:
    """The parent pid, CPU seconds and page faults so far, from a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat
    file (Linux); None when it is gone (the process or thread ended) or unreadable. CPU per request is a server's
    cost in a form that a busy machine disturbs far less than requests/s; page faults per request show memory handed
    back and faulted in again on every request (docs/benchmarks.md, section 000000)."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return ProcStat(int(fields[1]), cpu, int(fields[7]) + int(fields[9]))
    except (OSError, ValueError, IndexError):
        return None
