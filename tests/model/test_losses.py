import math

import torch

from model.latent import lerp, manifold_grid, slerp
from model.losses import (
    active_units,
    bits_per_dim,
    elbo,
    elbo_from_output,
    iwae_bound,
    iwae_log_likelihood,
    kl_divergence,
    log_normal,
    training_loss,
)
from model.vae import VAE, VAEConfig


def tiny(likelihood="bernoulli", seed=0):
    torch.manual_seed(seed)
    return VAE(VAEConfig(input_shape=(1, 6, 6), latent_dim=3, hidden_dims=(12,), likelihood=likelihood)).eval()


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    assert torch.allclose(kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)), torch.zeros(4))
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    assert torch.all(kl_divergence(mu, logvar) > 0)


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[-0.3, 0.4]])
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 2, generator=g)
    mc = (log_normal(z, mu, logvar) - log_normal(z)).mean()
    assert abs(float(mc) - float(kl_divergence(mu, logvar)[0])) < 0.02


@torch.no_grad()
def test_elbo_terms_add_up():
    model = tiny()
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(0))
    terms = elbo(model, x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms.elbo, terms.recon - terms.kl)
    assert torch.all(terms.recon <= 0)  # Bernoulli log-probabilities
    assert math.isclose(float(terms.loss()), -float(terms.elbo.mean()), rel_tol=1e-6)


@torch.no_grad()
def test_iwae_is_above_the_elbo_on_average_and_tightens_with_k():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((64, 1, 6, 6), 0.3), generator=g)
    elbo_mean = float(torch.stack([elbo(model, x, generator=g).elbo for _ in range(20)]).mean())
    ll = {
        k: float(iwae_log_likelihood(model, x, k=k, generator=torch.Generator().manual_seed(k)).mean())
        for k in (1, 10, 200)
    }
    assert abs(ll[1] - elbo_mean) < 1.0  # k=1 is the ELBO itself
    assert elbo_mean <= ll[10] <= ll[200]


def test_iwae_training_bound_is_the_likelihood_estimate_with_gradients():
    model = tiny()
    x = torch.bernoulli(torch.full((16, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(0))
    out = model(x, generator=torch.Generator().manual_seed(3), samples=50)
    assert out.z.shape == (50, 16, 3) and out.params.shape == (50, 16, 1, 6, 6)
    bound = iwae_bound(model, x, out)
    # The same noise through the evaluation path (one chunk) gives the same numbers.
    ll = iwae_log_likelihood(model, x, k=50, chunk_elems=10**9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(bound.detach(), ll, atol=1e-4)
    assert bound.mean().item() >= elbo_from_output(model, x, out).elbo.mean().item()
    bound.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    one = model(x, generator=torch.Generator().manual_seed(3))
    try:
        iwae_bound(model, x, one)
    except ValueError as e:
        assert "samples" in str(e)
    else:
        raise AssertionError("a one-sample forward must be refused")


def test_training_loss_is_the_elbo_for_one_sample_and_the_iwae_bound_for_several():
    model = tiny()
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(0))
    one = model(x, generator=torch.Generator().manual_seed(1))
    loss, terms = training_loss(model, x, one, beta=0.5)
    assert torch.equal(loss, elbo_from_output(model, x, one).loss(0.5))
    assert torch.equal(terms.kl, kl_divergence(one.mu, one.logvar))
    five = model(x, generator=torch.Generator().manual_seed(1), samples=5)
    loss, terms = training_loss(model, x, five, beta=0.5)
    assert torch.equal(loss, -iwae_bound(model, x, five, 0.5).mean())
    assert torch.equal(terms.elbo, elbo_from_output(model, x, five).elbo)


def test_iwae_chunking_does_not_change_the_estimate():
    model = tiny("gaussian")
    x = torch.rand(5, 1, 6, 6)
    # Different chunkings draw different noise, so the two estimates agree to Monte Carlo error, not bit for bit.
    whole = iwae_log_likelihood(model, x, k=2000, chunk_elems=10**9, generator=torch.Generator().manual_seed(0))
    chunked = iwae_log_likelihood(model, x, k=2000, chunk_elems=5 * 72 * 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(whole, chunked, atol=0.05)


def test_bits_per_dim_and_active_units():
    assert math.isclose(bits_per_dim(784 * math.log(2), 784), 1.0)
    mu = torch.cat([torch.randn(500, 2), torch.zeros(500, 1)], dim=1)
    assert active_units(mu) == 2


def test_latent_paths():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    line = lerp(z0, z1, 5)
    assert torch.allclose(line[0], z0) and torch.allclose(line[-1], z1) and torch.allclose(line[2], (z0 + z1) / 2)
    arc = slerp(z0, z1, 5)
    assert torch.allclose(arc[0], z0) and torch.allclose(arc[-1], z1, atol=1e-6)
    assert torch.allclose(slerp(z0, 3 * z0, 3), lerp(z0, 3 * z0, 3))  # parallel codes fall back to the line
    grid = manifold_grid(3, torch.zeros(2), torch.eye(2), torch.tensor([1.0, 2.0]))
    assert grid.shape == (9, 2)
    assert torch.allclose(grid[0], torch.tensor([-1.0, 2.0])) and torch.allclose(grid[-1], torch.tensor([1.0, -2.0]))
