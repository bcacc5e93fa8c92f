"""The ELBO and the importance-weighted log-likelihood estimate, per example, in nats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch

from model.priors import log_normal as log_normal  # the Gaussian density the KL and the weights use
from model.vae import VAE, VAEOutput, randn


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per example, (B,).

    Closed form for diagonal Gaussians (Kingma & Welling 2014, Appendix B):
    -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def kl_term(model: VAE, out: VAEOutput) -> torch.Tensor:
    """The ELBO's KL(q(z|x) || p(z)) per example, (B,), for a forward pass.

    The standard normal prior keeps the closed form above. A learned prior (flow, VampPrior) has none, so the KL is
    the Monte Carlo estimate log q(z|x) - log p(z) at the pass's own samples z (Kingma & Welling 2014, Eq. 6-7;
    Tomczak & Welling 2018, Eq. 3), averaged over the samples when there are several. Its gradient with respect to
    the encoder equals the analytic entropy's. A plain autoencoder has no posterior: its KL is defined as 0."""
    if not model.stochastic:
        return torch.zeros(out.mu.shape[0], dtype=out.mu.dtype, device=out.mu.device)
    if model.prior.closed_form_kl:
        return kl_divergence(out.mu, out.logvar)
    kl = log_normal(out.z, out.mu, out.logvar) - model.prior.log_prob(out.z)
    return kl.mean(0) if kl.dim() > 1 else kl


@dataclass
class ELBO:
    """Per-example terms, each (B,): elbo = recon - kl (beta = 1); loss = -(recon - beta * kl)."""

    elbo: torch.Tensor
    recon: torch.Tensor  # E_q[log p(x|z)], one-sample estimate
    kl: torch.Tensor

    def loss(self, beta: float = 1.0) -> torch.Tensor:
        """The mean negative (beta-weighted) ELBO over the batch: what the optimiser minimises."""
        return -(self.recon - beta * self.kl).mean()


def elbo(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> ELBO:
    """One-sample ELBO per example. For a plain autoencoder the KL term is defined as 0 (no posterior)."""
    return elbo_from_output(model, x, model(x, generator=generator))


def elbo_from_output(model: VAE, x: torch.Tensor, out: VAEOutput) -> ELBO:
    """The ELBO terms of a forward pass already made (by the model or a wrapper of it, such as DDP).

    With several posterior samples per example (out.z is (S, B, D)), the reconstruction term is their mean."""
    recon = model.log_prob(x, out.params)
    if recon.dim() > 1:
        recon = recon.mean(0)
    kl = kl_term(model, out)
    return ELBO(elbo=recon - kl, recon=recon, kl=kl)


def log_weights(
    model: VAE,
    x: torch.Tensor,
    z: torch.Tensor,
    params: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """Importance log-weights log p(x|z) + beta * (log p(z) - log q(z|x)) of samples z (S, B, D), each (S, B):
    what both the IWAE training bound and the likelihood estimate sum over (beta < 1 only in KL warm-up).
    log p(z) is the model's own prior: N(0, I), or the learned flow or VampPrior."""
    return model.log_prob(x, params) + beta * model.prior.log_prob(z) - beta * log_normal(z, mu, logvar)


def iwae_bound(model: VAE, x: torch.Tensor, out: VAEOutput, beta: float = 1.0) -> torch.Tensor:
    """The importance-weighted bound per example, (B,), from a forward pass with S samples (Burda et al. 2015, Eq. 8):

        L_S = logsumexp_s [log p(x|z_s) + beta * (log p(z_s) - log q(z_s|x))] - log S,

    the training objective of an IWAE; beta < 1 only during KL warm-up. L_S <= log p(x) and tightens as S grows."""
    if out.z.dim() != 3:
        raise ValueError("iwae_bound needs a forward pass with samples=S > 1: z of shape (S, B, latent_dim)")
    log_w = log_weights(model, x, out.z, out.params, out.mu, out.logvar, beta)
    return torch.logsumexp(log_w, dim=0) - math.log(out.z.shape[0])


def training_loss(model: VAE, x: torch.Tensor, out: VAEOutput, beta: float = 1.0) -> tuple[torch.Tensor, ELBO]:
    """What model.train minimises for a forward pass: the mean negative ELBO of a one-sample pass, or the mean
    negative importance-weighted bound of an S-sample one (`--iwae-k`), with KL weight beta; and the ELBO's terms,
    which the training log reports either way."""
    terms = elbo_from_output(model, x, out)
    loss = terms.loss(beta) if out.z.dim() == 2 else -iwae_bound(model, x, out, beta).mean()
    return loss, terms


@torch.no_grad()
def iwae_log_likelihood(
    model: VAE,
    x: torch.Tensor,
    k: int = 5000,
    chunk_elems: int = 2**18,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per example, (B,) (Burda et al. 2015, Eq. 8):

        log p(x) ~= logsumexp_i [log p(x, z_i) - log q(z_i|x)] - log k,   z_i ~ q(z|x).

    The k samples are drawn in chunks and folded into a running logsumexp, so memory is bounded by
    chunk_elems decoder outputs whatever k is. The estimate is a lower bound that tightens as k grows.
    The default keeps a chunk's activations small enough to be reused from the allocator's heap: at 2**24 every
    chunk's half-gigabyte conv activations were fresh mmaps, and the page faults took twice the arithmetic's time.
    """
    if not model.stochastic:
        raise ValueError("a deterministic autoencoder defines no likelihood p(x)")
    with model.prior.frozen():  # the VampPrior encodes its pseudo-inputs once, not once per chunk
        return _iwae_log_likelihood(model, x, k, chunk_elems, generator)


def _iwae_log_likelihood(
    model: VAE, x: torch.Tensor, k: int, chunk_elems: int, generator: torch.Generator | None
) -> torch.Tensor:
    mu, logvar = model.encode(x)
    batch, per_image = x.shape[0], model.config.input_dim * model.decoder.n_params
    chunk = max(1, min(k, chunk_elems // max(1, batch * per_image)))
    running = torch.full((batch,), -math.inf, device=x.device, dtype=mu.dtype)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = randn((n, *mu.shape), generator, like=mu)  # (n, B, D)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_w = log_weights(model, x, z, model.decode(z), mu, logvar)  # (n, B)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += n
    return running - math.log(k)


NatsT = TypeVar("NatsT", torch.Tensor, float)


def bits_per_dim(nats: NatsT, dims: int) -> NatsT:
    """Negative log-likelihood in nats per example -> bits per dimension."""
    return nats / (dims * math.log(2))


@torch.no_grad()
def active_units(mu: torch.Tensor, threshold: float = 1e-2) -> int:
    """Latent dimensions whose posterior mean varies across the data: Cov_x(E_q[z_j]) > threshold (Burda et al.)."""
    return int((mu.var(dim=0) > threshold).sum())
