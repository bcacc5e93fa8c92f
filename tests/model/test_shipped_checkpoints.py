"""The shipped checkpoints still load, validate and score what their cards say (skipped without the datasets)."""

from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.data import fixed_binarized, load_dataset, to_float
from model.metrics import dataset_nll

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / checkpoint.CARD_FILE).is_file())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_and_its_card_is_complete(name):
    model, card = checkpoint.load(CHECKPOINTS / name)
    assert card["status"] == "final" and card["name"] == name
    assert card["training"]["command"].startswith(("python -m model.train", "torchrun"))
    assert {"test_elbo", "active_units"} <= set(card["metrics"])
    assert (CHECKPOINTS / name / "train.log").is_file(), "each shipped checkpoint keeps the log of its training run"
    assert model.config.latent_dim == len(card["latent_stats"]["mean"])


@pytest.mark.slow
def test_mnist_nll_on_500_test_images_stays_within_2_nats_of_its_card(shared_data):
    model, card = checkpoint.load(CHECKPOINTS / "mnist")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x = fixed_binarized(to_float(load_dataset("mnist", shared_data).test), seed=0)
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:500]
    nll = dataset_nll(model, x[subset], k=500, seed=0)
    assert abs(nll - card["metrics"]["test_nll"]) < 2.0, (nll, card["metrics"])
