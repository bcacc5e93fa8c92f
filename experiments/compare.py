"""AE vs VAE: why the VAE is a generative model and the plain autoencoder is not.

`python -m experiments.compare AE_CHECKPOINT VAE_CHECKPOINT --out docs/ae-vs-vae/mnist` writes, for two models
trained on the same data: prior samples decoded by each (the same N(0, I) codes), the test set's latent codes side
by side (coloured by class when the dataset has labels), interpolations between the same test pairs, and
`metrics.json`: reconstruction error, the share of prior samples a check judges plausible, and how far the codes
are from N(0, I).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from model import checkpoint
from model.data import default_data_root, fixed_binarized, load_dataset, to_float
from model.latent import lerp
from model.losses import elbo
from model.metrics import posterior, posterior_means
from model.preprocess import make_grid
from model.vae import VAE

CONFIDENT = 0.9  # a prior sample counts as plausible when the classifier gives one class at least this probability


def gaussian_kl_to_standard(codes: torch.Tensor, posterior_var: torch.Tensor | None = None) -> float:
    """KL(N(m, S) || N(0, I)) for the Gaussian matching the aggregate code distribution: mean m and covariance
    S = Cov(codes) + mean posterior variance (the VAE's q(z|x) is a distribution, the AE's code a point). 0 when the
    codes look like draws from the prior, large when the prior puts its mass where the codes are not."""
    codes = codes.double()
    d = codes.shape[1]
    m = codes.mean(0)
    s = torch.cov(codes.T).reshape(d, d) + 1e-9 * torch.eye(d, dtype=codes.dtype)
    if posterior_var is not None:
        s = s + torch.diag(posterior_var.double().mean(0))
    return float(0.5 * (torch.trace(s) + m @ m - d - torch.logdet(s)))


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """A small MLP digit/garment classifier, the judge of whether a decoded sample looks like a real class member."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_classes = int(y.max()) + 1
    clf = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 256), nn.ReLU(), nn.Linear(256, n_classes))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = nn.functional.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


@torch.no_grad()
def confident_share(clf: nn.Module, images: torch.Tensor) -> float:
    return float((clf(images).softmax(-1).max(-1).values >= CONFIDENT).float().mean())


@torch.no_grad()
def reconstruction_error(model: VAE, x: torch.Tensor) -> float:
    """Mean squared error per pixel between test images and the decoder's mean at the encoder's mean code."""
    x_hat = model.mean_image(model.decode(model.encode(x)[0]))
    return float((x_hat - x).pow(2).mean())


@torch.no_grad()
def vae_plausible_share(vae: VAE, images: torch.Tensor, reference: torch.Tensor, seed: int) -> float:
    """Share of `images` whose ELBO under the VAE is above the 5th percentile of the real test images' ELBOs."""
    g = torch.Generator().manual_seed(seed)
    threshold = torch.quantile(elbo(vae, reference, generator=g).elbo, 0.05)
    return float((elbo(vae, images, generator=g).elbo >= threshold).float().mean())


def panel(ax, images: torch.Tensor, nrow: int, title: str) -> None:
    grid = make_grid(images, nrow=nrow, pad_value=0.5)
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def compare(
    ae: VAE,
    vae: VAE,
    x_test: torch.Tensor,
    labels: torch.Tensor | None,
    classifier: nn.Module | None,
    out: Path,
    n_samples: int = 64,
    n_pairs: int = 6,
    steps: int = 10,
    seed: int = 0,
) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    nrow = int(math.sqrt(n_samples))
    z = torch.randn(n_samples, vae.config.latent_dim, generator=g)
    z_ae = (
        z
        if ae.config.latent_dim == vae.config.latent_dim
        else torch.randn(n_samples, ae.config.latent_dim, generator=g)
    )
    with torch.no_grad():
        samples = {"AE": ae.mean_image(ae.decode(z_ae)), "VAE": vae.mean_image(vae.decode(z))}
        vae_mu, vae_logvar = posterior(vae, x_test)
        codes = {"AE": posterior_means(ae, x_test), "VAE": vae_mu}
        variances = {"AE": None, "VAE": vae_logvar.exp()}

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), dpi=100)
    for ax, name in zip(axes, ("AE", "VAE"), strict=True):
        panel(ax, samples[name], nrow, f"{name}: decoded z ~ N(0, I)")
    fig.tight_layout()
    fig.savefig(out / "prior_samples.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=100)
    for ax, name in zip(axes, ("AE", "VAE"), strict=True):
        c = codes[name]
        if c.shape[1] > 2:  # project onto the codes' own two leading principal directions
            c = (c - c.mean(0)) @ torch.linalg.svd(c - c.mean(0), full_matrices=False).Vh[:2].T
            ax.set_xlabel("principal direction 1")
        colours = {} if labels is None else {"c": labels, "cmap": "tab10"}
        art = ax.scatter(c[:, 0], c[:, 1], s=2, alpha=0.6, **colours)
        circle = plt.Circle((0, 0), 2.0, fill=False, ls="--", color="k", label="N(0, I): 2 std")
        ax.add_patch(circle)
        ax.set_title(f"{name}: test-set codes" + ("" if codes[name].shape[1] == 2 else " (2-D projection)"))
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(loc="upper right", fontsize=8)
    if labels is not None:
        fig.colorbar(art, ax=axes, label="class", fraction=0.03)
    fig.savefig(out / "latent_codes.png", bbox_inches="tight")
    plt.close(fig)

    n_pairs = min(n_pairs, len(x_test) // 2)
    pairs = torch.randperm(len(x_test), generator=g)[: 2 * n_pairs].reshape(n_pairs, 2)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 * n_pairs + 1), dpi=100)
    with torch.no_grad():
        for ax, (name, model) in zip(axes, (("AE", ae), ("VAE", vae)), strict=True):
            frames = []
            for i, j in pairs.tolist():
                mu = model.encode(x_test[[i, j]])[0]
                frames.append(model.mean_image(model.decode(lerp(mu[0], mu[1], steps))))
            panel(ax, torch.cat(frames), steps, f"{name}: straight line between two test codes")
    fig.tight_layout()
    fig.savefig(out / "interpolations.png")
    plt.close(fig)

    metrics: dict = {"n_test": len(x_test), "n_prior_samples": n_samples, "seed": seed}
    for name, model in (("ae", ae), ("vae", vae)):
        metrics[name] = {
            "reconstruction_mse": round(reconstruction_error(model, x_test), 5),
            "codes_kl_to_prior": round(gaussian_kl_to_standard(codes[name.upper()], variances[name.upper()]), 3),
            "code_norm_mean": round(float(codes[name.upper()].norm(dim=1).mean()), 3),
            "prior_norm_mean": round(
                math.sqrt(2)
                * math.exp(math.lgamma((model.config.latent_dim + 1) / 2) - math.lgamma(model.config.latent_dim / 2)),
                3,
            ),
            "vae_plausible_share": round(
                vae_plausible_share(vae, _as_data(vae, samples[name.upper()], g), x_test, seed), 3
            ),
        }
        if classifier is not None:
            metrics[name]["classifier_confident_share"] = round(confident_share(classifier, samples[name.upper()]), 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _as_data(vae: VAE, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Decoded means as the VAE sees data: binarised (fixed seed) for a Bernoulli model."""
    return torch.bernoulli(images, generator=g) if vae.config.likelihood == "bernoulli" else images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ae", help="the plain autoencoder's checkpoint")
    p.add_argument("vae", help="the VAE's checkpoint (same dataset)")
    p.add_argument("--out", required=True, help="folder for the figures and metrics.json")
    p.add_argument("--data-root", default=None, help="default: $VAE_DATA_ROOT, else ./data")
    p.add_argument("--test-images", type=int, default=5000, help="test images used for codes and errors")
    p.add_argument("--samples", type=int, default=64, help="prior samples (a square number)")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        ae, ae_card = checkpoint.load(a.ae)
        vae, vae_card = checkpoint.load(a.vae)
    except checkpoint.CheckpointError as e:
        p.exit(2, f"error: {e}\n")
    if ae.config.kind != "ae" or vae.config.kind != "vae":
        p.exit(2, f"error: expected an AE then a VAE checkpoint, got {ae.config.kind} and {vae.config.kind}\n")
    if ae_card["dataset"]["name"] != vae_card["dataset"]["name"] or ae.config.input_shape != vae.config.input_shape:
        p.exit(2, "error: the two checkpoints were trained on different data\n")
    image_dir = vae_card["training"]["config"].get("image_dir")
    data = load_dataset(
        vae_card["dataset"]["name"], a.data_root or default_data_root(), image_dir, vae.config.input_shape
    )
    grey = to_float(data.test)[: a.test_images]
    labels = None if data.test_labels is None else data.test_labels[: a.test_images]
    x_test = fixed_binarized(grey) if vae.config.likelihood == "bernoulli" else grey
    classifier = None
    if data.train_labels is not None:
        classifier = train_classifier(to_float(data.train), data.train_labels, a.classifier_epochs, a.seed)
    metrics = compare(ae, vae, x_test, labels, classifier, Path(a.out), a.samples, seed=a.seed)
    if classifier is not None:  # the judge's own rate on real test images, as the reference for the samples
        metrics["test_images_classifier_confident_share"] = round(confident_share(classifier, grey), 3)
        (Path(a.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    json.dump(metrics, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
