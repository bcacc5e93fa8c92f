"""Helpers for the service tests (imported by name: the test folders are not packages)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image

from service.main import create_app
from service.settings import Settings


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an in-process client (app exceptions become 500s, as in production)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield app, client


@contextmanager
def serve_app(app: FastAPI) -> Iterator[int]:
    """`app` served by uvicorn (its own event loop: uvloop where installed) in a thread on a free port, for clients
    that speak real HTTP (or, with grpc=True in its settings, gRPC on app.state.grpc_port); yields the HTTP port and
    stops the server after."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive(), "uvicorn did not stop within 30 s"


@contextmanager
def serve_http(settings: Settings) -> Iterator[str]:
    """The app for `settings`, served as serve_app does; yields its base URL."""
    with serve_app(create_app(settings)) as port:
        yield f"http://127.0.0.1:{port}"


# -- images and assertions ---------------------------------------------------------------------------------------------
def png(image: np.ndarray | Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    """uint8 (H, W) or (H, W, C), or a PIL image -> image file bytes (`options`: PIL's save options)."""
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **options)
    return buf.getvalue()


def digit_like(seed: int, size: tuple[int, int] = (8, 8), channels: int = 1) -> np.ndarray:
    """A bright rectangle on black, like the tiny models' training images, with grey levels."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.zeros((h, w, channels), dtype=np.uint8)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[top : top + h // 2, left : left + w // 2] = rng.integers(120, 256, size=channels)
    return img[:, :, 0] if channels == 1 else img


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 images at the model's size -> (N, C, H, W) in [0, 1], as the service preprocesses them."""
    t = torch.stack([torch.from_numpy(a.copy()).float().div(255) for a in arrays])
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)


def decode_png(data: bytes | str) -> torch.Tensor:
    """PNG (bytes or base64) -> (C, H, W) float in [0, 1]."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    arr = np.asarray(Image.open(io.BytesIO(raw)))
    t = torch.from_numpy(arr.copy()).float().div(255)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    """The one error shape: exactly {"detail": str, "code": str}, JSON content type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = json.loads(response.content)
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body
    return body


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst
