import pytest
import torch

from model.vae import VAE, VAEConfig

CONFIGS = {
    "mlp-bernoulli": VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,)),
    "mlp-gaussian-2layers": VAEConfig(
        input_shape=(1, 7, 5), latent_dim=3, hidden_dims=(16, 8), likelihood="gaussian", activation="tanh"
    ),
    "conv-rgb": VAEConfig(
        input_shape=(3, 16, 16),
        latent_dim=4,
        encoder="conv",
        decoder="conv",
        conv_channels=(4, 8),
        hidden_dims=(16,),
        likelihood="gaussian",
    ),
    "conv-odd-sides": VAEConfig(
        input_shape=(1, 28, 20), latent_dim=2, encoder="conv", decoder="conv", conv_channels=(4, 8), hidden_dims=()
    ),
    "conv-subpixel-odd-sides-rgb": VAEConfig(
        input_shape=(3, 13, 10),
        latent_dim=2,
        encoder="conv",
        decoder="conv",
        conv_channels=(4, 8),
        hidden_dims=(8,),
        upsample="subpixel",
        likelihood="gaussian",
    ),
    "conv-enc-mlp-dec": VAEConfig(
        input_shape=(1, 28, 28), latent_dim=5, encoder="conv", decoder="mlp", conv_channels=(4,), hidden_dims=(32,)
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = VAE(cfg)
    x = torch.rand(5, *cfg.input_shape)
    out = model(x)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (5, cfg.latent_dim)
    n_params = 1 if cfg.likelihood == "bernoulli" else 2
    assert out.params.shape == (5, n_params * cfg.input_shape[0], *cfg.input_shape[1:])
    mean = model.mean_image(out.params)
    assert mean.shape == x.shape and mean.min() >= 0 and mean.max() <= 1
    assert model.log_prob(x, out.params).shape == (5,)
    # decode accepts extra leading dimensions (used by the importance-weighted estimate)
    assert model.decode(torch.zeros(3, 5, cfg.latent_dim)).shape == (3, *out.params.shape)


def test_eval_mode_encoding_is_deterministic_and_sampling_is_seeded():
    model = VAE(CONFIGS["mlp-bernoulli"]).eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model.encode(x)[0], model.encode(x)[0])
    a = model.sample(6, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, generator=torch.Generator().manual_seed(3))
    c = model.sample(6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradients_reach_the_encoder():
    from model.losses import elbo

    model = VAE(CONFIGS["conv-rgb"])
    elbo(model, torch.rand(4, 3, 16, 16)).loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_gaussian_logvar_has_a_floor():
    model = VAE(CONFIGS["mlp-gaussian-2layers"])
    params = torch.full((1, 2, 7, 5), -1e4)
    _, logvar = model.split_params(params)
    assert torch.all(logvar >= model.config.gaussian_min_logvar)


def test_ae_code_is_the_mean():
    cfg = VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,), kind="ae")
    model = VAE(cfg)
    out = model(torch.rand(3, 1, 8, 8))
    assert torch.equal(out.z, out.mu)


@pytest.mark.parametrize(
    "bad",
    [
        {"latent_dim": 0},
        {"likelihood": "poisson"},
        {"encoder": "transformer"},
        {"activation": "gelu2"},
        {"input_shape": (1, 28)},
        {"kind": "gan"},
        {"upsample": "nearest"},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError, match="invalid VAEConfig"):
        VAEConfig(**bad)


def test_subpixel_up_holds_any_transposed_conv_exactly():
    """The "superset" claim behind upsample="subpixel": every ConvTranspose2d(kernel 4, stride 2, padding 1) is a
    3x3 conv to 4x the channels followed by pixel shuffle, with the kernel taps rearranged per output phase."""
    from model.vae import SubPixelUp

    torch.manual_seed(0)
    c_in, c_out, h, w = 3, 2, 5, 6
    tconv = torch.nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
    up = SubPixelUp(c_in, c_out, (2 * h, 2 * w))
    weight = torch.zeros(c_out, 2, 2, c_in, 3, 3)  # (out channel, row phase, column phase, in channel, u, v)
    for a in range(2):
        for b in range(2):
            for u in range(3):
                for v in range(3):
                    kh, kw = a + 1 - 2 * (u - 1), b + 1 - 2 * (v - 1)  # the transposed kernel's tap feeding (a, b)
                    if 0 <= kh < 4 and 0 <= kw < 4:
                        weight[:, a, b, :, u, v] = tconv.weight[:, :, kh, kw].T
    with torch.no_grad():
        up.conv.weight.copy_(weight.reshape(4 * c_out, c_in, 3, 3))
        up.conv.bias.copy_(tconv.bias.repeat_interleave(4))
        x = torch.randn(2, c_in, h, w)
        torch.testing.assert_close(up(x), tconv(x), atol=1e-5, rtol=1e-5)


def test_config_round_trips_through_a_dict():
    cfg = CONFIGS["conv-rgb"]
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown VAEConfig keys"):
        VAEConfig.from_dict({**cfg.to_dict(), "depth": 3})


def test_conv_input_too_small():
    with pytest.raises(ValueError, match="too small"):
        VAE(VAEConfig(input_shape=(1, 4, 4), encoder="conv", decoder="conv", conv_channels=(2, 2, 2)))
