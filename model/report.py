"""What a person looks at after training: metrics CSV, loss curve, sample grid, reconstructions, 2-D manifold."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from model.latent import manifold_grid
from model.preprocess import make_grid, tensor_to_pil
from model.vae import VAE

METRICS_CSV = "metrics.csv"


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_png(images: torch.Tensor, path: Path, nrow: int, scale: int = 2) -> None:
    """(N, C, H, W) in [0, 1] -> one PNG grid, upscaled with nearest neighbour so small digits are visible."""
    img = tensor_to_pil(make_grid(images, nrow=nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=0)
    img.save(path)


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("train_elbo", "train ELBO"), ("val_elbo", "validation ELBO"), ("test_elbo", "test ELBO")):
        ax.plot(epochs, [r[key] for r in rows], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per example)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def write_figures(model: VAE, out: Path, x_test: torch.Tensor, seed: int = 0) -> None:
    """samples.png (64 prior samples), reconstructions.png (originals over reconstructions), manifold.png (2-D)."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    save_png(model.sample(64, generator=g).cpu(), out / "samples.png", nrow=8)
    originals = x_test[:32].to(device)
    recon = model.mean_image(model.decode(model.encode(originals)[0])).cpu()
    rows = torch.cat([originals.cpu()[:16], recon[:16], originals.cpu()[16:], recon[16:]])
    save_png(rows, out / "reconstructions.png", nrow=16)
    if model.config.latent_dim == 2:
        z = manifold_grid(20, torch.zeros(2), torch.eye(2), torch.full((2,), 1.645))
        save_png(model.mean_image(model.decode(z.to(device))).cpu(), out / "manifold.png", nrow=20, scale=1)
