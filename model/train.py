"""Offline training: `python -m model.train --dataset mnist --out checkpoints/mnist ...` (or `vae-train`).

CLI flags -> TrainConfig + VAEConfig -> training loop -> a checkpoint directory the service serves. This module
is the only owner of the optimiser and of seeding. Data-parallel with `torchrun --nproc_per_node N -m model.train`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import __version__, checkpoint
from model.data import DATASETS, binarize, default_data_root, fixed_binarized, load_dataset, to_float
from model.distributed import DistributedContext
from model.losses import training_loss
from model.metrics import dataset_elbo, full_metrics, latent_statistics, posterior_means
from model.preprocess import input_spec
from model.report import METRICS_CSV, plot_loss_curve, write_figures, write_metrics_csv
from model.vae import ACTIVATIONS, BODIES, KINDS, LIKELIHOODS, PRIORS, UPSAMPLES, VAE, VAEConfig

STATE_DIR = "train_state"  # resume state: current weights, Adam moments, RNG states (safetensors + JSON, no pickle)


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
    lr_schedule: str = "cosine"  # "cosine" (over the epochs) | "cosine-time" (over --max-minutes) | "constant"
    weight_decay: float = 0.0
    beta: float = 1.0
    warmup_epochs: float = 0.0  # linear KL warm-up from 0 to beta over this many epochs
    iwae_k: int = 1  # > 1: train on the importance-weighted bound with this many samples (Burda et al. 2015)
    patience: int = 20  # early stopping: epochs without a better validation ELBO
    val_size: int = 5000
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly and keeps the best epoch
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    eval_k: int = 1000
    eval_limit: int | None = None
    resume: bool = False
    progress: bool = True


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a VAE (or the plain-autoencoder baseline) and write a checkpoint the service serves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset, choices=[*DATASETS, "folder"])
    data.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset "
                      "(default: $VAE_DATA_ROOT, else ./data)")  # fmt: skip
    data.add_argument("--image-dir", default=None, help="images for --dataset folder (PNG/JPEG, any size)")
    data.add_argument("--image-size", default=None, help="HxW for --dataset folder, e.g. 64x64")
    data.add_argument("--channels", type=int, default=None, choices=[1, 3], help="for --dataset folder")
    arch = p.add_argument_group("architecture")
    arch.add_argument("--model", default="vae", choices=KINDS, help="vae, or ae: the deterministic baseline")
    arch.add_argument("--encoder", default="mlp", choices=BODIES)
    arch.add_argument("--decoder", default="mlp", choices=BODIES)
    arch.add_argument("--hidden", type=int, nargs="*", default=[500], help="MLP hidden widths")
    arch.add_argument("--conv-channels", type=int, nargs="+", default=[32, 64], help="one stride-2 conv each")
    arch.add_argument(
        "--upsample",
        default="transpose",
        choices=UPSAMPLES,
        help="conv decoder upsampling: transposed conv, or 3x3 conv + pixel shuffle (faster)",
    )
    arch.add_argument("--latent-dim", type=int, default=20)
    arch.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    arch.add_argument("--likelihood", default=None, choices=LIKELIHOODS, help="default: the dataset's own")
    arch.add_argument("--res-blocks", type=int, default=0, help="residual blocks at each conv resolution")
    arch.add_argument("--prior", default="standard", choices=PRIORS, help="p(z): N(0, I), RealNVP flow or VampPrior")
    arch.add_argument("--flow-layers", type=int, default=8, help="coupling layers of --prior flow")
    arch.add_argument("--flow-hidden", type=int, default=256, help="hidden width of each coupling layer")
    arch.add_argument("--vamp-components", type=int, default=500, help="pseudo-inputs of --prior vamp")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs)
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="global, split over processes")
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the cosine schedule")
    opt.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "cosine-time", "constant"],
                     help="cosine: decay over --epochs; cosine-time: decay over the --max-minutes budget (robust to "
                     "a shared machine's speed, not bit-reproducible); constant")  # fmt: skip
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--beta", type=float, default=d.beta, help="weight of the KL term")
    opt.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear KL warm-up")
    opt.add_argument(
        "--iwae-k",
        type=int,
        default=d.iwae_k,
        help="train on the importance-weighted bound with K "
        "posterior samples per image (Burda et al. 2015; 1: the ELBO). Costs K decoder passes per image",
    )
    opt.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    opt.add_argument("--val-size", type=int, default=d.val_size, help="training images held out for validation "
                     "(capped at 10%% of the training set)")  # fmt: skip
    opt.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time, keep the best")
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="checkpoint directory to write")
    run.add_argument("--name", default=None, help="model name in the card (default: the dataset's)")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--eval-k", type=int, default=d.eval_k, help="importance samples for the final test NLL")
    run.add_argument("--eval-limit", type=int, default=None, help="final NLL on the first N test images only")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT/{STATE_DIR} if present")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)

    dataset_shape = DATASETS[a.dataset].input_shape if a.dataset in DATASETS else None
    if a.dataset == "folder":
        if not a.image_dir or not a.image_size or not a.channels:
            p.error("--dataset folder needs --image-dir, --image-size HxW and --channels")
        try:
            h, w = (int(v) for v in a.image_size.lower().split("x"))
        except ValueError:
            p.error(f"--image-size must look like 64x64, got {a.image_size!r}")
        dataset_shape = (a.channels, h, w)
    likelihood = a.likelihood or (DATASETS[a.dataset].likelihood if a.dataset in DATASETS else "gaussian")
    try:
        vae_config = VAEConfig(
            input_shape=dataset_shape, latent_dim=a.latent_dim, encoder=a.encoder, decoder=a.decoder,
            hidden_dims=tuple(a.hidden), conv_channels=tuple(a.conv_channels), upsample=a.upsample,
            activation=a.activation,
            likelihood=likelihood, kind=a.model, res_blocks=a.res_blocks, prior=a.prior, flow_layers=a.flow_layers,
            flow_hidden=a.flow_hidden, vamp_components=a.vamp_components,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    if a.lr_schedule == "cosine-time" and a.max_minutes is None:
        p.error("--lr-schedule cosine-time needs --max-minutes")
    if a.iwae_k < 1 or (a.iwae_k > 1 and a.model == "ae"):
        p.error("--iwae-k must be >= 1, and 1 for --model ae (an autoencoder has no posterior to sample)")
    cfg = TrainConfig(
        dataset=a.dataset, data_root=a.data_root or default_data_root(), image_dir=a.image_dir, out=a.out,
        name=a.name, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, min_lr=a.min_lr,
        lr_schedule=a.lr_schedule, weight_decay=a.weight_decay, beta=a.beta, warmup_epochs=a.warmup_epochs,
        iwae_k=a.iwae_k, patience=a.patience, val_size=a.val_size, max_minutes=a.max_minutes, seed=a.seed,
        threads=a.threads, device=a.device, eval_k=a.eval_k, eval_limit=a.eval_limit, resume=a.resume,
        progress=not a.no_progress,
    )  # fmt: skip
    return cfg, vae_config.to_dict()


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
    if cfg.warmup_epochs <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / (cfg.warmup_epochs * steps_per_epoch))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- resume state ------------------------------------------------------------------------------------------------
def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gens: dict, meta: dict) -> None:
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


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gens: dict) -> dict:
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    return meta


# -- the loop ----------------------------------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, vae_config: VAEConfig):
    """-> (train, val, test) float tensors in [0, 1]; val and test already binarised for Bernoulli models."""
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.image_dir, vae_config.input_shape)
    if data.input_shape != vae_config.input_shape:
        raise ValueError(f"dataset images are {data.input_shape}, the model expects {vae_config.input_shape}")
    train = to_float(data.train)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = min(cfg.val_size, len(train) // 10)
    val, train = train[perm[:n_val]], train[perm[n_val:]]
    test = to_float(data.test)
    if vae_config.likelihood == "bernoulli":
        val, test = fixed_binarized(val, seed=1), fixed_binarized(test, seed=0)
    return train, val, test


def train(cfg: TrainConfig, vae_config: VAEConfig, command: str) -> dict | None:
    """Run training; rank 0 writes the checkpoint and returns its card (other ranks return None)."""
    dist = DistributedContext.from_env(cfg.device)
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    out = Path(cfg.out)
    started = time.time()
    log = print if dist.is_main else (lambda *a, **k: None)

    train_x, val_x, test_x = prepare_data(cfg, vae_config)
    bernoulli = vae_config.likelihood == "bernoulli"
    log(f"data: {cfg.dataset} train {len(train_x)} val {len(val_x)} test {len(test_x)}, shape {vae_config.input_shape}")

    model = VAE(vae_config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, {dist.world_size} process(es) on {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Data order is shared by all ranks; the binarisation and posterior noise differ per rank.
    gens = {
        "order": torch.Generator().manual_seed(cfg.seed),
        "noise": torch.Generator().manual_seed(cfg.seed * 1000 + 1 + dist.rank),
    }
    history: list[dict] = []
    best = {"val_elbo": -math.inf, "epoch": -1}
    start_epoch, step, elapsed_before = 0, 0, 0.0
    state_dir = out / STATE_DIR
    if cfg.resume and (state_dir / "state.json").is_file():
        meta = load_state(state_dir, model, optimizer, gens)
        if VAEConfig.from_dict(meta["vae_config"]) != vae_config:
            raise ValueError(f"{state_dir} was written for another architecture; use a new --out or drop --resume")
        start_epoch, step, history, best = meta["epoch"] + 1, meta["step"], meta["history"], meta["best"]
        elapsed_before = meta["wall_time_s"]
        log(f"resumed from {state_dir} after epoch {meta['epoch']} (best val ELBO {best['val_elbo']:.3f})")
    net = dist.wrap(model)
    run = {"data": (train_x, val_x, test_x), "command": command, "world_size": dist.world_size, "device": device}

    local_bs = max(1, cfg.batch_size // dist.world_size)
    steps_per_epoch = math.ceil((len(train_x) // dist.world_size) / local_bs)
    bad_epochs = len(history) - 1 - best["epoch"] if history else 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = learning_rate(cfg, epoch, elapsed_before + t0 - started)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        perm = torch.randperm(len(train_x), generator=gens["order"])
        shard = perm[dist.rank : len(perm) - len(perm) % dist.world_size : dist.world_size]
        sums = torch.zeros(3, dtype=torch.float64)
        batches = shard.split(local_bs)
        if cfg.progress and dist.is_main:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for idx in batches:
            x = train_x[idx]
            if bernoulli:
                x = binarize(x, gens["noise"])  # dynamic binarisation: a fresh sample every time
            x = x.to(device, non_blocking=True)
            beta = kl_weight(cfg, step, steps_per_epoch)
            fwd = net(x, generator=gens["noise"], samples=cfg.iwae_k)
            loss, terms = training_loss(model, x, fwd, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            with torch.no_grad():
                sums += torch.stack([terms.elbo.sum(), terms.recon.sum(), terms.kl.sum()]).double().cpu()
        sums = dist.all_reduce_sum(sums)
        n_seen = len(shard) * dist.world_size
        model.eval()
        val = dataset_elbo(model, val_x.to(device), seed=1)
        test = dataset_elbo(model, test_x.to(device), seed=0)
        row = {
            "epoch": epoch + 1,
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
        history.append(row)
        # During KL warm-up the objective changes every step, so only count patience once beta is at its target.
        improved = val["elbo"] > best["val_elbo"]
        if improved:
            best = {"val_elbo": val["elbo"], "epoch": epoch}
            bad_epochs = 0
            if dist.is_main:
                run["wall_time"] = elapsed_before + time.time() - started
                checkpoint.save(model, {**describe(cfg, vae_config, run, history, best), "status": "training"}, out)
        elif beta >= cfg.beta:
            bad_epochs += 1
        wall = elapsed_before + time.time() - started
        log(
            f"epoch {epoch + 1:4d}  train {row['train_elbo']:9.3f}  val {row['val_elbo']:9.3f}  "
            f"test {row['test_elbo']:9.3f} (rec {row['test_recon']:.2f} kl {row['test_kl']:.2f})  "
            f"lr {lr:.2e}  beta {beta:.3f}  {row['seconds']:.1f}s{'  *' if improved else ''}"
        )
        if dist.is_main:
            write_metrics_csv(out / METRICS_CSV, history)
            meta = {"epoch": epoch, "step": step, "history": history, "best": best, "wall_time_s": wall,
                    "vae_config": vae_config.to_dict(), "train_config": asdict(cfg)}  # fmt: skip
            save_state(state_dir, model, optimizer, gens, meta)
        if bad_epochs >= cfg.patience:
            log(f"early stopping: no better validation ELBO for {cfg.patience} epochs")
            break
        if cfg.max_minutes is not None and wall > cfg.max_minutes * 60:
            log(f"stopping: wall-time budget of {cfg.max_minutes} minutes used")
            break
    dist.barrier()
    wall_time = elapsed_before + time.time() - started
    card = None
    if dist.is_main:
        run["wall_time"] = wall_time
        card = finish(cfg, vae_config, out, run, history, best)
    dist.close()
    return card


def describe(cfg: TrainConfig, vae_config: VAEConfig, run: dict, history: list[dict], best: dict) -> dict:
    """The card's provenance sections, written with every saved epoch so even an unfinished run is servable."""
    train_x, val_x, test_x = run["data"]
    return {
        "name": cfg.name or (cfg.dataset if cfg.dataset != "folder" else Path(cfg.image_dir).name),
        "description": f"{vae_config.kind.upper()} trained on {cfg.dataset} by vae-serve's training module",
        "input": input_spec(vae_config.input_shape, binarized=vae_config.likelihood == "bernoulli"),
        "dataset": {
            "name": cfg.dataset,
            "train_images": len(train_x),
            "val_images": len(val_x),
            "test_images": len(test_x),
        },  # fmt: skip
        "training": {
            "command": run["command"],
            "seed": cfg.seed,
            "processes": run["world_size"],
            "device": str(run["device"]),
            "epochs_run": len(history),
            "best_epoch": best["epoch"] + 1,
            "wall_time_s": round(run["wall_time"], 2),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "resume")},
        },
        "versions": {"vae_serve": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def finish(cfg: TrainConfig, vae_config: VAEConfig, out: Path, run: dict, history: list[dict], best: dict) -> dict:
    """Reload the best epoch's weights, measure it, and write card, CSV and figures."""
    train_x, _, test_x = run["data"]
    model, _ = checkpoint.load(out, run["device"])
    x_eval = test_x if cfg.eval_limit is None else test_x[: cfg.eval_limit]
    what = f"ELBO and NLL (k={cfg.eval_k})" if vae_config.kind == "vae" else "reconstruction"
    print(f"final evaluation: {what} on {len(x_eval)} test images")
    metrics = full_metrics(model, x_eval, k=cfg.eval_k, progress=cfg.progress)
    metrics["best_epoch"] = best["epoch"] + 1
    metrics["best_val_elbo"] = round(best["val_elbo"], 4)
    train_for_stats = fixed_binarized(train_x, seed=2) if vae_config.likelihood == "bernoulli" else train_x
    card = {
        **describe(cfg, vae_config, run, history, best),
        "status": "final",
        "metrics": metrics,
        "latent_stats": latent_statistics(posterior_means(model, train_for_stats)),
    }
    card = checkpoint.save(model, card, out)
    write_metrics_csv(out / METRICS_CSV, history)
    plot_loss_curve(history, out / "loss_curve.png", title=f"{card['name']}: ELBO per epoch")
    write_figures(model, out, test_x)
    print(json.dumps({"checkpoint": str(out), **metrics}, indent=None))
    return card


def main(argv: list[str] | None = None) -> None:
    cfg, vae_dict = parse_args(argv)
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
