"""VAEPredictor: one loaded checkpoint and its verbs, following LitServe's LitAPI contract.

    setup            load the checkpoint, move it to the device, warm it up            (lifespan, once)
    decode_request   bytes / pixel arrays / latents -> validated tensors               (request handlers)
    predict          one batched forward under inference_mode                          (batcher's worker thread)
    encode_response  tensors -> PIL images, grids                                      (request handlers)

Everything that can reject a request happens in decode_request, before the item joins a batch, so one bad item
never fails its batch-mates.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import checkpoint, latent, losses, preprocess
from model.vae import VAE, VAEConfig, VAEOutput, randn
from service import media
from service.errors import InvalidInput, OutOfMemory, UnsupportedForModel

logger = logging.getLogger("vae_serve")

Tensors = dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Operations whose items from different requests can share one forward pass. "score" cannot: its importance
# samples come from each request's own generator inside model.losses, so each request runs on its own.
MERGEABLE_OPS = frozenset({"encode", "decode", "reconstruct"})
# Half the prior's central 90% interval for 2-D maps (the paper's Fig. 4 spans the prior's inverse CDF); for
# larger latents the same number of standard deviations along each principal direction of the training codes.
MANIFOLD_SPAN = 1.645
# Decoding and converting an image this large takes tens to hundreds of MB (a 4096x4096 RGBA upload: ~200 MB), so
# at most LARGE_DECODES of them run at once in the process: concurrent big uploads wait instead of adding up.
LARGE_IMAGE_PIXELS = 1024 * 1024
LARGE_DECODES = threading.BoundedSemaphore(2)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class VAEPredictor:
    """A checkpoint loaded for inference.

    Inputs are validated here (raising InvalidPayload / ImageTooLarge / InvalidInput / UnsupportedForModel);
    `predict` takes already-validated CPU tensors with a leading batch dimension and returns CPU float32 tensors.
    """

    def __init__(self, name: str, model: VAE, card: dict[str, Any], path: Path, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.name = name
        self.model = model
        self.card = card
        self.path = path
        self.device = device
        self.dtype = dtype
        self.config: VAEConfig = model.config

    # -- setup ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str, path: Path, device: torch.device, dtype_name: str = "float32") -> VAEPredictor:
        """Validate and load `path` (raises checkpoint.CheckpointError). Half precision applies on GPU only."""
        model, card = checkpoint.load(path, device)
        dtype = DTYPES[dtype_name] if device.type == "cuda" else torch.float32
        model = model.to(dtype=dtype)
        model.requires_grad_(False)
        return cls(name, model, card, path, device, dtype)

    def warmup(self) -> None:
        """One small forward of each mergeable op, so the first request pays no lazy-initialisation cost."""
        c, h, w = self.config.input_shape
        x = torch.full((2, c, h, w), 0.5)
        self.predict("encode", {"x": x})
        self.predict("decode", {"z": torch.zeros(2, self.config.latent_dim)})
        self.predict("reconstruct", {"x": x, "eps": torch.zeros(2, self.config.latent_dim)})

    # -- facts -----------------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.input_shape

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def is_vae(self) -> bool:
        return self.model.stochastic

    @property
    def bernoulli(self) -> bool:
        return self.config.likelihood == "bernoulli"

    def require_vae(self, verb: str) -> None:
        """Raises UnsupportedForModel for verbs that need a posterior and a prior (likelihoods, prior samples)."""
        if not self.is_vae:
            raise UnsupportedForModel(
                f"model {self.name!r} is a plain autoencoder (kind 'ae'): it defines no prior or likelihood, "
                f"so {verb} is not available for it"
            )

    def info(self) -> dict[str, Any]:
        card = self.card
        return {
            "name": self.name,
            "description": card.get("description"),
            "kind": self.config.kind,
            "likelihood": self.config.likelihood,
            "latent_dim": self.latent_dim,
            "input_shape": list(self.input_shape),
            "input": card.get("input") or {},
            "architecture": self.config.to_dict(),
            "metrics": card.get("metrics") or {},
            "weights": card.get("weights") or {},
            "dataset": card.get("dataset") or {},
            "created": card.get("created"),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "card": card,
        }

    # -- decode_request -------------------------------------------------------------------------------------------
    def image_tensor(self, image: Image.Image, what: str = "image") -> torch.Tensor:
        """An opened image (media.open_image) of any size and mode -> (C, H, W) in [0, 1], converted exactly as
        training did. Raises InvalidPayload for truncated or corrupt data. Blocks while LARGE_DECODES large images
        are being converted (call it off the event loop for those)."""
        with LARGE_DECODES if image.width * image.height > LARGE_IMAGE_PIXELS else nullcontext():
            return preprocess.pil_to_tensor(media.load_image(image, what), self.input_shape)

    def image_input(self, image: Image.Image, what: str = "image") -> np.ndarray | torch.Tensor:
        """image_tensor, minus its per-image tensor ops for the common upload that is already at the model's mode and
        size: that one comes back as its uint8 pixels (H, W, C), for stack_images to scale with the rest."""
        ready = preprocess.ready_pixels(media.load_image(image, what), self.input_shape)
        return ready if ready is not None else self.image_tensor(image, what)

    @staticmethod
    def stack_images(parts: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """image_input / image_tensor results, in order -> (N, C, H, W) in [0, 1]."""
        arrays = [part for part in parts if isinstance(part, np.ndarray)]
        if len(arrays) == len(parts):
            return preprocess.unit_floats(np.stack(arrays) if len(arrays) > 1 else arrays[0][None])
        return torch.stack([part if isinstance(part, torch.Tensor) else preprocess.unit_floats(part[None])[0]
                            for part in parts])  # fmt: skip

    def pixels_tensor(self, value: Any, what: str = "pixels") -> torch.Tensor:
        """A pixel array in [0, 1] shaped (C, H, W), (H, W) for one channel, or flat C*H*W -> (C, H, W)."""
        c, h, w = self.input_shape
        try:
            t = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InvalidInput(f"{what} must be a rectangular array of numbers") from None
        if t.numel() != c * h * w or not (t.shape == (c, h, w) or t.shape == (h, w) and c == 1 or t.dim() == 1):
            expected = f"({c}, {h}, {w})" + (f", ({h}, {w})" if c == 1 else "") + f" or flat {c * h * w}"
            raise InvalidInput(f"{what} has shape {tuple(t.shape)}; model {self.name!r} takes {expected}")
        if not bool(torch.isfinite(t).all()) or float(t.min()) < 0.0 or float(t.max()) > 1.0:
            raise InvalidInput(f"{what} must hold finite values in [0, 1]")
        return t.reshape(c, h, w)

    def latents_tensor(self, rows: list[list[float]], what: str = "latents") -> torch.Tensor:
        """Latent vectors -> (n, latent_dim) float32; raises InvalidInput on a wrong length or a non-finite value."""
        for i, row in enumerate(rows):
            if len(row) != self.latent_dim:
                raise InvalidInput(
                    f"{what}[{i}] has {len(row)} values; model {self.name!r} has latent_dim {self.latent_dim}"
                )
        z = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), self.latent_dim)
        if not bool(torch.isfinite(z).all()):
            raise InvalidInput(f"{what} must be finite float32 numbers (no NaN, no infinity, |v| < 3.4e38)")
        return z

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, latent_dim) N(0, I) noise from the request's own generator, drawn before batching (model.vae.randn),
        so a request's result never depends on what it was batched with."""
        return randn((n, self.latent_dim), generator, like=torch.empty(0))

    def manifold_codes(self, steps: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The steps x steps grid of codes (row-major) for /v1/manifold and how it was made.

        2-D VAEs: the prior's plane. Otherwise: the plane of the two leading principal directions of the training
        codes recorded in the card (raises UnsupportedForModel when the card has none)."""
        if self.latent_dim == 2 and self.is_vae:
            center, directions, stddevs = torch.zeros(2), torch.eye(2), torch.ones(2)
            basis = "prior"
        else:
            stats = self.card.get("latent_stats") or {}
            try:
                center = torch.tensor(stats["mean"], dtype=torch.float32)
                directions = torch.tensor(stats["principal_directions"], dtype=torch.float32)
                stddevs = torch.tensor(stats["principal_stddevs"], dtype=torch.float32)
                ok = center.shape == (self.latent_dim,) and directions.shape == (2, self.latent_dim)
                ok = ok and stddevs.shape == (2,)
            except (KeyError, TypeError, ValueError, RuntimeError):
                ok = False
            if not ok:
                raise UnsupportedForModel(
                    f"model {self.name!r} has latent_dim {self.latent_dim} and its card records no two principal "
                    "directions of the training codes (latent_stats), so it has no 2-D latent map"
                )
            basis = "principal_directions"
        span = MANIFOLD_SPAN * stddevs
        codes = latent.manifold_grid(steps, center, directions, span)
        return codes, {"basis": basis, "center": center.tolist(), "directions": directions.tolist(),
                       "span": span.tolist()}  # fmt: skip

    def interpolation_path(self, z0: torch.Tensor, z1: torch.Tensor, steps: int, kind: str) -> torch.Tensor:
        """`steps` codes from z0 to z1, ends included, along a straight line or a great circle -> (steps, D)."""
        return (latent.slerp if kind == "spherical" else latent.lerp)(z0, z1, steps)

    # -- predict (worker thread only) ------------------------------------------------------------------------------
    def predict(self, op: str, inputs: Tensors, arg: Any = None) -> Tensors:
        """One forward pass for a batch: `inputs` are CPU tensors with a shared leading dimension.

        A batch of a mergeable op (rows independent) that runs the device out of memory is split in halves and
        retried, with identical results; OutOfMemory when one image (or an unmergeable call) still does not fit."""
        try:
            return self._forward(op, inputs, arg)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        # Outside the `except`: its traceback holds the failed pass's tensors.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        n = len(next(iter(inputs.values())))
        if op not in MERGEABLE_OPS or n == 1:
            what = "a single image" if op in MERGEABLE_OPS else f"{op} of {n} images (send fewer, or a smaller k)"
            raise OutOfMemory(f"model {self.name!r} ran out of memory on {self.device} for {what}")
        logger.warning("%s of %d images ran out of memory on %s; retrying in halves", op, n, self.device)
        halves = [self.predict(op, {k: v[i : i + (n + 1) // 2] for k, v in inputs.items()}, arg)
                  for i in (0, (n + 1) // 2)]  # fmt: skip
        return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}

    def _forward(self, op: str, inputs: Tensors, arg: Any) -> Tensors:
        with torch.inference_mode():
            moved = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in inputs.items()}
            if op == "encode":
                out = self._encode(**moved)
            elif op == "decode":
                out = self._decode(**moved)
            elif op == "reconstruct":
                out = self._reconstruct(**moved)
            elif op == "score":
                k, generator = arg
                out = self._score(moved["x"], k, generator)
            else:
                raise ValueError(f"unknown op {op!r}")
            return {k: v.float().cpu() for k, v in out.items()}

    def _reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # Pre-drawn noise (see `noise`); the plain autoencoder's code is its mean.
        return self.model.reparameterize(mu, logvar, eps)

    def _encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> Tensors:
        mu, logvar = self.model.encode(x)
        out = {"mu": mu, "logvar": logvar}
        if eps is not None:
            out["z"] = self._reparameterize(mu, logvar, eps)
        return out

    def _decode(self, z: torch.Tensor) -> Tensors:
        return {"image": self.model.mean_image(self.model.decode(z))}

    def _reconstruct(self, x: torch.Tensor, eps: torch.Tensor) -> Tensors:
        """Reconstruction from the posterior mean (deterministic) and the one-sample ELBO terms."""
        mu, logvar = self.model.encode(x)
        z = self._reparameterize(mu, logvar, eps)
        params = self.model.decode(torch.cat([z, mu]))
        sampled, at_mean = torch.split(params, len(x))
        terms = losses.elbo_from_output(self.model, x, VAEOutput(mu=mu, logvar=logvar, z=z, params=sampled))
        return {"image": self.model.mean_image(at_mean), "elbo": terms.elbo, "recon": terms.recon, "kl": terms.kl}

    def _score(self, x: torch.Tensor, k: int, generator: torch.Generator) -> Tensors:
        terms = losses.elbo(self.model, x, generator=generator)
        ll = losses.iwae_log_likelihood(self.model, x, k=k, generator=generator)
        return {"elbo": terms.elbo, "recon": terms.recon, "kl": terms.kl, "log_likelihood": ll}

    # -- encode_response -------------------------------------------------------------------------------------------
    def bits_per_dim(self, nats: float) -> float:
        return float(losses.bits_per_dim(nats, self.config.input_dim))

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        return [preprocess.tensor_to_pil(img) for img in images]

    @staticmethod
    def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
        """(N, C, H, W) -> one image, row by row (`nrow` per row; default: a square)."""
        nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
        return preprocess.tensor_to_pil(preprocess.make_grid(images, nrow=nrow, padding=padding))
