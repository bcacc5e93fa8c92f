"""The Variational Autoencoder of Kingma & Welling (2014), config-driven.

VAEConfig holds every architecture setting; it is stored in the checkpoint so a served model is rebuilt exactly.
The encoder q(z|x) is a diagonal Gaussian; the decoder p(x|z) is Bernoulli (logits) or Gaussian (mean and
log-variance per pixel). Encoder and decoder bodies are either MLPs (the paper's) or strided convolutions, the
latter optionally with residual blocks. The prior p(z) is the standard normal, a RealNVP flow or a VampPrior
(model/priors.py); every choice keeps one latent vector per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.priors import LOG_2PI, FlowPrior, Prior, StandardNormalPrior, Temperature, VampPrior
from model.priors import randn as randn  # re-exported: the service draws each request's noise with it

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU, "softplus": nn.Softplus}
LIKELIHOODS = ("bernoulli", "gaussian")
BODIES = ("mlp", "conv")
UPSAMPLES = ("transpose", "subpixel")
KINDS = ("vae", "ae")
PRIORS = ("standard", "flow", "vamp")


@dataclass(frozen=True)
class VAEConfig:
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    latent_dim: int = 20
    encoder: str = "mlp"  # "mlp" | "conv"
    decoder: str = "mlp"  # "mlp" | "conv"
    hidden_dims: tuple[int, ...] = (500,)  # MLP widths (encoder order; the decoder mirrors them)
    conv_channels: tuple[int, ...] = (32, 64)  # one stride-2 conv per entry
    # How the conv decoder doubles a side: "transpose" (ConvTranspose2d, kernel 4) or "subpixel" (a 3x3 conv to
    # 4x the channels, then pixel shuffle; Shi et al. 2016). Sub-pixel is a superset of the transposed conv and runs
    # ~1.4x faster on CPU, which matters when the k=5000 likelihood estimate decodes 50 million latents.
    upsample: str = "transpose"
    activation: str = "relu"
    likelihood: str = "bernoulli"  # "bernoulli" | "gaussian"
    gaussian_min_logvar: float = -9.0  # soft floor on the decoder's log-variance; keeps densities finite
    kind: str = "vae"  # "vae" | "ae" (deterministic autoencoder baseline: the code is the encoder's mean)
    # Residual blocks (two 3x3 convs and a skip, He et al. 2016) at each conv resolution, encoder and decoder.
    res_blocks: int = 0
    # p(z): "standard" N(0, I) (closed-form KL), "flow" (RealNVP on a N(0, I) base) or "vamp" (VampPrior).
    prior: str = "standard"
    flow_layers: int = 8  # coupling layers of the flow prior
    flow_hidden: int = 256  # width of each coupling layer's two hidden layers
    vamp_components: int = 500  # pseudo-inputs of the VampPrior; each costs one encoder pass per training step

    def __post_init__(self) -> None:
        # Coerce lists (from JSON) to tuples so configs compare and hash by value.
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "hidden_dims", tuple(int(v) for v in self.hidden_dims))
        object.__setattr__(self, "conv_channels", tuple(int(v) for v in self.conv_channels))
        problems = []
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            problems.append(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if self.latent_dim < 1:
            problems.append(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.encoder not in BODIES or self.decoder not in BODIES:
            problems.append(f"encoder/decoder must be one of {BODIES}, got {self.encoder!r}/{self.decoder!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.likelihood not in LIKELIHOODS:
            problems.append(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.upsample not in UPSAMPLES:
            problems.append(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}")
        if "conv" in (self.encoder, self.decoder) and not self.conv_channels:
            problems.append("a conv encoder/decoder needs at least one entry in conv_channels")
        if any(h < 1 for h in self.hidden_dims) or any(c < 1 for c in self.conv_channels):
            problems.append("hidden_dims and conv_channels must be positive")
        if self.res_blocks < 0:
            problems.append(f"res_blocks must be >= 0, got {self.res_blocks}")
        if self.prior not in PRIORS:
            problems.append(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.kind == "ae" and self.prior != "standard":
            problems.append("a plain autoencoder (kind 'ae') has no prior to learn: use prior 'standard'")
        if self.flow_layers < 1 or self.flow_hidden < 1 or self.vamp_components < 1:
            problems.append("flow_layers, flow_hidden and vamp_components must be >= 1")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    @property
    def input_dim(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class VAEOutput:
    mu: torch.Tensor  # (B, latent_dim) posterior mean
    logvar: torch.Tensor  # (B, latent_dim) posterior log-variance
    z: torch.Tensor  # (B, latent_dim) the sample the decoder saw; (S, B, latent_dim) with S samples per example
    # Decoder output (B, P*C, H, W), or (S, B, P*C, H, W): P=1 logits (Bernoulli), P=2 mean-logit+logvar (Gaussian).
    params: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _mlp(dims: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in pairwise(dims):
        layers += [nn.Linear(d_in, d_out), act()]
    return nn.Sequential(*layers)


def conv_shapes(input_shape: tuple[int, int, int], channels: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Feature-map shapes after each stride-2 conv (kernel 4, padding 1): each side becomes floor(side / 2)."""
    _, h, w = input_shape
    shapes = [input_shape]
    for c in channels:
        h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for {len(channels)} stride-2 conv layers")
        shapes.append((c, h, w))
    return shapes


class SubPixelUp(nn.Module):
    """Doubles H and W: a 3x3 conv to 4x the channels, then pixel shuffle. An odd target side is reached by
    padding the input one row/column (replicate) and cropping the result."""

    def __init__(self, c_in: int, c_out: int, out_hw: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
        self.out_hw = out_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.out_hw
        ph, pw = h - 2 * x.shape[-2], w - 2 * x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return F.pixel_shuffle(self.conv(x), 2)[..., :h, :w]


class ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): more depth at one resolution without a harder optimisation problem
    (pre-activation form, He et al. 2016). The second conv starts at zero, so a new block is the identity."""

    def __init__(self, channels: int, act: type[nn.Module]):
        super().__init__()
        last = nn.Conv2d(channels, channels, 3, padding=1)
        assert last.bias is not None  # Conv2d has a bias unless asked not to
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(act(), nn.Conv2d(channels, channels, 3, padding=1), act(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = self.body(x)
        return x + residual


class Encoder(nn.Module):
    """x (B, C, H, W) in [0, 1] -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.features: nn.Module
        if cfg.encoder == "conv":
            shapes = conv_shapes(cfg.input_shape, cfg.conv_channels)
            convs: list[nn.Module] = []
            for (c_in, _, _), (c_out, _, _) in pairwise(shapes):
                convs += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), act()]
                convs += [ResBlock(c_out, act) for _ in range(cfg.res_blocks)]
            c, h, w = shapes[-1]
            feat = c * h * w
            self.features = nn.Sequential(*convs, nn.Flatten())
        else:
            feat = cfg.input_dim
            self.features = nn.Flatten()
        self.body = _mlp([feat, *cfg.hidden_dims], act)
        self.head = nn.Linear(cfg.hidden_dims[-1] if cfg.hidden_dims else feat, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h: torch.Tensor = self.head(self.body(self.features(x)))  # (B, 2 * latent_dim)
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent_dim) -> distribution parameters (B, P*C, H, W)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        c_img, h_img, w_img = cfg.input_shape
        self.n_params = 1 if cfg.likelihood == "bernoulli" else 2
        out_c = self.n_params * c_img
        hidden = list(reversed(cfg.hidden_dims))
        self.body = _mlp([cfg.latent_dim, *hidden], act)
        width = hidden[-1] if hidden else cfg.latent_dim
        if cfg.decoder == "conv":
            shapes = conv_shapes(cfg.input_shape, cfg.conv_channels)
            c, h, w = shapes[-1]
            layers: list[nn.Module] = [nn.Linear(width, c * h * w), act(), nn.Unflatten(1, (c, h, w))]
            # Walk the encoder's shapes backwards; output_padding restores sides that were odd.
            rev = list(reversed(shapes))
            for i, ((c_in, h_in, w_in), (c_out, h_out, w_out)) in enumerate(pairwise(rev)):
                last = i == len(rev) - 2
                layers += [ResBlock(c_in, act) for _ in range(cfg.res_blocks)]
                c_next = out_c if last else c_out
                if cfg.upsample == "subpixel":
                    layers.append(SubPixelUp(c_in, c_next, (h_out, w_out)))
                else:
                    pad = (h_out - 2 * h_in, w_out - 2 * w_in)
                    layers.append(nn.ConvTranspose2d(c_in, c_next, 4, 2, 1, output_padding=pad))
                if not last:
                    layers.append(act())
            self.head = nn.Sequential(*layers)
        else:
            self.head = nn.Sequential(nn.Linear(width, out_c * h_img * w_img), nn.Unflatten(1, (out_c, h_img, w_img)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = self.head(self.body(z))
        return params


def build_prior(cfg: VAEConfig, encoder: Encoder) -> Prior:
    """The prior the config names; the VampPrior shares the model's encoder."""
    if cfg.prior == "flow":
        return FlowPrior(cfg.latent_dim, cfg.flow_layers, cfg.flow_hidden, ACTIVATIONS[cfg.activation])
    if cfg.prior == "vamp":
        return VampPrior(cfg.latent_dim, cfg.vamp_components, cfg.input_shape, encoder.forward)
    return StandardNormalPrior(cfg.latent_dim)


class VAE(nn.Module):
    """Encoder q(z|x), decoder p(x|z) and prior p(z) (`self.prior`: noise / transform / log_prob, see
    model/priors.py). A config with kind "ae" is the deterministic autoencoder baseline: its code is the
    encoder's mean and it has no likelihood; `stochastic` is the one flag the rest of the code reads for that."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.prior = build_prior(config, self.encoder)

    @property
    def stochastic(self) -> bool:
        """True for a VAE; False for the plain autoencoder, which has no posterior noise, prior or likelihood."""
        return self.config.kind == "vae"

    # -- the model's verbs -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> posterior mean and log-variance, each (B, latent_dim)."""
        posterior: tuple[torch.Tensor, torch.Tensor] = self.encoder(x)
        return posterior

    def reparameterize(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        eps: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        samples: int = 1,
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample that gradients flow through (Kingma & Welling, Sec. 2.4).

        eps, when given, is the noise to use ((B, latent_dim) or (S, B, latent_dim)), e.g. drawn per request before
        batching; otherwise it is drawn from `generator`, `samples` per example, stacked in front when > 1:
        (samples, B, latent_dim). The plain autoencoder has no posterior noise: its code is the mean."""
        if eps is None:
            shape = mu.shape if samples == 1 else (samples, *mu.shape)
            if not self.stochastic:
                return mu if samples == 1 else mu.expand(shape)
            eps = randn(tuple(shape), generator, like=mu)
        if not self.stochastic:
            return mu.expand(eps.shape)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., latent_dim) -> decoder parameters (..., P*C, H, W)."""
        lead = z.shape[:-1]
        params: torch.Tensor = self.decoder(z.reshape(-1, z.shape[-1]))
        return params.reshape(*lead, *params.shape[1:])

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = 1) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator=generator, samples=samples)
        return VAEOutput(mu=mu, logvar=logvar, z=z, params=self.decode(z))

    # -- the decoder distribution p(x|z) ---------------------------------------------------------------------------
    def split_params(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder output -> (logits or mean-logits, log-variance or None); works on any leading shape."""
        if self.config.likelihood == "bernoulli":
            return params, None
        c = self.config.input_shape[0]
        mean_logit, raw_logvar = torch.split(params, c, dim=-3)
        floor = self.config.gaussian_min_logvar
        return mean_logit, floor + F.softplus(raw_logvar - floor)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The decoder's mean in [0, 1]: Bernoulli probabilities, or the Gaussian mean. Never raw logits."""
        return torch.sigmoid(self.split_params(params)[0])

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: x (B, C, H, W), params (..., B, P*C, H, W) -> (..., B)."""
        logits, logvar = self.split_params(params)
        if logvar is None:
            # Bernoulli: log p = sum_i x_i l_i - softplus(l_i), the same value as -BCE-with-logits (stable for
            # large |l|). Written as a contraction plus one softplus pass, it is ~2x faster on the k samples per
            # image of the importance-weighted estimate than BCE on an expanded x.
            flat = logits.flatten(-3)
            return torch.einsum("...bp,bp->...b", flat, x.flatten(1).to(flat.dtype)) - F.softplus(flat).sum(-1)
        mean = torch.sigmoid(logits)
        return (-0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))).flatten(-3).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, temperature: Temperature = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1] decoded from prior codes: noise from `generator`, then the prior's
        transform at `temperature` (for the standard prior z ~ N(0, temperature^2 I); see model/priors.py)."""
        noise = self.prior.noise(n, generator, like=next(self.parameters()))
        return self.mean_image(self.decode(self.prior.transform(noise, temperature)))
