"""The learned priors (model/priors.py): densities that integrate to one, an invertible flow, seeded and batchable
sampling, the KL and likelihood terms that use them, and checkpoints that keep them."""

import math

import pytest
import torch

from model import checkpoint
from model.losses import iwae_log_likelihood, kl_divergence, kl_term, log_normal
from model.priors import FlowPrior, StandardNormalPrior, VampPrior, randn
from model.vae import VAE, VAEConfig


def tiny_config(prior: str, latent_dim: int = 2, **kw: object) -> VAEConfig:
    return VAEConfig(
        input_shape=(1, 6, 6),
        latent_dim=latent_dim,
        hidden_dims=(12,),
        prior=prior,
        flow_layers=4,
        flow_hidden=16,
        vamp_components=5,
        **kw,
    )


def tiny_model(prior: str, latent_dim: int = 2, seed: int = 0) -> VAE:
    """A tiny model whose prior is not at its initial state (a new flow is the identity)."""
    torch.manual_seed(seed)
    model = VAE(tiny_config(prior, latent_dim)).eval()
    with torch.no_grad():
        for p in model.prior.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def grid_integral(log_prob, dim: int, half_width: float = 15.0, steps: int = 1501) -> float:
    """Riemann sum of exp(log_prob) over [-half_width, half_width]^dim (dim 1 or 2)."""
    ticks = torch.linspace(-half_width, half_width, steps, dtype=torch.float64)
    cell = float(ticks[1] - ticks[0]) ** dim
    points = ticks[:, None] if dim == 1 else torch.cartesian_prod(ticks, ticks)
    return float(torch.exp(log_prob(points)).sum()) * cell


@pytest.mark.parametrize("prior", ["standard", "flow", "vamp"])
@pytest.mark.parametrize("dim", [1, 2])
def test_prior_density_integrates_to_one(prior, dim):
    model = tiny_model(prior, latent_dim=dim).double()
    with torch.no_grad():
        total = grid_integral(model.prior.log_prob, dim)
    assert total == pytest.approx(1.0, abs=2e-3)


def test_standard_prior_is_the_closed_form_normal_and_keeps_the_old_sampling():
    prior = StandardNormalPrior(3)
    z = torch.randn(7, 3)
    assert torch.equal(prior.log_prob(z), -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1))
    noise = prior.noise(5, torch.Generator().manual_seed(0))
    assert torch.equal(noise, torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(prior.transform(noise, 0.7), noise * 0.7)
    assert list(prior.parameters()) == []


def test_vamp_prior_matches_its_mixture_formula():
    model = tiny_model("vamp")
    prior = model.prior
    assert isinstance(prior, VampPrior)
    z = torch.randn(4, 2)
    with torch.no_grad():
        mu, logvar = model.encode(prior.pseudo_inputs())  # (K, D)
        by_hand = torch.stack([log_normal(z, mu[k], logvar[k]) for k in range(prior.components)])
        expected = torch.logsumexp(by_hand, 0) - math.log(prior.components)
        assert torch.allclose(prior.log_prob(z), expected, atol=1e-5)


def test_flow_is_invertible_and_its_log_density_is_the_change_of_variables():
    torch.manual_seed(0)
    prior = FlowPrior(5, layers=6, hidden=16, act=torch.nn.ELU).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.2 * torch.randn_like(p))
        z = torch.randn(10, 5, dtype=torch.float64)
        assert torch.allclose(prior.transform(prior.inverse(z)), z, atol=1e-9)
        assert torch.allclose(prior.inverse(prior.transform(z)), z, atol=1e-9)
    # log p(z) = log N(f(z)) + log |det J_f(z)|, with the Jacobian taken by autograd
    one = z[0]
    jac = torch.autograd.functional.jacobian(prior.inverse, one)
    expected = log_normal(prior.inverse(one)) + torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(prior.log_prob(one[None])[0], expected, atol=1e-10)


def test_a_new_flow_is_the_standard_normal():
    prior = FlowPrior(3, layers=4, hidden=8, act=torch.nn.ReLU)
    z = torch.randn(6, 3)
    with torch.no_grad():
        assert torch.allclose(prior.log_prob(z), log_normal(z))
        assert torch.equal(prior.transform(z, 0.5), z * 0.5)


@pytest.mark.parametrize("prior", ["standard", "flow", "vamp"])
def test_sampling_is_seeded_deterministic_and_the_same_batched_or_alone(prior):
    model = tiny_model(prior)
    p = model.prior
    a = p.noise(6, torch.Generator().manual_seed(3))
    b = p.noise(6, torch.Generator().manual_seed(3))
    c = p.noise(6, torch.Generator().manual_seed(4))
    assert a.shape == (6, p.noise_dim) and torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        batched = p.transform(torch.cat([a, c]), 0.8)
        alone = torch.cat([p.transform(a[i : i + 1], 0.8) for i in range(6)])
        assert batched.shape == (12, 2)
        assert torch.allclose(batched[:6], alone, atol=1e-6)
        images = model.sample(4, 0.8, torch.Generator().manual_seed(5))
        assert torch.equal(images, model.sample(4, 0.8, torch.Generator().manual_seed(5)))
        expected = model.mean_image(model.decode(p.transform(p.noise(4, torch.Generator().manual_seed(5)), 0.8)))
        assert torch.equal(images, expected)


@pytest.mark.parametrize("prior", ["standard", "flow", "vamp"])
def test_one_temperature_per_row_equals_each_row_alone(prior):
    """Requests with different temperatures can share one transform."""
    p = tiny_model(prior).prior
    noise = p.noise(4, torch.Generator().manual_seed(0))
    temps = torch.tensor([0.0, 0.5, 1.0, 1.5])
    with torch.no_grad():
        together = p.transform(noise, temps)
        alone = torch.cat([p.transform(noise[i : i + 1], float(temps[i])) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_temperature_zero_gives_each_prior_its_centre():
    flow, vamp = tiny_model("flow"), tiny_model("vamp")
    with torch.no_grad():
        noise = flow.prior.noise(3, torch.Generator().manual_seed(0))
        centre = flow.prior.transform(torch.zeros(1, 2))
        assert torch.allclose(flow.prior.transform(noise, 0.0), centre.expand(3, 2))
        noise = vamp.prior.noise(50, torch.Generator().manual_seed(0))
        mu, _ = vamp.prior.component_params()
        z = vamp.prior.transform(noise, 0.0)
        assert all(any(torch.equal(row, m) for m in mu) for row in z)
        picked = {int((row == mu).all(-1).nonzero()[0]) for row in z}
        assert len(picked) > 1  # the component choice still varies at temperature 0


def test_vamp_prior_reuses_its_components_inside_nested_frozen_blocks():
    model = tiny_model("vamp")
    prior = model.prior
    assert isinstance(prior, VampPrior)
    with torch.no_grad(), prior.frozen():
        first = prior.component_params()
        with prior.frozen():
            assert prior.component_params() is first
        assert prior.component_params() is first  # the inner block's exit keeps the outer block's cache
    assert prior.component_params() is not first


def test_vamp_prior_weights_are_not_stored_twice():
    model = tiny_model("vamp")
    keys = list(model.state_dict())
    assert "prior.pseudo_logits" in keys and not any(k.startswith("prior.") and "encoder" in k for k in keys)


def test_kl_term_is_closed_form_for_the_standard_prior_and_monte_carlo_for_a_learned_one():
    x = torch.rand(3, 1, 6, 6)
    standard = tiny_model("standard")
    out = standard(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kl_term(standard, out), kl_divergence(out.mu, out.logvar))
    # A new flow is N(0, I): the Monte Carlo KL over many samples approaches the closed form.
    torch.manual_seed(0)
    flow = VAE(tiny_config("flow")).eval()
    with torch.no_grad():
        out = flow(x, generator=torch.Generator().manual_seed(0), samples=20_000)
        assert torch.allclose(kl_term(flow, out), kl_divergence(out.mu, out.logvar), atol=0.05)


def test_likelihood_uses_the_learned_prior():
    x = (torch.rand(4, 1, 6, 6) > 0.5).float()
    model = tiny_model("flow")
    with torch.no_grad():
        ll = iwae_log_likelihood(model, x, k=64, generator=torch.Generator().manual_seed(0))
        for layer in model.prior.layers:
            layer.net[-1].weight.zero_()
            layer.net[-1].bias.zero_()  # the flow is now the identity: p(z) = N(0, I)
        as_standard = iwae_log_likelihood(model, x, k=64, generator=torch.Generator().manual_seed(0))
    assert ll.shape == (4,) and not torch.allclose(ll, as_standard)


@pytest.mark.parametrize("prior", ["flow", "vamp"])
def test_learned_prior_round_trips_through_a_checkpoint(tmp_path, prior):
    model = tiny_model(prior)
    checkpoint.save(model, {"name": "t"}, tmp_path / "ckpt")
    loaded, card = checkpoint.load(tmp_path / "ckpt")
    assert card["config"]["prior"] == prior and loaded.config == model.config
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(loaded.prior.log_prob(z), model.prior.log_prob(z))
        g = torch.Generator().manual_seed(1)
        assert torch.equal(loaded.sample(3, 0.9, g), model.sample(3, 0.9, torch.Generator().manual_seed(1)))


def test_an_unknown_prior_is_refused():
    with pytest.raises(ValueError, match="prior must be one of"):
        tiny_config("gmm")
    with pytest.raises(ValueError, match="has no prior"):
        tiny_config("flow", kind="ae")


def test_configs_without_the_new_fields_load_with_todays_behaviour():
    old = tiny_config("standard").to_dict()
    for key in ("prior", "flow_layers", "flow_hidden", "vamp_components", "res_blocks"):
        old.pop(key)
    cfg = VAEConfig.from_dict(old)
    assert cfg.prior == "standard" and cfg.res_blocks == 0
    assert isinstance(VAE(cfg).prior, StandardNormalPrior)


def test_residual_blocks_start_as_the_identity_and_keep_shapes():
    cfg = VAEConfig(
        input_shape=(1, 12, 12),
        latent_dim=3,
        encoder="conv",
        decoder="conv",
        conv_channels=(4, 8),
        hidden_dims=(16,),
        res_blocks=2,
        upsample="subpixel",
    )
    model = VAE(cfg)
    out = model(torch.rand(2, 1, 12, 12))
    assert out.params.shape == (2, 1, 12, 12)
    assert sum("body" in k for k in model.state_dict()) > 0


def test_a_card_whose_prior_does_not_fit_the_weights_is_refused(tmp_path):
    import json

    checkpoint.save(tiny_model("standard"), {"name": "t"}, tmp_path / "ckpt")
    card_path = tmp_path / "ckpt" / checkpoint.CARD_FILE
    card = json.loads(card_path.read_text())
    card["config"]["prior"] = "flow"
    card_path.write_text(json.dumps(card))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the weights"):
        checkpoint.load(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_drawn_on_the_generators_device_then_made_like_the_reference(dtype: torch.dtype) -> None:
    """The same seed draws the same float32 numbers whatever the reference; they come back in its dtype."""
    expected = torch.randn((3, 4), generator=torch.Generator().manual_seed(7))
    noise = randn((3, 4), torch.Generator().manual_seed(7), like=torch.empty(0, dtype=dtype))
    assert noise.dtype == dtype
    assert torch.equal(noise, expected.to(dtype))
