"""The server process's life over real HTTP (`python -m service`, uvicorn, a free loopback port, a tiny checkpoint):
SIGTERM under load lets the requests in flight finish with their right answers and refuses new ones, then the
process exits; a bad checkpoint stops it at start with one line and no traceback."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from e2e_helpers import free_port, models_dir, start_server, wait_ready

from model import checkpoint

pytestmark = pytest.mark.e2e


def decode_body(seed: int) -> tuple[bytes, torch.Tensor]:
    """A decode request for a seeded latent, and the tiny model's own answer to it."""
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(seed))
    return json.dumps({"latents": z.tolist(), "encoding": "pixels"}).encode(), z


def answer_matches(status: int, body: bytes, z: torch.Tensor, model: torch.nn.Module) -> bool:
    expected = model.mean_image(model.decode(z))
    return status == 200 and torch.allclose(torch.tensor(json.loads(body)["pixels"]), expected, atol=1e-5)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = checkpoint.load(tiny_checkpoint)[0]
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(models_dir(tmp_path, tiny_checkpoint), port, log, "--graceful-shutdown-s", "20")
    try:
        wait_ready(server, port, log)
        url = f"http://127.0.0.1:{port}/v1/decode"

        # Load: four clients sending seeded requests back to back, a new connection each, until refused.
        outcomes: list[str] = []

        def client(seed: int) -> None:
            while True:
                body, z = decode_body(seed)
                try:
                    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
                except httpx.ConnectError:
                    outcomes.append("refused")
                    return
                except httpx.TransportError:  # connected just as the server closed: never reached the app
                    outcomes.append("closed before an answer")
                    continue
                outcomes.append("right" if answer_matches(r.status_code, r.content, z, model) else f"{r.status_code}")
                seed += 4

        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for t in clients:
            t.start()
        # In flight: three requests whose bodies are half sent when the signal comes.
        slow = []
        for seed in range(100, 103):
            body, z = decode_body(seed)
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(
                f"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            slow.append((sock, body, z))
        time.sleep(1.0)
        assert "right" in outcomes, outcomes

        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the listening socket closes at once
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.05)
        assert server.poll() is None, "exited with requests in flight"
        for sock, body, _ in slow:  # the rest of each body, after the signal
            sock.sendall(body[len(body) // 2 :])
        for sock, _, z in slow:
            status, answer = read_response(sock)
            sock.close()
            assert answer_matches(status, answer, z, model), (status, answer[:200])
        for t in clients:
            t.join(timeout=30)
        # uvicorn re-raises the SIGTERM once it has shut down cleanly, so the status says "stopped by SIGTERM"; as a
        # container's PID 1 (where that signal is ignored) the process exits 0.
        assert server.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    wrong = [o for o in outcomes if o not in ("right", "refused", "closed before an answer")]
    assert wrong == [], wrong
    assert outcomes.count("refused") == 4
    assert "Application shutdown complete" in log.read_text() and "Finished server process" in log.read_text()


def test_a_bad_checkpoint_stops_the_process_with_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    models = tmp_path / "models"
    ckpt = models / "tiny"
    ckpt.mkdir(parents=True)
    for name in (checkpoint.CARD_FILE, checkpoint.WEIGHTS_FILE):
        (ckpt / name).write_bytes((tiny_checkpoint / name).read_bytes())
    weights = ckpt / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    log = tmp_path / "server.log"
    server = start_server(models, free_port(), log)
    code = server.wait(timeout=60)
    text = log.read_text()
    assert code != 0, text
    lines = [line for line in text.splitlines() if "vae-serve cannot start" in line]
    assert len(lines) == 1 and "cannot load model 'tiny'" in lines[0] and "sha256" in lines[0], text
    assert "Traceback" not in text, text
