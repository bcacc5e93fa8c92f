import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint, write_synthetic_images

from model import checkpoint
from model.report import METRICS_CSV
from model.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]


def read_csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_writes_a_complete_checkpoint(tiny_checkpoint):
    model, card = checkpoint.load(tiny_checkpoint)
    for name in (
        "weights.safetensors",
        "model_card.json",
        METRICS_CSV,
        "loss_curve.png",
        "samples.png",
        "reconstructions.png",
        "manifold.png",
    ):
        assert (tiny_checkpoint / name).is_file(), name
    assert card["input"]["shape"] == [1, 8, 8] and card["input"]["color_mode"] == "L"
    m = card["metrics"]
    assert {"test_elbo", "test_nll", "nll_k", "nll_n", "active_units"} <= set(m)
    assert m["test_nll"] <= -m["test_elbo"] + 1.0  # the IWAE bound is (on average) tighter than the ELBO
    stats = card["latent_stats"]
    assert len(stats["mean"]) == 2 and len(stats["principal_directions"]) == 2
    t = card["training"]
    assert t["command"].startswith("python -m model.train") and t["seed"] == 0 and t["wall_time_s"] > 0
    assert card["weights"]["sha256"] == checkpoint.sha256_file(tiny_checkpoint / "weights.safetensors")
    assert {"torch", "python", "vae_serve"} <= set(card["versions"])


def test_loss_falls_on_a_tiny_dataset(tmp_path):
    out = make_tiny_checkpoint(tmp_path, "falls", "--epochs", "8", "--lr", "3e-3", "--lr-schedule", "constant")
    rows = read_csv(out / METRICS_CSV)
    assert float(rows[-1]["train_elbo"]) > float(rows[0]["train_elbo"]) + 1.0


def test_iwae_objective_trains_and_is_recorded(tmp_path):
    out = make_tiny_checkpoint(
        tmp_path, "iwae", "--epochs", "6", "--lr", "3e-3", "--lr-schedule", "constant", "--iwae-k", "4"
    )
    rows = read_csv(out / METRICS_CSV)
    assert float(rows[-1]["train_elbo"]) > float(rows[0]["train_elbo"]) + 1.0
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["config"]["iwae_k"] == 4 and "--iwae-k 4" in card["training"]["command"]


def test_iwae_k_is_validated(capsys):
    for bad in (["--iwae-k", "0"], ["--model", "ae", "--iwae-k", "5"]):
        with pytest.raises(SystemExit):
            train_main(bad)
        assert "--iwae-k" in capsys.readouterr().err


def test_training_is_deterministic_for_a_seed(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "same")
    b = make_tiny_checkpoint(tmp_path / "b", "same")
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()


def test_resume_continues_where_it_stopped(tmp_path):
    straight = make_tiny_checkpoint(tmp_path / "straight", "r", "--epochs", "4", "--lr-schedule", "constant")
    resumed_dir = tmp_path / "resumed"
    make_tiny_checkpoint(resumed_dir, "r", "--epochs", "2", "--lr-schedule", "constant")
    resumed = make_tiny_checkpoint(resumed_dir, "r", "--epochs", "4", "--lr-schedule", "constant", "--resume")
    assert [r["train_elbo"] for r in read_csv(straight / METRICS_CSV)] == [
        r["train_elbo"] for r in read_csv(resumed / METRICS_CSV)
    ]
    assert (straight / "weights.safetensors").read_bytes() == (resumed / "weights.safetensors").read_bytes()


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'mnist' not found") and "model.download" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert "--latent-dim" in out and "(default: 20)" in out and "--warmup-epochs" in out


def test_evaluate_cli_json_and_card_update(tiny_checkpoint, tmp_path, capsys):
    from model.evaluate import main as evaluate_main

    images = tiny_checkpoint.parent / "tiny-images"
    evaluate_main([str(tiny_checkpoint), "--k", "16", "--limit", "3", "--json", "--image-dir", str(images)])
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) >= {"elbo", "nll", "k", "n"} and figures["n"] == 3 and figures["k"] == 16
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    evaluate_main([str(copy), "--k", "16", "--image-dir", str(images)])
    card = checkpoint.read_card(copy)
    assert card["metrics"]["nll_k"] == 16 and "evaluated_s" in card["metrics"]


def test_torchrun_two_processes(tmp_path):
    images = write_synthetic_images(tmp_path / "images")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "model.train",
        "--dataset",
        "folder",
        "--image-dir",
        str(images),
        "--image-size",
        "8x8",
        "--channels",
        "1",
        "--hidden",
        "16",
        "--latent-dim",
        "2",
        "--likelihood",
        "bernoulli",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--eval-k",
        "4",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    _, card = checkpoint.load(out)
    assert card["training"]["processes"] == 2 and card["training"]["command"].startswith("torchrun")


def test_every_option_has_help_and_shows_its_default_once(capsys):
    from model.train import build_parser

    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for line in out.split(" --")[1:]:
        assert line.count("(default") <= 1, line
    assert "--data-root" in out and "(default: None)" not in out


def test_cli_defaults_come_from_the_config_dataclasses():
    from model.train import TrainConfig, parse_args
    from model.vae import VAEConfig

    cfg, vae = parse_args([])
    assert cfg.epochs == TrainConfig().epochs and cfg.eval_k == TrainConfig().eval_k
    defaults = VAEConfig().to_dict()
    for key in ("latent_dim", "encoder", "decoder", "activation", "upsample", "prior", "res_blocks"):
        assert vae[key] == defaults[key], key
    assert tuple(vae["hidden_dims"]) == defaults["hidden_dims"]


def test_preset_default_is_the_shipped_architecture_and_flags_win():
    from model.train import parse_args

    _, vae = parse_args(["--preset", "default"])
    assert (vae["encoder"], vae["decoder"], vae["latent_dim"], vae["prior"]) == ("conv", "conv", 50, "flow")
    cfg, vae = parse_args(["--preset", "default", "--latent-dim", "8", "--lr", "3e-4"])
    assert vae["latent_dim"] == 8 and cfg.lr == 3e-4 and vae["prior"] == "flow"


def test_cosine_time_schedule_follows_the_budget(capsys):
    from model.train import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, lr_schedule="cosine-time", max_minutes=10)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 0, 300.0) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(cfg, 0, 900.0) == pytest.approx(1e-5)
    with pytest.raises(SystemExit):
        train_main(["--lr-schedule", "cosine-time"])
    assert "--max-minutes" in capsys.readouterr().err


def test_missing_train_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit) as e:
        train_main(["--epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[train]"' in err and "tqdm" in err


def test_learned_prior_on_a_training_subset_without_the_nll(tmp_path, capsys):
    """--train-limit for a quick try, --eval-k 0 for no likelihood estimate, and a VampPrior through the CLI."""
    out = make_tiny_checkpoint(
        tmp_path,
        "vamp",
        "--prior",
        "vamp",
        "--vamp-components",
        "3",
        "--train-limit",
        "20",
        "--eval-k",
        "0",
        "--epochs",
        "1",
    )
    model, card = checkpoint.load(out)
    assert card["config"]["prior"] == "vamp" and card["dataset"]["train_images"] == 20
    assert "test_nll" not in card["metrics"] and "evaluated_s" in card["metrics"]
    assert "final evaluation on" in capsys.readouterr().out
