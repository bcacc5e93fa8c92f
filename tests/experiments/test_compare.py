import json

import torch

from experiments.compare import gaussian_kl_to_standard
from experiments.compare import main as compare_main
from model import checkpoint


def test_kl_of_codes_to_the_prior():
    g = torch.Generator().manual_seed(0)
    assert gaussian_kl_to_standard(torch.randn(20000, 3, generator=g)) < 0.01
    assert gaussian_kl_to_standard(10 * torch.randn(20000, 3, generator=g) + 5) > 30
    # inactive VAE units: means pinned at 0 but each posterior is N(0, 1), so the aggregate is the prior
    assert gaussian_kl_to_standard(1e-3 * torch.randn(20000, 3, generator=g), torch.ones(20000, 3)) < 0.01


def test_ae_trains_and_compare_writes_its_files(tmp_path, tiny_checkpoint, tiny_ae_checkpoint):
    ae = tiny_ae_checkpoint
    model, card = checkpoint.load(ae)
    assert model.config.kind == "ae" and "test_nll" not in card["metrics"]  # an AE defines no likelihood
    out = tmp_path / "cmp"
    compare_main([str(ae), str(tiny_checkpoint), "--out", str(out), "--samples", "16"])
    for name in ("prior_samples.png", "latent_codes.png", "interpolations.png", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("ae", "vae"):
        assert {"reconstruction_mse", "codes_kl_to_prior", "vae_plausible_share"} <= set(metrics[side])
