"""Whole-dataset figures of a trained model: ELBO, importance-weighted NLL, active units, latent statistics.
Shared by the training module (end of training) and the evaluation CLI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from model.losses import active_units, bits_per_dim, elbo, iwae_log_likelihood
from model.vae import VAE


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


@torch.no_grad()
def dataset_elbo(model: VAE, x: torch.Tensor, batch_size: int = 500, seed: int = 0) -> dict[str, float]:
    """Mean one-sample ELBO and its two terms over `x` (already preprocessed), with a fixed sampling seed."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for xb in _batches(x, batch_size):
        terms = elbo(model, xb.to(device), generator=g)
        for key in sums:
            sums[key] += float(getattr(terms, key).double().sum())
    return {key: value / len(x) for key, value in sums.items()}


def dataset_nll(
    model: VAE, x: torch.Tensor, k: int, batch_size: int = 100, seed: int = 0, progress: bool = False, workers: int = 1
) -> float:
    """Mean importance-weighted negative log-likelihood (nats per example) over `x`.

    With workers > 1 the batches are shared out to that many threads, each running single-threaded torch ops on its
    own seeded generator: on a few busy cores this keeps every core working instead of stalling at the barriers of
    one multi-threaded op. The Monte Carlo noise then differs from a one-worker run (same seed, other draws)."""
    device = next(model.parameters()).device
    batches = list(_batches(x, batch_size))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=f"NLL k={k}", unit="batch")

    @torch.no_grad()
    def run(shard: int) -> float:
        g = torch.Generator(device="cpu").manual_seed(seed + shard)
        total = 0.0
        for xb in batches[shard::workers]:
            total -= float(iwae_log_likelihood(model, xb.to(device), k=k, generator=g).double().sum())
            if bar is not None:
                bar.update()
        return total

    if workers <= 1:
        total = run(0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                total = sum(pool.map(run, range(workers)))
        finally:
            torch.set_num_threads(threads)
    if bar is not None:
        bar.close()
    return total / len(x)


@torch.no_grad()
def posterior(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances of `x`, each (N, latent_dim), on the CPU, encoded in batches."""
    device = next(model.parameters()).device
    parts = [model.encode(xb.to(device)) for xb in _batches(x, batch_size)]
    return torch.cat([mu.cpu() for mu, _ in parts]), torch.cat([logvar.cpu() for _, logvar in parts])


def posterior_means(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return posterior(model, x, batch_size)[0]


@torch.no_grad()
def latent_statistics(mu: torch.Tensor) -> dict[str, Any]:
    """Mean and the two leading principal directions of the posterior means (for the service's latent maps)."""
    mean = mu.mean(0)
    cov = torch.cov((mu - mean).T.double()).reshape(mu.shape[1], mu.shape[1])
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = eigvals.argsort(descending=True)[:2]
    directions = eigvecs[:, order].T  # (<=2, D), unit vectors
    # Fix each direction's sign (largest component positive) so the maps do not flip between runs.
    signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))
    directions = directions * signs
    return {
        "n": int(mu.shape[0]),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in mu.std(0)],
        "principal_directions": [[round(float(v), 6) for v in row] for row in directions],
        "principal_stddevs": [round(float(v), 6) for v in eigvals[order].clamp_min(0).sqrt()],
    }


def full_metrics(
    model: VAE, x_test: torch.Tensor, k: int, seed: int = 0, progress: bool = False, workers: int = 1
) -> dict[str, Any]:
    """The card's metrics block: test ELBO and terms, NLL with k and n, bits/dim, active units."""
    terms = dataset_elbo(model, x_test, seed=seed)
    metrics = {
        "test_elbo": round(terms["elbo"], 4),
        "test_recon": round(terms["recon"], 4),
        "test_kl": round(terms["kl"], 4),
        "n_test": int(len(x_test)),
        "active_units": active_units(posterior_means(model, x_test)),
        "active_units_threshold": 0.01,
    }
    if model.stochastic and k > 0:  # the plain autoencoder defines no likelihood; k = 0 asks for none
        nll = dataset_nll(model, x_test, k=k, seed=seed, progress=progress, workers=workers)
        metrics.update(
            test_nll=round(nll, 4),
            nll_k=k,
            nll_n=int(len(x_test)),
            test_bits_per_dim=round(bits_per_dim(nll, model.config.input_dim), 5),
        )
    return metrics
