"""model.calibrate: the CLI rebuilds training's validation split, scores it as /v1/score would, and stores the
calibration in the checkpoint; the function training calls does the same from tensors."""

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from model import anomaly, checkpoint
from model.calibrate import calibrate, dataset_statistics, held_out_images, main
from model.vae import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Bernoulli VAE trained for one epoch on 300 synthetic 8x8 images: a validation split of 27."""
    root = tmp_path_factory.mktemp("calibrate")
    flags = ("--epochs", "1", "--batch-size", "32", "--eval-k", "2", "--threads", "1")
    return make_tiny_checkpoint(root, "tiny", *flags, n_images=300)


def test_the_cli_calibrates_a_checkpoint_on_its_validation_split(trained: Path, capsys) -> None:
    main([str(trained), "--k", "4"])
    assert "calibrated on 27 held-out images (k=4)" in capsys.readouterr().out
    card = checkpoint.read_card(trained)
    cal = anomaly.load_calibration(trained, card)
    assert cal is not None and cal.n == card["dataset"]["val_images"] == 27 and cal.k == 4 and cal.binarized
    assert card["calibration"]["data"] == "validation split of folder (27 images)"
    # Re-running gives the same calibration: seeded binarisation and importance samples.
    main([str(trained), "--k", "4"])
    again = anomaly.load_calibration(trained)
    assert torch.equal(again.reference_scores, cal.reference_scores) and torch.equal(again.mean, cal.mean)


def test_the_validation_split_is_training_s_and_disjoint_from_the_test_set(trained: Path) -> None:
    card = checkpoint.read_card(trained)
    val = held_out_images(card)
    assert val.shape == (27, 1, 8, 8) and 0 <= val.min() and val.max() <= 1
    from model.data import load_dataset, to_float

    config = card["training"]["config"]
    test = to_float(load_dataset("folder", None, config["image_dir"], (1, 8, 8)).test)
    assert not (val[:, None] == test[None]).flatten(2).all(-1).any()


def test_a_card_without_training_provenance_cannot_name_its_split() -> None:
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        held_out_images({"config": {"input_shape": [1, 8, 8]}, "training": {}})


def test_the_function_training_calls_stores_a_calibration(trained: Path, tmp_path: Path) -> None:
    model, card = checkpoint.load(trained)
    out = tmp_path / "copy"
    checkpoint.save(model, {k: v for k, v in card.items() if k != "calibration"}, out)
    assert anomaly.load_calibration(out) is None
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    section = calibrate(model, x, out, k=3, data="test images", log=lines.append)
    assert section is not None and section["n"] == 40 and section["data"] == "test images"
    assert lines and lines[0].startswith("calibrated on 40 held-out images (k=3)")
    cal = anomaly.load_calibration(out)
    # The stored reference scores are what the statistics of x give under cross-fitting.
    refit = anomaly.fit(
        dataset_statistics(model, x, k=3, seed=0), k=3, binarized=True, weights_sha256=cal.weights_sha256
    )
    assert torch.equal(refit.reference_scores, cal.reference_scores)


def test_an_autoencoder_is_not_calibrated_and_the_cli_says_why(tiny_ae_checkpoint: Path, capsys) -> None:
    model, _ = checkpoint.load(tiny_ae_checkpoint)
    lines: list[str] = []
    assert calibrate(model, torch.zeros(30, 1, 8, 8), tiny_ae_checkpoint, log=lines.append) is None
    assert "no likelihood" in lines[0]
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_ae_checkpoint)])
    assert exc.value.code == 2 and "no likelihood" in capsys.readouterr().err
    assert anomaly.load_calibration(tiny_ae_checkpoint) is None


def test_too_small_a_validation_split_is_skipped_by_training_and_a_clear_cli_error(
    tiny_checkpoint: Path, capsys
) -> None:
    model, _ = checkpoint.load(tiny_checkpoint)
    lines: list[str] = []
    assert calibrate(model, torch.rand(5, 1, 8, 8), tiny_checkpoint, log=lines.append) is None
    assert f"at least {anomaly.MIN_IMAGES} held-out images, got 5" in lines[0]
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_checkpoint), "--k", "2"])
    assert exc.value.code == 2 and f"at least {anomaly.MIN_IMAGES} held-out images" in capsys.readouterr().err
    assert anomaly.load_calibration(tiny_checkpoint) is None


def test_a_gaussian_decoder_model_is_calibrated_on_its_continuous_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(input_shape=(3, 8, 8), latent_dim=3, hidden_dims=(16,), likelihood="gaussian")).eval()
    checkpoint.save(model, {"name": "rgb"}, tmp_path)
    x = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert calibrate(model, x, tmp_path, k=3, log=lambda _: None) is not None
    cal = anomaly.load_calibration(tmp_path)
    assert cal is not None and not cal.binarized
    stats = dataset_statistics(model, torch.cat([x[:5], torch.zeros(5, 3, 8, 8)]), k=3, seed=1)
    verdict = cal.assess(stats, 0.1)
    assert verdict["p_value"].shape == (10,) and torch.isfinite(verdict["ood_score"]).all()
