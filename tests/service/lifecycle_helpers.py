"""Helpers for the tests of model versions and changes at run time, over /v1 and v2 (imported by name: the test
folders are not packages). The fixtures they go with (other_checkpoint, weights, oracles, root) are in conftest.py."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from model import checkpoint
from model.vae import VAE
from service.settings import Settings

KEY = "admin-secret"
ADMIN = {"X-Admin-Key": KEY}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def put_version(folder: Path, version: str, source: Path) -> Path:
    """Copy a checkpoint in as a version the safe way: under a dot-name (never read), then renamed."""
    folder.mkdir(exist_ok=True)
    staging = folder / f".{version}.incoming"
    shutil.copytree(source, staging)
    os.replace(staging, folder / version)
    return folder / version


def settings(root: Path, **overrides: Any) -> Settings:
    """The models in `root`, the admin API on (KEY), no gRPC port unless a test asks for one."""
    values: dict[str, Any] = {
        "models_dir": root,
        "default_model": "tiny",
        "cpu_threads": 1,
        "admin_key": KEY,
        "grpc": False,
    }
    return Settings(**{**values, **overrides})


async def decode(client: httpx.AsyncClient, model: str | None, z: list[list[float]]) -> httpx.Response:
    query = "" if model is None else f"?model={model}"
    return await client.post(f"/v1/decode{query}", json={"latents": z, "encoding": "pixels"})


def computed_by(oracle: VAE, z: list[list[float]], pixels: Any) -> bool:
    """Whether `pixels` are the oracle's decoding of `z` (the decoder's mean)."""
    expected = oracle.mean_image(oracle.decode(torch.tensor(z)))
    return torch.allclose(torch.tensor(np.array(pixels, dtype=np.float32)), expected, **TOL)  # JSON lists or arrays


def seeded_latents(seed: int, n: int = 1) -> list[list[float]]:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)).tolist()


def corrupt_weights(version: Path) -> None:
    weights = version / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])


async def hold_across_a_reload(
    app: Any, client: httpx.AsyncClient, root: Path, weights: dict[str, Path], send: Callable[[], Awaitable[Any]]
) -> tuple[asyncio.Future[Any], asyncio.Future[Any], asyncio.Event]:
    """Start `send()` (a request for model `swap`, version 2 by default) and hold it between choosing its version and
    its batcher; retire version 2, put version 3 (weights "a") in its place and start a reload; return once version
    3 answers new requests. Returns the held request, the reload call, and the event that lets the request go on."""
    predictor = app.state.registry.models["swap"].predictor
    entered, opened = asyncio.Event(), asyncio.Event()
    real = predictor.decode_request

    async def held(call: Any) -> Any:
        entered.set()
        await opened.wait()
        return await real(call)

    predictor.decode_request = held
    in_flight = asyncio.ensure_future(send())
    await entered.wait()
    shutil.rmtree(root / "swap" / "2")
    put_version(root / "swap", "3", weights["a"])
    reload = asyncio.ensure_future(client.post("/v1/models/swap/reload", headers=ADMIN))
    while app.state.registry.models["swap"].version != "3":
        await asyncio.sleep(0.001)
    return in_flight, reload, opened
