"""VAEPredictor: one loaded checkpoint and its verbs, following LitServe's LitAPI contract.

    load / warmup    load the checkpoint, move it to the device, warm it up          (registry, once)
    decode_request   a Call (service.decoding) -> a Job: validated tensors           (event loop)
    predict          one batched forward under inference_mode                        (the batcher's worker thread)
    encode_response  the Job's outputs -> an Answer of plain values                  (event loop)

Everything that can reject a request happens in decode_request, before the item joins a batch, so one bad item
never fails its batch-mates. Nothing here knows HTTP: errors are service.errors' domain exceptions, and
service.rendering turns the Answer into a response.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import anomaly, checkpoint, latent, losses, preprocess
from model.vae import VAE, VAEConfig, VAEOutput, randn
from service import media, torch_threads
from service.errors import InvalidInput, OutOfMemory, UnsupportedForModel
from service.schemas import (
    Answer,
    Call,
    DecodeRequest,
    EncodeRequest,
    Encoding,
    InterpolateRequest,
    ManifoldRequest,
    ReconstructRequest,
    SampleRequest,
    ScoreRequest,
)

logger = logging.getLogger("vae_serve")

Tensors = dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Operations whose items from different requests can share one forward pass. "score" cannot: its importance
# samples come from each request's own generator inside model.losses, so each request runs on its own.
MERGEABLE_OPS = frozenset({"encode", "decode", "sample", "reconstruct"})
# Half the prior's central 90% interval for 2-D maps (the paper's Fig. 4 spans the prior's inverse CDF); for
# larger latents the same number of standard deviations along each principal direction of the training codes.
MANIFOLD_SPAN = 1.645
# Decoding and converting an image this large takes tens to hundreds of MB (a 4096x4096 RGBA upload: ~200 MB), so
# at most LARGE_DECODES of them run at once in the process: concurrent big uploads wait instead of adding up.
LARGE_IMAGE_PIXELS = 1024 * 1024
LARGE_DECODES = threading.BoundedSemaphore(2)
# Uploads up to this many pixels are decoded on the event loop (tens of microseconds); larger ones in a thread.
INLINE_PIXELS = 256 * 256


@dataclass
class Job:
    """A request as tensors for one model: what the batcher runs (`op` on `inputs`, plus `arg` for ops that cannot
    share a forward), and what encode_response needs besides the outputs."""

    op: str
    inputs: Tensors
    arg: Any = None
    seed: int | None = None
    binarized: bool = False
    plane: dict[str, Any] | None = None  # a manifold's basis, center, directions and span
    notes: list[str] = field(default_factory=list)  # inputs resized or converted to the model's channels


def fresh_seed() -> int:
    return random.getrandbits(63)


def generator(seed: int) -> torch.Generator:
    """A request's own CPU generator: its draws never depend on what else is in the batch, nor on the device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def float32_rows(t: torch.Tensor) -> np.ndarray:
    """A (N, ...) CPU float32 tensor as a C-contiguous array, for the answer's rows: service.rendering writes each
    number as the shortest decimal that reads back as the same float32 (orjson refuses strided arrays, and a model's
    outputs are often column slices of one tensor)."""
    return np.ascontiguousarray(t.numpy())


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

    def __init__(
        self,
        name: str,
        model: VAE,
        card: dict[str, Any],
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_image_pixels: int = 4096 * 4096,
        default_fpr: float = 0.05,
        version: str = "1",
    ) -> None:
        self.name = name
        self.version = version  # which of the model's versions this is: every answer names it
        self.max_image_pixels = max_image_pixels
        self.default_fpr = default_fpr
        self.model = model
        self.card = card
        self.path = path
        self.device = device
        self.dtype = dtype
        self.config: VAEConfig = model.config
        # The OOD score's calibration (model/anomaly.py), validated with the checkpoint; None: the checkpoint has
        # none, and /v1/score says so.
        self.calibration: anomaly.Calibration | None = anomaly.load_calibration(path, card)

    # -- setup ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name: str,
        path: Path,
        device: torch.device,
        dtype_name: str = "float32",
        max_image_pixels: int = 4096 * 4096,
        default_fpr: float = 0.05,
        version: str = "1",
    ) -> VAEPredictor:
        """Validate and load `path` (raises checkpoint.CheckpointError). Half precision applies on GPU only."""
        model, card = checkpoint.load(path, device)
        dtype = DTYPES[dtype_name] if device.type == "cuda" else torch.float32
        model = model.to(dtype=dtype)
        model.requires_grad_(False)
        return cls(name, model, card, path, device, dtype, max_image_pixels, default_fpr, version)

    def warmup(self) -> None:
        """One small forward of each mergeable op, so the first request pays no lazy-initialisation cost."""
        c, h, w = self.config.input_shape
        x = torch.full((2, c, h, w), 0.5)
        self.predict("encode", {"x": x})
        self.predict("decode", {"z": torch.zeros(2, self.config.latent_dim)})
        self.predict("sample", {"eps": torch.zeros(2, self.model.prior.noise_dim), "temperature": torch.ones(2)})
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
            "version": self.version,
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
            "calibrated": self.calibration is not None,
            "calibration": None if self.calibration is None else self.calibration.summary(),
            "card": card,
        }

    # -- decode_request: a Call -> a Job of validated tensors ---------------------------------------------------------
    async def decode_request(self, call: Call[Any]) -> Job:
        """The request as tensors for this model, checked against its shapes; raises InvalidPayload, ImageTooLarge,
        InvalidInput or UnsupportedForModel before anything joins a batch, so one bad item never fails its
        batch-mates. Seeds are drawn here, and every random number a request uses comes from its own generator,
        so its answer never depends on what it is batched with."""
        params = call.params
        if isinstance(params, EncodeRequest):
            x, notes = await self.images(call)
            if not params.sample:
                return Job("encode", {"x": x}, notes=notes)
            seed = params.seed if params.seed is not None else fresh_seed()
            return Job("encode", {"x": x, "eps": self.noise(len(x), generator(seed))}, seed=seed, notes=notes)
        if isinstance(params, DecodeRequest):
            if call.tensor is not None:
                return Job("decode", {"z": self.latents_array(call.tensor)})
            return Job("decode", {"z": self.latents_tensor(params.latents)})
        if isinstance(params, SampleRequest):
            seed = params.seed if params.seed is not None else fresh_seed()
            eps = self.prior_noise(params.n, generator(seed))
            # Through float64: a temperature past float32's range becomes inf, refused once decoded, not an error here.
            temperature = torch.full((params.n,), params.temperature, dtype=torch.float64).float()
            return Job("sample", {"eps": eps, "temperature": temperature}, seed=seed)
        if isinstance(params, ReconstructRequest | ScoreRequest):
            if isinstance(params, ScoreRequest):
                self.require_vae("scoring (ELBO and log-likelihood)")
            x, notes = await self.images(call)
            g = generator(params.seed)
            binarized = self.bernoulli and params.binarize is not False
            if binarized:
                x = preprocess.binarize(x, g)  # as Bernoulli models were trained and evaluated
            if isinstance(params, ScoreRequest):
                fpr = params.fpr if params.fpr is not None else self.default_fpr
                if self.calibration is not None and fpr < self.calibration.min_fpr:
                    raise InvalidInput(
                        f"fpr={fpr:g} is below what the calibration can resolve for model {self.name!r} "
                        f"({self.calibration.min_fpr:.2g}: 1 in {self.calibration.n + 1} held-out images)"
                    )
                job = Job("score", {"x": x}, (params.k, g, fpr), seed=params.seed, binarized=binarized, notes=notes)
                return job
            eps = self.noise(len(x), g)
            return Job("reconstruct", {"x": x, "eps": eps}, seed=params.seed, binarized=binarized, notes=notes)
        if isinstance(params, InterpolateRequest):
            path = (params.steps, params.path)
            if params.latents is None:
                x, notes = await self.images(call, exactly=2)
                return Job("interpolate", {"x": x}, path, notes=notes)
            if call.files or params.pixels:
                raise InvalidInput("send two images or two latents, not both")
            if len(params.latents) != 2:
                raise InvalidInput(f"send exactly 2 latents (got {len(params.latents)})")
            return Job("interpolate", {"z": self.latents_tensor(params.latents)}, path)
        if isinstance(params, ManifoldRequest):
            codes, plane = self.manifold_codes(params.steps)
            return Job("decode", {"z": codes}, plane=plane)
        raise TypeError(f"no request of type {type(params).__name__}")

    async def images(self, call: Call[Any], exactly: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """The Call's files or pixel arrays -> (N, C, H, W) in [0, 1] for this model, and a note for each image
        that had to be resized or converted to the model's channels. Uploads are decoded on the event loop when
        that is cheap (an 8-bit PNG at the model's size by libspng, any image up to INLINE_PIXELS by Pillow), in a
        thread otherwise."""
        if call.tensor is not None:
            x = self.images_tensor(call.tensor)
            if exactly is not None and len(x) != exactly:
                raise InvalidInput(f"send exactly {exactly} images (got {len(x)})")
            return x, []
        pixels = getattr(call.params, "pixels", None) or []
        n = len(call.files) + len(pixels)
        if exactly is not None and n != exactly:
            raise InvalidInput(f"send exactly {exactly} images (got {n})")
        if n == 0:
            raise InvalidInput("no images: upload files in field 'image', or send 'images' (base64) or 'pixels'")
        if pixels:
            return torch.stack([self.pixels_tensor(v, f"pixels[{i}]") for i, v in enumerate(pixels)]), []
        parts: list[np.ndarray | torch.Tensor] = []
        notes: list[str] = []
        for data, name in zip(call.files, call.names, strict=True):
            part = self.inline_image(data, name)
            if isinstance(part, Image.Image):
                part = await asyncio.to_thread(torch_threads.alone(self.image_tensor), part, name)
            parts.append(part)
            if not isinstance(part, np.ndarray):  # uint8 pixels are at the model's size and mode already
                note = self.conversion(data, name)
                if note:
                    notes.append(note)
        return self.stack_images(parts), notes

    def inline_image(self, data: bytes, name: str) -> np.ndarray | torch.Tensor | Image.Image:
        """One encoded image -> the model's input when that is cheap enough for the event loop: an 8-bit PNG at the
        model's size and mode by libspng (uint8 (H, W, C)), any image up to INLINE_PIXELS by Pillow. A larger one
        comes back opened but not decoded, for image_tensor in a thread."""
        _, h, w = self.input_shape
        ready = media.ready_png(data, self.input_shape) if h * w <= self.max_image_pixels else None
        if ready is not None:
            return ready
        image = media.open_image(data, self.max_image_pixels, name)
        if image.width * image.height <= INLINE_PIXELS:
            return self.image_input(image, name)
        return image

    def conversion(self, data: bytes, name: str) -> str | None:
        """What converting an (already validated) image to the model's input does to it; None when nothing changes."""
        image = media.open_image(data, self.max_image_pixels, name)
        c, h, w = self.input_shape
        mode = preprocess.MODES.get(c)
        changes = []
        if image.size != (w, h):
            changes.append(f"resized from {image.width}x{image.height} to {w}x{h}")
        if image.mode != mode:
            changes.append(f"converted from {image.mode} to {mode}")
        return f"{name} {' and '.join(changes)}" if changes else None

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
        return torch.stack(
            [part if isinstance(part, torch.Tensor) else preprocess.unit_floats(part[None])[0] for part in parts]
        )

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

    def images_tensor(self, array: np.ndarray, what: str = "the tensor") -> torch.Tensor:
        """A raw tensor of images (N, C, H, W), uint8 in 0..255 or floats in [0, 1], at the model's exact shape ->
        float32 (N, C, H, W) in [0, 1]; raises InvalidInput naming the expected shape or range against the given."""
        c, h, w = self.input_shape
        if array.ndim != 4 or tuple(array.shape[1:]) != (c, h, w) or len(array) == 0:
            raise InvalidInput(
                f"{what} has shape {list(array.shape)}; model {self.name!r} takes images shaped [N, {c}, {h}, {w}]"
            )
        if array.dtype == np.uint8:
            return torch.from_numpy(array.astype(np.float32) / 255.0)
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not bool(torch.isfinite(t).all()) or float(t.min()) < 0.0 or float(t.max()) > 1.0:
            raise InvalidInput(f"{what} must hold finite values in [0, 1] (or uint8 pixels in 0..255)")
        return t

    def latents_array(self, array: np.ndarray, what: str = "the tensor") -> torch.Tensor:
        """A raw tensor of latents (N, latent_dim) -> float32; raises InvalidInput on a wrong shape or a non-finite
        value."""
        if array.ndim != 2 or array.shape[1] != self.latent_dim or len(array) == 0:
            raise InvalidInput(
                f"{what} has shape {list(array.shape)}; model {self.name!r} takes latents shaped [N, {self.latent_dim}]"
            )
        z = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not bool(torch.isfinite(z).all()):
            raise InvalidInput(f"{what} must be finite float32 numbers (no NaN, no infinity, |v| < 3.4e38)")
        return z

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
        """(n, latent_dim) N(0, I) noise for posterior samples (z = mu + sigma * eps), from the request's own
        generator, drawn before batching (model.vae.randn), so a request's result never depends on what it was
        batched with."""
        return randn((n, self.latent_dim), generator, like=torch.empty(0))

    def prior_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, noise_dim) noise for prior samples, drawn before batching like `noise`; the prior's transform turns
        it into codes in the batched forward (model/priors.py: for a VampPrior noise_dim is latent_dim + 1)."""
        return self.model.prior.noise(n, generator)

    def manifold_codes(self, steps: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The steps x steps grid of codes (row-major) for /v1/manifold and how it was made.

        2-D VAEs with the standard normal prior: the prior's plane. Otherwise (a learned prior's density is not
        centred on that plane either): the plane of the two leading principal directions of the training codes
        recorded in the card (raises UnsupportedForModel when the card has none)."""
        if self.latent_dim == 2 and self.is_vae and self.config.prior == "standard":
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
        return codes, {
            "basis": basis,
            "center": center.tolist(),
            "directions": directions.tolist(),
            "span": span.tolist(),
        }

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
        halves = [
            self.predict(op, {k: v[i : i + (n + 1) // 2] for k, v in inputs.items()}, arg) for i in (0, (n + 1) // 2)
        ]
        return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}

    def _forward(self, op: str, inputs: Tensors, arg: Any) -> Tensors:
        with torch.inference_mode():
            t = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in inputs.items()}
            if op == "encode":
                out = self._encode(t["x"], t.get("eps"))
            elif op == "decode":
                out = {"image": self._images(t["z"])}
            elif op == "sample":
                z = self.model.prior.transform(t["eps"], t["temperature"])  # each row its own temperature
                out = {"z": z, "image": self._images(z)}
            elif op == "reconstruct":
                out = self._reconstruct(t["x"], t["eps"])
            elif op == "score":
                k, g, fpr = arg
                out = self._score(t["x"], k, g, fpr)
            elif op == "interpolate":
                steps, path = arg
                ends = self.model.encode(t["x"])[0] if "x" in t else t["z"]
                z = (latent.slerp if path == "spherical" else latent.lerp)(ends[0], ends[1], steps)
                out = {"z": z, "image": self._images(z)}
            else:
                raise ValueError(f"unknown op {op!r}")
            return {k: v.float().cpu() for k, v in out.items()}

    def _images(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.mean_image(self.model.decode(z))

    def _encode(self, x: torch.Tensor, eps: torch.Tensor | None) -> Tensors:
        mu, logvar = self.model.encode(x)
        out = {"mu": mu, "logvar": logvar}
        if eps is not None:
            out["z"] = self.model.reparameterize(mu, logvar, eps)
        return out

    def _reconstruct(self, x: torch.Tensor, eps: torch.Tensor) -> Tensors:
        """Reconstruction from the posterior mean (deterministic) and the one-sample ELBO terms."""
        mu, logvar = self.model.encode(x)
        z = self.model.reparameterize(mu, logvar, eps)
        params = self.model.decode(torch.cat([z, mu]))
        sampled, at_mean = torch.split(params, len(x))
        terms = losses.elbo_from_output(self.model, x, VAEOutput(mu=mu, logvar=logvar, z=z, params=sampled))
        return {"image": self.model.mean_image(at_mean), "elbo": terms.elbo, "recon": terms.recon, "kl": terms.kl}

    def _score(self, x: torch.Tensor, k: int, generator: torch.Generator, fpr: float) -> Tensors:
        """ELBO terms and the k-sample log-likelihood, the input's complexity, and (calibrated models, on inputs
        prepared as calibrated) the OOD score, its p-value and the decision at `fpr`."""
        stats = anomaly.score_statistics(self.model, x, k=k, generator=generator)
        if self.ood_note(self.bernoulli and not bool(((x == 0) | (x == 1)).all())) is None:
            assert self.calibration is not None
            stats |= self.calibration.assess(stats, fpr)
        return stats

    def ood_note(self, grey_bernoulli_input: bool = False) -> str | None:
        """Why this model's scores carry no calibrated OOD score, or None when they do."""
        if self.calibration is None:
            return f"model {self.name!r} has no calibration: run python -m model.calibrate on its checkpoint"
        if grey_bernoulli_input:
            return "the OOD score is calibrated on binarised inputs, as Bernoulli models see them: send binarize=true"
        return None

    # -- encode_response: the outputs -> an Answer of plain values ---------------------------------------------------
    def encode_response(self, job: Job, out: Tensors, call: Call[Any]) -> Answer:
        """The batch's outputs for this request -> the Answer's fields and images (no HTTP here). Latents far
        outside the prior (finite, but huge) can overflow the decoder: that is the request's fault, a 422 here,
        never NaN pixels."""
        params = call.params
        encoding: Encoding = getattr(params, "encoding", "png")
        fields: dict[str, Any] = {"model": self.name, "version": self.version}
        self.check_decoded(job, out)
        if job.op == "encode":
            keys: list[str] = [k for k in ("mu", "logvar", "z") if k in out]  # Posterior's fields
            if call.format == "tensor":  # one array: the latent (z when sampled, else mu), or the whole posterior
                fields |= {"latent_dim": self.latent_dim, "seed": job.seed}
                if getattr(call.options, "posterior", False):
                    posterior = np.stack([out[k].numpy() for k in keys], axis=1)
                    return Answer(fields, notes=job.notes, tensor=posterior, tensor_fields=keys)
                return Answer(fields, notes=job.notes, tensor=float32_rows(out.get("z", out["mu"])))
            rows = zip(*(float32_rows(out[k]) for k in keys), strict=True)
            fields |= {
                "latent_dim": self.latent_dim,
                "seed": job.seed,
                "results": [dict(zip(keys, row, strict=True)) for row in rows],
            }
            return Answer(fields, notes=job.notes)
        if job.op == "score":
            _, _, fpr = job.arg
            calibrated = "ood_score" in out
            if call.format == "tensor":  # (N, columns): the JSON's result fields as columns, in their order
                elbo, ll = out["elbo"], out["log_likelihood"]
                columns = {
                    "elbo": elbo,
                    "recon": out["recon"],
                    "kl": out["kl"],
                    "elbo_bits_per_dim": losses.bits_per_dim(-elbo, self.config.input_dim),
                    "log_likelihood": ll,
                    "bits_per_dim": losses.bits_per_dim(-ll, self.config.input_dim),
                    "complexity_bits": out["complexity_bits"],
                }
                if calibrated:
                    columns |= {k: out[k] for k in ("ood_score", "p_value", "is_anomaly")}
                table = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in columns.values()], dim=1)
                fields |= {"seed": job.seed, "calibrated": calibrated, "fpr": fpr if calibrated else None}
                return Answer(fields, tensor=table.numpy(), tensor_fields=list(columns), notes=job.notes)
            stats = ("elbo", "recon", "kl", "log_likelihood", "complexity_bits")
            rows = zip(*(out[key].tolist() for key in stats), strict=True)
            results = [
                {
                    "elbo": e,
                    "recon": r,
                    "kl": kl,
                    "elbo_bits_per_dim": self.bits_per_dim(-e),
                    "log_likelihood": ll,
                    "bits_per_dim": self.bits_per_dim(-ll),
                    "complexity_bits": c,
                }
                for e, r, kl, ll, c in rows
            ]
            if calibrated:
                for result, score, p, flag in zip(
                    results, out["ood_score"].tolist(), out["p_value"].tolist(), out["is_anomaly"].tolist(), strict=True
                ):
                    result |= {"ood_score": score, "p_value": p, "is_anomaly": bool(flag)}
            fields |= {
                "k": params.k,
                "seed": job.seed,
                "binarized": job.binarized,
                "calibrated": calibrated,
                "fpr": fpr if calibrated else None,
                "ood_note": None if calibrated else self.ood_note(not job.binarized and self.bernoulli),
                "results": results,
            }
            return Answer(fields, notes=job.notes)
        if job.op == "reconstruct":
            rows = zip(out["elbo"].tolist(), out["recon"].tolist(), out["kl"].tolist(), strict=True)
            results = [{"elbo": e, "recon": r, "kl": k, "elbo_bits_per_dim": self.bits_per_dim(-e)} for e, r, k in rows]
            fields |= {"seed": job.seed, "binarized": job.binarized, "results": results}
            return Answer(fields, out["image"], encoding, notes=job.notes)
        if job.op == "sample":
            fields |= {"seed": job.seed, "temperature": params.temperature, "latents": out["z"].tolist()}
            return Answer(fields, out["image"], encoding)
        if job.op == "interpolate":
            fields |= {"path": params.path, "latents": out["z"].tolist()}
            return Answer(fields, out["image"], encoding, nrow=len(out["image"]), notes=job.notes)
        if job.plane is not None:  # manifold
            fields |= {"steps": params.steps, **job.plane, "latents": job.inputs["z"].tolist()}
            return Answer(fields, out["image"], encoding, nrow=params.steps, padding=0)
        return Answer(fields, out["image"], encoding)  # decode

    def encode_tensors(self, job: Job, out: Tensors) -> Tensors:
        """encode_response's values as whole-batch tensors, for answers that are tensors (the Open Inference
        Protocol, service.v2): the same checks, score's bits per dimension added, no per-item rows."""
        self.check_decoded(job, out)
        if job.op != "score":
            return out
        dims = self.config.input_dim
        bits = {"elbo_bits_per_dim": -out["elbo"], "bits_per_dim": -out["log_likelihood"]}
        return out | {k: torch.as_tensor(losses.bits_per_dim(nats, dims)) for k, nats in bits.items()}

    @staticmethod
    def check_decoded(job: Job, out: Tensors) -> None:
        """Decoded images (and their latents) must be finite: latents far outside the prior (finite, but huge) can
        overflow the decoder, which is the request's fault (InvalidInput), never NaN pixels in an answer."""
        if "image" in out and "elbo" not in out:
            z = out.get("z", job.inputs.get("z"))
            # numpy: two torch ops on the event loop cost several times as much
            if not np.isfinite(out["image"].numpy()).all() or (z is not None and not np.isfinite(z.numpy()).all()):
                raise InvalidInput("the latents are too large: they or the decoder's output overflow float32")

    def bits_per_dim(self, nats: float) -> float:
        return float(losses.bits_per_dim(nats, self.config.input_dim))
