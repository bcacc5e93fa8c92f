"""Offline training: `python -m model.train --dataset mnist --out checkpoints/mnist ...` (or `vae-train`).

CLI flags -> TrainConfig + VAEConfig -> training loop -> a checkpoint directory the service serves. This module
is the only owner of the optimiser and of seeding. Data-parallel with `torchrun --nproc_per_node N -m model.train`.

The loop, like nanoGPT's, is a short list of named steps: set up (processes, device, seeds), load the data, build
the model and optimiser, resume, then per epoch: learning rate and KL warm-up, one pass over the training set,
validation, saving the best epoch and the resume state, and the stopping rules (early stopping, time budget).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model import __version__, checkpoint
from model.calibrate import calibrate
from model.data import DATASETS, default_data_root, fixed_binarized, load_dataset, to_float
from model.device import resolve_device
from model.distributed import DistributedContext
from model.losses import training_loss
from model.metrics import dataset_elbo, full_metrics, latent_statistics, posterior_means
from model.preprocess import binarize, input_spec
from model.report import METRICS_CSV, plot_loss_curve, write_figures, write_metrics_csv
from model.vae import ACTIVATIONS, BODIES, KINDS, LIKELIHOODS, PRIORS, UPSAMPLES, VAE, VAEConfig

STATE_DIR = "train_state"  # resume state: current weights, Adam moments, RNG states (safetensors + JSON, no pickle)
LR_SCHEDULES = ("cosine", "cosine-time", "constant")
TRAIN_EXTRA = ("tqdm", "matplotlib")  # what `pip install -e ".[train]"` adds that training needs (scipy: Frey Face)


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    data_root: str = field(default_factory=default_data_root)
    image_dir: str | None = None
    out: str = "checkpoints/run"
    name: str | None = None
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" (over the epochs) | "cosine-time" (over max_minutes) | "constant"
    weight_decay: float = 0.0
    beta: float = 1.0
    warmup_epochs: float = 0.0  # linear KL warm-up from 0 to beta over this many epochs
    iwae_k: int = 1  # > 1: train on the importance-weighted bound with this many samples (Burda et al. 2015)
    patience: int = 20  # early stopping: epochs without a better validation ELBO
    val_size: int = 5000
    train_limit: int | None = None  # train on the first N training images only (a quick try)
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly and keeps the best epoch
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    eval_k: int = 1000  # importance samples per image for the final test NLL; 0 skips the NLL
    eval_limit: int | None = None  # final evaluation on the first N test images only
    resume: bool = False
    progress: bool = True


@dataclass
class TrainState:
    """Everything the loop changes, and all that resuming restores besides weights, Adam moments and RNG states."""

    epoch: int = 0  # the next epoch to run (0-based)
    step: int = 0  # optimiser steps taken
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (metrics.csv)
    best_val_elbo: float = -math.inf
    best_epoch: int = -1  # 0-based; -1 before the first epoch
    bad_epochs: int = 0  # epochs since the best one, counted once the KL weight is at its target
    elapsed_before: float = 0.0  # wall seconds spent by earlier sessions of a resumed run

    def meta(self, wall_time_s: float) -> dict[str, Any]:
        """The JSON part of the resume state (the format of earlier versions, so their runs resume too)."""
        return {
            "epoch": self.epoch - 1,
            "step": self.step,
            "history": self.history,
            "wall_time_s": wall_time_s,
            "best": {"val_elbo": self.best_val_elbo, "epoch": self.best_epoch},
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        history, best = meta["history"], meta["best"]
        return cls(
            epoch=meta["epoch"] + 1,
            step=meta["step"],
            history=history,
            best_val_elbo=best["val_elbo"],
            best_epoch=best["epoch"],
            bad_epochs=len(history) - 1 - best["epoch"] if history else 0,
            elapsed_before=meta["wall_time_s"],
        )


@dataclass
class Run:
    """What stays fixed for one training run: its settings, processes, device, data and provenance."""

    cfg: TrainConfig
    vae_config: VAEConfig
    dist: DistributedContext
    device: torch.device
    train_x: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor
    command: str
    started: float = field(default_factory=time.time)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


# -- command line ------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not for flags, nor where the help text already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


# The architecture and optimiser of the shipped default model (checkpoints/mnist; docs/training.md), for
# `--preset default`: train the same model on other data. Flags given on the command line win over a preset.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "encoder": "conv",
        "decoder": "conv",
        "upsample": "subpixel",
        "conv_channels": [16, 32],
        "hidden": [512],
        "latent_dim": 50,
        "activation": "elu",
        "prior": "flow",
        "flow_layers": 8,
        "flow_hidden": 128,
        "batch_size": 100,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "warmup_epochs": 5,
        "patience": 30,
    },
}


def build_parser() -> argparse.ArgumentParser:
    """Every option with help text; defaults come from TrainConfig and VAEConfig, never typed twice."""
    d, v = TrainConfig(), VAEConfig()
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a VAE (or the plain-autoencoder baseline) and write a checkpoint the service serves.",
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default=d.dataset,
        choices=[*DATASETS, "folder"],
        help="a named dataset under --data-root, or 'folder': your own images (--image-dir)",
    )
    data.add_argument(
        "--data-root",
        default=None,
        help="folder holding one sub-folder per dataset (default: $VAE_DATA_ROOT, else ./data)",
    )
    data.add_argument("--image-dir", default=None, help="images for --dataset folder (PNG/JPEG, any size)")
    data.add_argument("--image-size", default=None, help="HxW for --dataset folder, e.g. 64x64")
    data.add_argument("--channels", type=int, default=None, choices=[1, 3], help="1 (grey) or 3 (RGB), for folder")
    data.add_argument(
        "--train-limit",
        type=int,
        default=d.train_limit,
        metavar="N",
        help="train on the first N training images only: a quick try (default: all)",
    )
    arch = p.add_argument_group("architecture")
    arch.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="'default': the shipped default model's architecture and optimiser settings (conv VAE "
        "with a flow prior; docs/training.md), for training it on other data; other flags override it",
    )
    arch.add_argument("--model", default=v.kind, choices=KINDS, help="vae, or ae: the deterministic baseline")
    arch.add_argument("--encoder", default=v.encoder, choices=BODIES, help="encoder body")
    arch.add_argument("--decoder", default=v.decoder, choices=BODIES, help="decoder body")
    arch.add_argument(
        "--hidden",
        type=int,
        nargs="*",
        default=list(v.hidden_dims),
        help="fully connected widths (encoder order; the decoder mirrors them)",
    )
    arch.add_argument(
        "--conv-channels",
        type=int,
        nargs="+",
        default=list(v.conv_channels),
        help="channels of the conv bodies, one stride-2 conv each",
    )
    arch.add_argument(
        "--upsample",
        default=v.upsample,
        choices=UPSAMPLES,
        help="conv decoder upsampling: transposed conv, or 3x3 conv + pixel shuffle (faster)",
    )
    arch.add_argument("--res-blocks", type=int, default=v.res_blocks, help="residual blocks at each conv resolution")
    arch.add_argument("--latent-dim", type=int, default=v.latent_dim, help="size of the latent vector z")
    arch.add_argument("--activation", default=v.activation, choices=sorted(ACTIVATIONS), help="hidden nonlinearity")
    arch.add_argument(
        "--likelihood",
        default=None,
        choices=LIKELIHOODS,
        help="decoder distribution (default: the dataset's own; gaussian for a folder)",
    )
    arch.add_argument("--prior", default=v.prior, choices=PRIORS, help="p(z): N(0, I), a RealNVP flow, or a VampPrior")
    arch.add_argument("--flow-layers", type=int, default=v.flow_layers, help="coupling layers of --prior flow")
    arch.add_argument("--flow-hidden", type=int, default=v.flow_hidden, help="hidden width of each coupling layer")
    arch.add_argument("--vamp-components", type=int, default=v.vamp_components, help="pseudo-inputs of --prior vamp")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help="epochs planned (the cosine schedule's length)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="global, split over processes")
    opt.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (the schedule's start)")
    opt.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the cosine schedule")
    opt.add_argument(
        "--lr-schedule",
        default=d.lr_schedule,
        choices=LR_SCHEDULES,
        help="cosine: decay over --epochs; cosine-time: decay over the --max-minutes budget (robust to a "
        "shared machine's speed, not bit-reproducible); constant",
    )
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam's L2 penalty")
    opt.add_argument("--beta", type=float, default=d.beta, help="weight of the KL term")
    opt.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear KL warm-up from 0 to beta")
    opt.add_argument(
        "--iwae-k",
        type=int,
        default=d.iwae_k,
        help="train on the importance-weighted bound with K posterior samples per image (Burda et al. "
        "2015; 1: the ELBO). Costs K decoder passes per image",
    )
    opt.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    opt.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        help="training images held out for validation (capped at 10%% of the training set)",
    )
    opt.add_argument(
        "--max-minutes",
        type=float,
        default=d.max_minutes,
        help="stop after this wall time and keep the best epoch (default: no limit)",
    )
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="checkpoint directory to write")
    run.add_argument("--name", default=d.name, help="model name in the card (default: the dataset's)")
    run.add_argument("--seed", type=int, default=d.seed, help="seeds data order, binarisation and noise")
    run.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--eval-k",
        type=int,
        default=d.eval_k,
        help="final evaluation: importance samples per test image for the NLL; it costs eval-k decoder "
        "passes per image (0: ELBO only)",
    )
    run.add_argument(
        "--eval-limit",
        type=int,
        default=d.eval_limit,
        metavar="N",
        help="final evaluation on the first N test images only (default: all)",
    )
    run.add_argument("--resume", action="store_true", help=f"continue from OUT/{STATE_DIR} if present")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])  # explicit flags still win
    a = p.parse_args(argv)

    if a.dataset == "folder":
        if not a.image_dir or not a.image_size or not a.channels:
            p.error("--dataset folder needs --image-dir, --image-size HxW and --channels")
        try:
            h, w = (int(v) for v in a.image_size.lower().split("x"))
        except ValueError:
            p.error(f"--image-size must look like 64x64, got {a.image_size!r}")
        dataset_shape = (a.channels, h, w)
    else:
        dataset_shape = DATASETS[a.dataset].input_shape
    likelihood = a.likelihood or (DATASETS[a.dataset].likelihood if a.dataset in DATASETS else "gaussian")
    try:
        vae_config = VAEConfig(
            input_shape=dataset_shape,
            latent_dim=a.latent_dim,
            encoder=a.encoder,
            decoder=a.decoder,
            hidden_dims=tuple(a.hidden),
            conv_channels=tuple(a.conv_channels),
            upsample=a.upsample,
            activation=a.activation,
            likelihood=likelihood,
            kind=a.model,
            res_blocks=a.res_blocks,
            prior=a.prior,
            flow_layers=a.flow_layers,
            flow_hidden=a.flow_hidden,
            vamp_components=a.vamp_components,
        )
    except ValueError as e:
        p.error(str(e))
    if a.iwae_k < 1 or (a.iwae_k > 1 and a.model == "ae"):
        p.error("--iwae-k must be >= 1, and 1 for --model ae (an autoencoder has no posterior to sample)")
    if a.lr_schedule == "cosine-time" and a.max_minutes is None:
        p.error("--lr-schedule cosine-time needs --max-minutes")
    if a.train_limit is not None and a.train_limit < 1:
        p.error("--train-limit must be >= 1")
    cfg = TrainConfig(
        dataset=a.dataset,
        data_root=a.data_root or default_data_root(),
        image_dir=a.image_dir,
        out=a.out,
        name=a.name,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        min_lr=a.min_lr,
        lr_schedule=a.lr_schedule,
        weight_decay=a.weight_decay,
        beta=a.beta,
        warmup_epochs=a.warmup_epochs,
        iwae_k=a.iwae_k,
        patience=a.patience,
        val_size=a.val_size,
        train_limit=a.train_limit,
        max_minutes=a.max_minutes,
        seed=a.seed,
        threads=a.threads,
        device=a.device,
        eval_k=a.eval_k,
        eval_limit=a.eval_limit,
        resume=a.resume,
        progress=not a.no_progress,
    )
    return cfg, vae_config.to_dict()


# -- schedules ---------------------------------------------------------------------------------------------------
def learning_rate(cfg: TrainConfig, epoch: int, elapsed_s: float = 0.0) -> float:
    """Cosine decay from lr to min_lr over the planned epochs, or over the wall-time budget for "cosine-time"
    (stateless, so resuming needs no scheduler)."""
    if cfg.lr_schedule == "cosine-time" and cfg.max_minutes:
        t = min(1.0, elapsed_s / (cfg.max_minutes * 60))
    elif cfg.lr_schedule == "constant" or cfg.epochs <= 1:
        return cfg.lr
    else:
        t = min(1.0, epoch / (cfg.epochs - 1))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def kl_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): beta * min(1, step / warm-up steps)."""
    if cfg.warmup_epochs <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / (cfg.warmup_epochs * steps_per_epoch))


# -- resume state ------------------------------------------------------------------------------------------------
Generators = dict[str, torch.Generator]


def save_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gens: Generators, meta: dict[str, Any]
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in checkpoint.clean_state_dict(model.state_dict()).items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    for name, g in gens.items():
        tensors[f"rng.{name}"] = g.get_state()
    save_file(tensors, str(path / "state.tmp"))
    os.replace(path / "state.tmp", path / "state.safetensors")
    meta = {**meta, "param_groups": opt["param_groups"]}
    checkpoint.write_json_atomic(path / "state.json", meta)


def load_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gens: Generators
) -> dict[str, Any]:
    tensors = load_file(str(path / "state.safetensors"))
    meta: dict[str, Any] = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    return meta


# -- the steps of a run ------------------------------------------------------------------------------------------
def setup(cfg: TrainConfig) -> tuple[DistributedContext, torch.device]:
    """Processes (torchrun), device, threads, the global seed and deterministic kernels on CPU."""
    dist = DistributedContext.from_env(cfg.device)
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    return dist, device


def prepare_data(cfg: TrainConfig, vae_config: VAEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (train, val, test) float tensors in [0, 1]; val and test already binarised for Bernoulli models."""
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.image_dir, vae_config.input_shape)
    if data.input_shape != vae_config.input_shape:
        raise ValueError(f"dataset images are {data.input_shape}, the model expects {vae_config.input_shape}")
    train = to_float(data.train)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = min(cfg.val_size, len(train) // 10)
    val, train = train[perm[:n_val]], train[perm[n_val:]]
    if cfg.train_limit is not None:
        train = train[: cfg.train_limit]
    test = to_float(data.test)
    if vae_config.likelihood == "bernoulli":
        val, test = fixed_binarized(val, seed=1), fixed_binarized(test, seed=0)
    return train, val, test


def make_generators(cfg: TrainConfig, rank: int) -> Generators:
    """Data order is shared by all ranks; the binarisation and posterior noise differ per rank."""
    return {
        "order": torch.Generator().manual_seed(cfg.seed),
        "noise": torch.Generator().manual_seed(cfg.seed * 1000 + 1 + rank),
    }


def resume(run: Run, model: VAE, optimizer: torch.optim.Optimizer, gens: Generators) -> TrainState:
    """The state saved after the last finished epoch under OUT/train_state, or a fresh one."""
    state_dir = run.out / STATE_DIR
    if not (run.cfg.resume and (state_dir / "state.json").is_file()):
        return TrainState()
    meta = load_state(state_dir, model, optimizer, gens)
    if VAEConfig.from_dict(meta["vae_config"]) != run.vae_config:
        raise ValueError(f"{state_dir} was written for another architecture; use a new --out or drop --resume")
    state = TrainState.from_meta(meta)
    run.log(f"resumed from {state_dir} after epoch {state.epoch} (best val ELBO {state.best_val_elbo:.3f})")
    return state


def train_epoch(
    run: Run,
    net: torch.nn.Module,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    gens: Generators,
    state: TrainState,
) -> tuple[torch.Tensor, int, float]:
    """One pass over this process's shard of the training set -> (summed ELBO, recon, KL; images seen; last beta)."""
    cfg, dist = run.cfg, run.dist
    local_bs = max(1, cfg.batch_size // dist.world_size)
    steps_per_epoch = math.ceil((len(run.train_x) // dist.world_size) / local_bs)
    net.train()
    perm = torch.randperm(len(run.train_x), generator=gens["order"])
    shard = perm[dist.rank : len(perm) - len(perm) % dist.world_size : dist.world_size]
    sums = torch.zeros(3, dtype=torch.float64)
    batches: Iterable[torch.Tensor] = torch.split(shard, local_bs)
    if cfg.progress and dist.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
    beta = kl_weight(cfg, state.step, steps_per_epoch)
    for idx in batches:
        x = run.train_x[idx]
        if model.config.likelihood == "bernoulli":
            x = binarize(x, gens["noise"])  # dynamic binarisation: a fresh sample every time
        x = x.to(run.device, non_blocking=True)
        beta = kl_weight(cfg, state.step, steps_per_epoch)
        fwd = net(x, generator=gens["noise"], samples=cfg.iwae_k)
        loss, terms = training_loss(model, x, fwd, beta)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        state.step += 1
        with torch.no_grad():
            sums += torch.stack([terms.elbo.sum(), terms.recon.sum(), terms.kl.sum()]).double().cpu()
    return dist.all_reduce_sum(sums), len(shard) * dist.world_size, beta


def evaluate_epoch(run: Run, model: VAE) -> tuple[dict[str, float], dict[str, float]]:
    """Validation and test ELBO with fixed sampling seeds (the validation figure picks the best epoch)."""
    model.eval()
    return dataset_elbo(model, run.val_x.to(run.device), seed=1), dataset_elbo(model, run.test_x.to(run.device), seed=0)


def stop_reason(run: Run, state: TrainState, wall_time_s: float) -> str | None:
    """Early stopping on the validation ELBO, or the wall-time budget; None to go on."""
    if state.bad_epochs >= run.cfg.patience:
        return f"early stopping: no better validation ELBO for {run.cfg.patience} epochs"
    if run.cfg.max_minutes is not None and wall_time_s > run.cfg.max_minutes * 60:
        return f"stopping: wall-time budget of {run.cfg.max_minutes} minutes used"
    return None


def train(cfg: TrainConfig, vae_config: VAEConfig, command: str) -> dict[str, Any] | None:
    """Run training; rank 0 writes the checkpoint and returns its card (other ranks return None)."""
    dist, device = setup(cfg)
    train_x, val_x, test_x = prepare_data(cfg, vae_config)
    run = Run(cfg, vae_config, dist, device, train_x, val_x, test_x, command)
    run.log(
        f"data: {cfg.dataset} train {len(train_x)} val {len(val_x)} test {len(test_x)}, shape {vae_config.input_shape}"
    )

    model = VAE(vae_config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model: {n_params:,} parameters, {dist.world_size} process(es) on {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gens = make_generators(cfg, dist.rank)
    state = resume(run, model, optimizer, gens)
    net = dist.wrap(model)

    while state.epoch < cfg.epochs:
        t0 = time.time()
        lr = learning_rate(cfg, state.epoch, state.elapsed_before + t0 - run.started)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums, n_seen, beta = train_epoch(run, net, model, optimizer, gens, state)
        val, test = evaluate_epoch(run, model)
        row = {
            "epoch": state.epoch + 1,
            "train_elbo": round(float(sums[0]) / n_seen, 4),
            "train_recon": round(float(sums[1]) / n_seen, 4),
            "train_kl": round(float(sums[2]) / n_seen, 4),
            "val_elbo": round(val["elbo"], 4),
            "test_elbo": round(test["elbo"], 4),
            "test_recon": round(test["recon"], 4),
            "test_kl": round(test["kl"], 4),
            "lr": lr,
            "beta": round(beta, 5),
            "seconds": round(time.time() - t0, 2),
            "images_per_s": round(n_seen / max(time.time() - t0, 1e-9), 1),
        }
        state.history.append(row)
        improved = val["elbo"] > state.best_val_elbo
        if improved:
            state.best_val_elbo, state.best_epoch, state.bad_epochs = val["elbo"], state.epoch, 0
            if dist.is_main:  # the best epoch so far is always a servable checkpoint
                wall = state.elapsed_before + time.time() - run.started
                checkpoint.save(model, {**describe(run, state, wall), "status": "training"}, run.out)
        elif beta >= cfg.beta:  # during KL warm-up the objective changes every step: count patience after it
            state.bad_epochs += 1
        state.epoch += 1
        wall = state.elapsed_before + time.time() - run.started
        run.log(
            f"epoch {row['epoch']:4d}  train {row['train_elbo']:9.3f}  val {row['val_elbo']:9.3f}  "
            f"test {row['test_elbo']:9.3f} (rec {row['test_recon']:.2f} kl {row['test_kl']:.2f})  "
            f"lr {lr:.2e}  beta {beta:.3f}  {row['seconds']:.1f}s{'  *' if improved else ''}"
        )
        if dist.is_main:
            write_metrics_csv(run.out / METRICS_CSV, state.history)
            meta = {**state.meta(wall), "vae_config": vae_config.to_dict(), "train_config": asdict(cfg)}
            save_state(run.out / STATE_DIR, model, optimizer, gens, meta)
        reason = stop_reason(run, state, wall)
        if reason:
            run.log(reason)
            break
    dist.barrier()
    card = finish(run, state, state.elapsed_before + time.time() - run.started) if dist.is_main else None
    dist.close()
    return card


def describe(run: Run, state: TrainState, wall_time_s: float) -> dict[str, Any]:
    """The card's provenance sections, written with every saved epoch so even an unfinished run is servable."""
    cfg, vae_config = run.cfg, run.vae_config
    return {
        "name": cfg.name or (cfg.dataset if cfg.dataset != "folder" else Path(cfg.image_dir or "folder").name),
        "description": f"{vae_config.kind.upper()} trained on {cfg.dataset} by vae-serve's training module",
        "input": input_spec(vae_config.input_shape, binarized=vae_config.likelihood == "bernoulli"),
        "dataset": {
            "name": cfg.dataset,
            "train_images": len(run.train_x),
            "val_images": len(run.val_x),
            "test_images": len(run.test_x),
        },
        "training": {
            "command": run.command,
            "seed": cfg.seed,
            "processes": run.dist.world_size,
            "device": str(run.device),
            "epochs_run": len(state.history),
            "best_epoch": state.best_epoch + 1,
            "wall_time_s": round(wall_time_s, 2),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "resume")},
        },
        "versions": {"vae_serve": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def finish(run: Run, state: TrainState, wall_time_s: float) -> dict[str, Any]:
    """Reload the best epoch's weights, measure it, and write card, CSV and figures."""
    cfg = run.cfg
    model, _ = checkpoint.load(run.out, run.device)
    x_eval = run.test_x if cfg.eval_limit is None else run.test_x[: cfg.eval_limit]
    k = cfg.eval_k if model.stochastic else 0
    cost = f"NLL with k={k}: {len(x_eval) * k:,} decoder passes" if k else "no NLL"
    print(f"final evaluation on {len(x_eval)} test images: ELBO, {cost} (--eval-k, --eval-limit)", flush=True)
    t0 = time.time()
    metrics = full_metrics(model, x_eval, k=k, progress=cfg.progress)
    metrics["evaluated_s"] = round(time.time() - t0, 1)
    print(f"final evaluation took {metrics['evaluated_s']} s", flush=True)
    metrics["best_epoch"] = state.best_epoch + 1
    metrics["best_val_elbo"] = round(state.best_val_elbo, 4)
    bernoulli = run.vae_config.likelihood == "bernoulli"
    train_for_stats = fixed_binarized(run.train_x, seed=2) if bernoulli else run.train_x
    card = {
        **describe(run, state, wall_time_s),
        "status": "final",
        "metrics": metrics,
        "latent_stats": latent_statistics(posterior_means(model, train_for_stats)),
    }
    card = checkpoint.save(model, card, run.out)
    # The out-of-distribution score's calibration (/v1/score's ood_score and p_value), on the held-out split.
    section = calibrate(model, run.val_x, run.out, data=f"validation split of {cfg.dataset}")
    if section is not None:
        card["calibration"] = section
    write_metrics_csv(run.out / METRICS_CSV, state.history)
    plot_loss_curve(state.history, run.out / "loss_curve.png", title=f"{card['name']}: ELBO per epoch")
    write_figures(model, run.out, run.test_x)
    print(json.dumps({"checkpoint": str(run.out), **metrics}, indent=None))
    return card


def missing_train_extra(dataset: str) -> list[str]:
    """The modules of the `train` extra that this run needs and that are not installed."""
    needed = [*TRAIN_EXTRA, *(["scipy"] if dataset == "frey-face" else [])]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    cfg, vae_dict = parse_args(argv)
    missing = missing_train_extra(cfg.dataset)
    if missing:
        print(
            f"error: training needs the 'train' extra ({', '.join(missing)} missing): pip install -e \".[train]\"",
            file=sys.stderr,
        )
        raise SystemExit(2)
    args = sys.argv[1:] if argv is None else argv
    launcher = "torchrun -m model.train" if "LOCAL_RANK" in os.environ else "python -m model.train"
    command = " ".join([launcher, *map(shlex.quote, args)])
    try:
        train(cfg, VAEConfig.from_dict(vae_dict), command)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
