"""Shared fixtures: tiny seeded checkpoints made by the real training module on synthetic images, in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

# Property tests explore the same examples on every run: the suite is deterministic, like every other test here.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_synthetic_images(
    directory: Path, n: int = 64, size: tuple[int, int] = (8, 8), channels: int = 1, seed: int = 0
) -> Path:
    """n PNGs of bright rectangles on black: structured enough for a tiny VAE to learn something."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        img = np.zeros((h, w, channels), dtype=np.uint8)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[top : top + h // 2, left : left + w // 2] = rng.integers(150, 256, size=channels)
        Image.fromarray(img[:, :, 0] if channels == 1 else img).save(directory / f"{i:03d}.png")
    return directory


def make_tiny_checkpoint(
    root: Path,
    name: str = "tiny",
    *extra: str,
    channels: int = 1,
    size: str = "8x8",
    likelihood: str = "bernoulli",
    latent_dim: int = 2,
) -> Path:
    """Train a tiny model for two epochs through `python -m model.train`'s own code path; returns its directory."""
    from model.train import main

    h, w = (int(v) for v in size.split("x"))
    images = write_synthetic_images(root / f"{name}-images", size=(h, w), channels=channels)
    out = root / name
    main(
        [
            "--dataset",
            "folder",
            "--image-dir",
            str(images),
            "--image-size",
            size,
            "--channels",
            str(channels),
            "--hidden",
            "16",
            "--latent-dim",
            str(latent_dim),
            "--likelihood",
            likelihood,
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--eval-k",
            "8",
            "--seed",
            "0",
            "--no-progress",
            "--name",
            name,
            "--out",
            str(out),
            *extra,
        ]
    )
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-D latent Bernoulli MLP VAE on 8x8 grayscale images."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny")


@pytest.fixture(scope="session")
def tiny_gaussian_checkpoint(tmp_path_factory) -> Path:
    """A conv VAE with a Gaussian decoder on 8x8 RGB images, latent 3."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt"),
        "tiny-rgb",
        "--encoder",
        "conv",
        "--decoder",
        "conv",
        "--conv-channels",
        "4",
        "8",
        channels=3,
        likelihood="gaussian",
        latent_dim=3,
    )


@pytest.fixture(scope="session")
def tiny_ae_checkpoint(tmp_path_factory) -> Path:
    """A plain autoencoder (kind "ae") of the same images and size as `tiny_checkpoint`."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny-ae", "--model", "ae")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA
