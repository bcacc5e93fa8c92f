"""Peer (a): the FastAPI app people write by hand. One forward per request, inline in the `async def` handler (a
forward of these models takes tens of microseconds, less than a hop to a thread pool), uploads via UploadFile.

    .bench-venv/bin/python bench/peers/plain_fastapi.py --checkpoint checkpoints/mnist --port 8101
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402

from bench.peers.common import Peer  # noqa: E402


def create_app(peer: Peer) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/encode")
    async def encode(image: UploadFile = File(...)) -> dict:
        x = peer.image(await image.read())[None]
        mu, logvar = peer.encode(x)
        return peer.encode_answer(mu.tolist(), logvar.tolist())

    @app.get("/v1/sample")
    async def sample(n: int = 1, seed: int | None = None) -> dict:
        return peer.sample(n, seed if seed is not None else random.getrandbits(63))

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    peer = Peer(args.checkpoint, args.threads)
    peer.encode(torch.zeros(2, *peer.shape))  # warm-up
    uvicorn.run(create_app(peer), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
