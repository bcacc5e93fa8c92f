"""Helpers for the tests over real HTTP (imported by name: the test folders are not packages): a server process
on a free loopback port serving the tiny checkpoint, and the wait for it to be ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def models_dir(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """tmp_path/models holding the tiny checkpoint as `tiny`."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tiny_checkpoint, target_is_directory=True)
    return models


def start_server(models: Path, port: int, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`python -m service` serving `models` (default model `tiny`, one CPU thread, gRPC on a free port) on loopback,
    output to `log`."""
    # gRPC on a free port: the default (8001) may be taken by another server on this machine.
    env = {
        **os.environ,
        "VAE_DEFAULT_MODEL": "tiny",
        "VAE_CPU_THREADS": "1",
        "VAE_GRPC_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "service",
        "--models-dir",
        str(models),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        *flags,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(server: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60.0) -> None:
    """Poll /readyz until 200; fail with the server's log if it exits or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"server exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not ready in {timeout:g} s:\n{log.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.1)
