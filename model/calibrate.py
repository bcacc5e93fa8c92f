"""Calibrate a checkpoint's out-of-distribution score: `python -m model.calibrate CHECKPOINT`.

Scores the checkpoint's held-out images as /v1/score scores a request (Bernoulli models: binarised with a seeded
generator, then the ELBO and the k-sample likelihood from the same generator), fits model.anomaly's density on them
and writes calibration.safetensors plus the card's `calibration` section. The held-out images are training's own
validation split (the same seeded permutation of the training set): never trained on, only used to pick the best
epoch, and disjoint from the test set. Training calls `calibrate(model, val_x, out)` at its end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model import anomaly, checkpoint
from model.data import default_data_root, load_dataset, to_float
from model.preprocess import binarize
from model.vae import VAE

BATCH_SIZE = 100


def held_out_images(card: dict[str, Any], data_root: str | None = None, image_dir: str | None = None) -> torch.Tensor:
    """Training's validation split, (N, C, H, W) floats in [0, 1] (not binarised), rebuilt from the card's training
    seed and val_size as model.train split it. Raises ValueError when the card cannot say which images those were."""
    train_cfg = (card.get("training") or {}).get("config") or {}
    missing = [key for key in ("dataset", "seed", "val_size") if key not in train_cfg]
    if missing:
        raise ValueError(f"the card records no training {', '.join(missing)}: its held-out split cannot be rebuilt")
    data = load_dataset(
        train_cfg["dataset"],
        data_root or default_data_root(),
        image_dir or train_cfg.get("image_dir"),
        tuple(card["config"]["input_shape"]),
    )
    train = to_float(data.train)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(train_cfg["seed"]))
    n_val = min(train_cfg["val_size"], len(train) // 10)
    recorded = (card.get("dataset") or {}).get("val_images")
    if recorded is not None and recorded != n_val:
        raise ValueError(
            f"rebuilt a validation split of {n_val} images, the card records {recorded}: "
            "the dataset or the split differs from training's"
        )
    return train[perm[:n_val]]


@torch.no_grad()
def dataset_statistics(
    model: VAE, x: torch.Tensor, k: int = anomaly.DEFAULT_K, seed: int = 0, batch_size: int = BATCH_SIZE
) -> dict[str, torch.Tensor]:
    """anomaly.score_statistics over x in batches, each (N,) on the CPU. One generator, seeded once, binarises
    (Bernoulli models) and then samples each batch, as a request with that seed does."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    parts: list[dict[str, torch.Tensor]] = []
    for batch in torch.split(x, batch_size):
        batch = batch.to(torch.float32)
        if model.config.likelihood == "bernoulli":
            batch = binarize(batch, generator)  # a no-op on images already binarised, apart from the draws
        stats = anomaly.score_statistics(model, batch.to(device), k=k, generator=generator)
        parts.append({name: t.float().cpu() for name, t in stats.items()})
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def skip_reason(model: VAE, n_images: int) -> str | None:
    """Why `calibrate` would store nothing for this model and this many held-out images, or None."""
    reason = anomaly.unsupported_reason(model.config)
    if reason is None and n_images < anomaly.MIN_IMAGES:
        reason = f"calibration needs at least {anomaly.MIN_IMAGES} held-out images, got {n_images}"
    return reason


def calibrate(
    model: VAE,
    x: torch.Tensor,
    directory: str | Path,
    *,
    k: int = anomaly.DEFAULT_K,
    seed: int = 0,
    data: str = "validation split",
    log: Callable[[str], object] = print,
) -> dict[str, Any] | None:
    """Score held-out in-distribution images x (grey or already binarised), fit the OOD density, and store it in
    the checkpoint at `directory` (whose weights `model` must be). Returns the card's new `calibration` section,
    or None, after logging why, for a model that has no OOD score (a plain autoencoder) or too few images: training
    calls this at its end and must not fail for it."""
    reason = skip_reason(model, len(x))
    if reason:
        log(f"no calibration: {reason}")
        return None
    card = checkpoint.read_card(directory)
    started = time.time()
    stats = dataset_statistics(model.eval(), x, k=k, seed=seed)
    calibration = anomaly.fit(
        stats,
        k=k,
        binarized=model.config.likelihood == "bernoulli",
        weights_sha256=card["weights"]["sha256"],
        info={"data": data, "seed": seed, "seconds": round(time.time() - started, 1), "created": anomaly.created_now()},
    )
    section = anomaly.save_calibration(calibration, directory)
    q = calibration.reference_scores
    log(
        f"calibrated on {calibration.n} held-out images (k={k}) in {section['seconds']} s: held-out OOD scores "
        f"median {q.median():.2f}, 95th percentile {q.quantile(0.95):.2f}, max {q.max():.2f}"
    )
    return section


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m model.calibrate",
        description="Calibrate a checkpoint's out-of-distribution score on its held-out validation images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--data-root", default=None, help="default: $VAE_DATA_ROOT, else ./data")
    p.add_argument("--image-dir", default=None, help="for checkpoints trained on --dataset folder")
    p.add_argument("--k", type=int, default=anomaly.DEFAULT_K, help="importance samples: /v1/score's default")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out images")
    p.add_argument("--seed", type=int, default=0, help="seed of the binarisation and the importance samples")
    p.add_argument("--threads", type=int, default=None, help="torch threads per op")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        model, card = checkpoint.load(a.checkpoint, a.device)
        if reason := anomaly.unsupported_reason(model.config):
            raise ValueError(reason)
        x = held_out_images(card, a.data_root, a.image_dir)
        if a.limit is not None:
            x = x[: a.limit]
        if reason := skip_reason(model, len(x)):
            raise ValueError(f"{reason} (train with a larger --val-size)")
        data = f"validation split of {card['dataset']['name']} ({len(x)} images{', --limit' if a.limit else ''})"
        calibrate(model, x, a.checkpoint, k=a.k, seed=a.seed, data=data)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
