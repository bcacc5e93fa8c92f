import json

import pytest
import torch

from model import checkpoint
from model.checkpoint import CheckpointError
from model.vae import VAE, VAEConfig

CFG = VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = VAE(CFG).eval()
    checkpoint.save(model, {"name": "t", "metrics": {"test_nll": 1.0}}, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_save_load_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded, card = checkpoint.load(path)
    assert loaded.config == model.config
    assert card["format_version"] == checkpoint.FORMAT_VERSION and card["name"] == "t"
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.encode(x)[0], loaded.encode(x)[0])
        assert torch.equal(model.decode(torch.ones(3, 2)), loaded.decode(torch.ones(3, 2)))
    assert not loaded.training


def test_no_pickle_only_safetensors(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [checkpoint.CARD_FILE, checkpoint.WEIGHTS_FILE]
    assert (path / checkpoint.WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # safetensors: u64 length, then JSON header


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = VAE(CFG)
    wrapped = torch.nn.Module()
    wrapped.module = model
    wrapped.config = CFG
    checkpoint.save(wrapped, {}, tmp_path)
    checkpoint.load(tmp_path)  # strict load would fail on "module." keys


def test_missing_weights(saved):
    _, path = saved
    (path / checkpoint.WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing its weights file"):
        checkpoint.load(path)


def test_missing_card_and_directory(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nope")
    (path / checkpoint.CARD_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no model_card.json"):
        checkpoint.load(path)


def test_sha256_mismatch(saved):
    _, path = saved
    weights = path / checkpoint.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its card: sha256"):
        checkpoint.load(path)


def test_truncated_weights(saved):
    _, path = saved
    weights = path / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(path)


def edit_card(path, fn):
    card_path = path / checkpoint.CARD_FILE
    card = json.loads(card_path.read_text())
    fn(card)
    card_path.write_text(json.dumps(card))


def test_unknown_format_version(saved):
    _, path = saved
    edit_card(path, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="unknown format_version 99"):
        checkpoint.load(path)


def test_config_that_does_not_fit_the_weights(saved):
    _, path = saved
    edit_card(path, lambda c: c["config"].update(latent_dim=5))
    with pytest.raises(CheckpointError, match="config does not fit the weights"):
        checkpoint.load(path)


def test_invalid_config_and_json(saved):
    _, path = saved
    edit_card(path, lambda c: c["config"].update(likelihood="poisson"))
    with pytest.raises(CheckpointError, match="bad model config"):
        checkpoint.load(path)
    (path / checkpoint.CARD_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)


def test_update_card_keeps_other_sections(saved):
    _, path = saved
    checkpoint.update_card(path, metrics={"test_elbo": -2.0})
    card = checkpoint.read_card(path)
    assert card["metrics"] == {"test_nll": 1.0, "test_elbo": -2.0} and card["name"] == "t"
    checkpoint.load(path)  # the weights' hash is untouched
