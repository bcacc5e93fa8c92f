"""What both peers share: the checkpoint, loaded by the project's own loader, and the two verbs they serve, written
the way a hand-made server would: PIL to a tensor, one forward under inference_mode, JSON with the same fields as
vae-serve's answers. Imports only the `model` package (pure PyTorch), so it runs in the peers' environment."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model import checkpoint, preprocess


class Peer:
    """One checkpoint and its verbs; `threads` sets torch's intra-op threads, as the served model would have."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.name = Path(path).resolve().name
        self.model, _ = checkpoint.load(path, "cpu")
        self.model.requires_grad_(False)
        self.shape = self.model.config.input_shape
        self.latent_dim = self.model.config.latent_dim

    def image(self, data: bytes) -> torch.Tensor:
        """PNG/JPEG bytes -> (C, H, W) in [0, 1], converted as training did."""
        return preprocess.pil_to_tensor(Image.open(io.BytesIO(data)), self.shape)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return self.model.encode(x)

    def encode_answer(self, mu: list[list[float]], logvar: list[list[float]]) -> dict[str, Any]:
        results = [{"mu": m, "logvar": v} for m, v in zip(mu, logvar, strict=True)]
        return {"model": self.name, "latent_dim": self.latent_dim, "results": results}

    def sample(self, n: int, seed: int) -> dict[str, Any]:
        """n images from the prior, as base64 PNGs (the shape of vae-serve's JSON answer)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            z = torch.randn(n, self.latent_dim, generator=generator)
            images = self.model.mean_image(self.model.decode(z))
        pngs = []
        for image in images:
            buf = io.BytesIO()
            preprocess.tensor_to_pil(image).save(buf, format="PNG", compress_level=1)
            pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"model": self.name, "seed": seed, "temperature": 1.0, "latents": z.tolist(), "images": pngs}
