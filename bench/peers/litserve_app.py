"""Peer (b): LitServe with its batching on (max_batch_size 64, a batch_timeout window), LitServe's defaults otherwise
(one API server process, one inference worker process on CPU). LitServe serves POST only, so /v1/sample is a POST.

    .bench-venv/bin/python bench/peers/litserve_app.py --checkpoint checkpoints/mnist --port 8102
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import litserve as ls  # noqa: E402
import torch  # noqa: E402

from bench.peers.common import Peer  # noqa: E402


class PeerAPI(ls.LitAPI):
    """A LitAPI serving the checkpoint through bench/peers/common.Peer (loaded in LitServe's worker process)."""

    def __init__(self, checkpoint: str, threads: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint, self.threads = checkpoint, threads

    def setup(self, device: str) -> None:
        self.peer = Peer(self.checkpoint, self.threads)


class EncodeAPI(PeerAPI):
    def decode_request(self, request) -> torch.Tensor:  # type: ignore[no-untyped-def]  # no annotation: the raw form
        return self.peer.image(request["image"].file.read())

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.peer.encode(x)

    def unbatch(self, output: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[list[float], list[float]]]:
        mu, logvar = output
        return list(zip(mu.tolist(), logvar.tolist(), strict=True))

    def encode_response(self, output: tuple[list[float], list[float]]) -> dict:
        return self.peer.encode_answer([output[0]], [output[1]])


class SampleAPI(PeerAPI):
    def decode_request(self, request) -> int:  # type: ignore[no-untyped-def]
        return int(request.get("n", 1)) if isinstance(request, dict) else 1

    def predict(self, n: int) -> dict:
        return self.peer.sample(n, random.getrandbits(63))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds LitServe waits for a batch to fill")
    args = p.parse_args()
    apis = [
        EncodeAPI(
            args.checkpoint,
            args.threads,
            api_path="/v1/encode",
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
        ),
        SampleAPI(args.checkpoint, args.threads, api_path="/v1/sample"),
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, healthcheck_path="/healthz")
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
