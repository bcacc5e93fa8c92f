"""Priors p(z) over the one latent vector per image: the standard normal of Kingma & Welling (2014), a RealNVP flow
(Dinh et al. 2017) on a N(0, I) base, and the VampPrior (Tomczak & Welling 2018), a mixture of the encoder's
posteriors at learned pseudo-inputs.

Every prior offers the same three calls, so a batching server can draw noise per request and transform a whole
batch at once:

    noise = prior.noise(n, generator)          # (n, noise_dim) N(0, I): cheap, seeded, no network call
    z = prior.transform(noise, temperature)    # (n, latent_dim): deterministic, batched
    log_p = prior.log_prob(z)                  # (...,) for z (..., latent_dim)

A row's result depends only on its own noise and temperature, so rows from different requests can share one
transform; temperature is a float or one value per row ((n,) tensor).

Temperature scales the Gaussian noise that feeds the prior: 1 draws exactly from p(z), 0 gives the prior's "centre"
(the standard normal's mean, the flow's image of the base mean, the chosen VampPrior component's mean), values in
between trade diversity for typicality (Kingma & Dhariwal 2018, Sec. 5).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)
Temperature = float | torch.Tensor  # one value, or one per row of the noise: (n,)
# The coupling layers' log-scales are squashed into (-SCALE_CLAMP, SCALE_CLAMP): a factor of at most e^3 per layer
# keeps early training stable without limiting what a stack of layers can express.
SCALE_CLAMP = 3.0


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise drawn on the generator's own device, so a seed gives the same numbers on CPU and GPU."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device)
    if device == like.device and noise.dtype == like.dtype:
        return noise  # the usual case; a no-op .to still costs a dispatch (~5 us on a server's event loop)
    return noise.to(device=like.device, dtype=like.dtype)


def log_normal(z: torch.Tensor, mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension; the standard normal when mu/logvar are None."""
    if mu is None or logvar is None:
        return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def per_row(temperature: Temperature, noise: torch.Tensor) -> Temperature:
    """A temperature that broadcasts against noise (..., noise_dim): a float as it is, a (...,) tensor with a trailing
    axis added, on the noise's device and dtype."""
    if isinstance(temperature, torch.Tensor):
        return temperature.to(noise.device, noise.dtype).unsqueeze(-1)
    return temperature


class Prior(nn.Module):
    """The interface every prior implements; see the module docstring for the contract."""

    #: True when KL(q(z|x) || p(z)) has a closed form for a diagonal Gaussian q (only the standard normal).
    closed_form_kl = False

    def __init__(self, latent_dim: int, noise_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.noise_dim = noise_dim  # width of the noise `transform` consumes; latent_dim, or more

    def noise(self, n: int, generator: torch.Generator | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
        """(n, noise_dim) standard-normal noise from `generator` (on its own device, then moved like `like`)."""
        ref = like if like is not None else torch.empty(0)
        return randn((n, self.noise_dim), generator, like=ref)

    def transform(self, noise: torch.Tensor, temperature: Temperature = 1.0) -> torch.Tensor:
        """Noise (..., noise_dim) -> latent codes (..., latent_dim), deterministically."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (..., latent_dim) -> (...,)."""
        raise NotImplementedError

    def sample(self, n: int, temperature: Temperature = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n codes (n, latent_dim): noise then transform, on the prior's device."""
        like = next(iter(self.buffers()), None)
        like = like if like is not None else next(iter(self.parameters()), torch.empty(0))
        return self.transform(self.noise(n, generator, like=like), temperature)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this block the weights do not change, so a prior may reuse work between calls (the VampPrior
        encodes its pseudo-inputs once). Used by the likelihood estimate, which calls log_prob per chunk."""
        yield


class StandardNormalPrior(Prior):
    """p(z) = N(0, I): the VAE of Kingma & Welling (2014). No parameters; z = temperature * noise."""

    closed_form_kl = True

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim, latent_dim)

    def transform(self, noise: torch.Tensor, temperature: Temperature = 1.0) -> torch.Tensor:
        return noise * per_row(temperature, noise)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return log_normal(z)


class AffineCoupling(nn.Module):
    """One RealNVP coupling layer (Dinh et al. 2017, Eq. 7): the coordinates where `mask` is 1 pass through and set
    a scale and shift for the others. Its last layer starts at zero, so a new layer is the identity."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor, hidden: int, act: type[nn.Module]):
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from the config, never stored
        last = nn.Linear(hidden, 2 * dim)  # -> (log-scale, shift), each (..., dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(dim, hidden), act(), nn.Linear(hidden, hidden), act(), last)

    def _scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: torch.Tensor = self.net(kept)
        s, t = out.chunk(2, dim=-1)
        free = 1 - self.mask
        return SCALE_CLAMP * torch.tanh(s / SCALE_CLAMP) * free, t * free

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalising direction z -> u, with log |det du/dz| per example."""
        s, t = self._scale_shift(z * self.mask)
        return z * torch.exp(s) + t, s.sum(-1)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """The sampling direction u -> z (the kept coordinates are equal in u and z, so s and t are too)."""
        s, t = self._scale_shift(u * self.mask)
        return (u - t) * torch.exp(-s)


def coupling_masks(dim: int, layers: int) -> list[torch.Tensor]:
    """Which coordinates each layer keeps: even/odd positions, then first/second half, alternating, so after four
    layers every coordinate has been transformed conditioned on every other group."""
    idx = torch.arange(dim)
    patterns = [idx % 2 == 0, idx % 2 == 1, idx < dim // 2, idx >= dim // 2]
    return [patterns[i % 4].float() for i in range(layers)]


class FlowPrior(Prior):
    """p(z) = N(f(z); 0, I) |det df/dz| with f a stack of affine coupling layers (RealNVP, Dinh et al. 2017).

    log_prob runs f (z -> base); transform runs f^-1 on temperature * noise, so temperature 1 samples p(z) exactly
    and temperature 0 returns f^-1(0). Both directions cost one pass through the layers."""

    def __init__(self, latent_dim: int, layers: int, hidden: int, act: type[nn.Module]):
        super().__init__(latent_dim, latent_dim)
        self.layers = nn.ModuleList(AffineCoupling(m, hidden, act) for m in coupling_masks(latent_dim, layers))

    def couplings(self) -> list[AffineCoupling]:
        return [cast(AffineCoupling, layer) for layer in self.layers]

    def transform(self, noise: torch.Tensor, temperature: Temperature = 1.0) -> torch.Tensor:
        z = noise * per_row(temperature, noise)
        for layer in reversed(self.couplings()):
            z = layer.inverse(z)
        return z

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): the base-space point of z (transform's inverse at temperature 1)."""
        return self.to_base(z)[0]

    def to_base(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(z) and log |det df/dz|, each with z's leading shape."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for layer in self.couplings():
            z, ld = layer(z)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_det = self.to_base(z)
        return log_normal(u) + log_det


_FROZEN_LOCK = threading.Lock()  # module-level: a lock inside the module would stop copy.deepcopy(model)
Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (mu, logvar)


class VampPrior(Prior):
    """p(z) = 1/K sum_k q(z | u_k): the encoder's posterior at K learned pseudo-inputs u_k (Tomczak & Welling 2018,
    Eq. 9). The pseudo-inputs are images in [0, 1] (a sigmoid of free parameters) and share the model's encoder.

    Noise has latent_dim + 1 columns: the first picks the component (its normal CDF, a uniform number in [0, 1),
    times K), the rest place the point within it: z = mu_k + temperature * sigma_k * noise[..., 1:]. Temperature
    scales the spread within a component only; every component stays as likely. Temperature 0 gives mu_k."""

    def __init__(self, latent_dim: int, components: int, input_shape: tuple[int, int, int], encode: Encode):
        super().__init__(latent_dim, latent_dim + 1)
        # Small random logits: grey images with a little variety, so the components start distinct but close.
        self.pseudo_logits = nn.Parameter(0.1 * torch.randn(components, *input_shape))
        # The encoder belongs to the VAE; holding a plain callable (not a submodule) keeps its weights out of this
        # module's state_dict, where they would be stored twice.
        self._encode = encode
        # Components encoded once inside `frozen` blocks; a count, because the evaluation's worker threads each
        # enter one, and the first to leave must not drop the cache the others still use.
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._frozen = 0

    @property
    def components(self) -> int:
        return int(self.pseudo_logits.shape[0])

    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs as images in [0, 1], (K, C, H, W)."""
        return torch.sigmoid(self.pseudo_logits)

    def component_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log-variances of the K components, each (K, latent_dim)."""
        cache = self._cache
        return cache if cache is not None else self._encode(self.pseudo_inputs())

    @contextmanager
    def frozen(self) -> Iterator[None]:
        with _FROZEN_LOCK:
            if self._frozen == 0:
                self._cache = self._encode(self.pseudo_inputs())
            self._frozen += 1
        try:
            yield
        finally:
            with _FROZEN_LOCK:
                self._frozen -= 1
                if self._frozen == 0:
                    self._cache = None

    def transform(self, noise: torch.Tensor, temperature: Temperature = 1.0) -> torch.Tensor:
        mu, logvar = self.component_params()  # (K, D)
        u = torch.special.ndtr(noise[..., 0])  # uniform in [0, 1)
        k = (u * self.components).long().clamp_(0, self.components - 1)
        return mu[k] + per_row(temperature, noise) * torch.exp(0.5 * logvar[k]) * noise[..., 1:]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.component_params()  # (K, D)
        log_comp = log_normal(z.unsqueeze(-2), mu, logvar)  # (..., K): each code under each component
        return torch.logsumexp(log_comp, dim=-1) - math.log(self.components)
