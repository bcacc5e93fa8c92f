"""Tiny seeded checkpoints made by the real training module on synthetic images, in seconds: for the fixtures in
tests/conftest.py and for tests that train their own (imported by this module's unique name, since every test folder
has a conftest.py of its own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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
    n_images: int = 64,
) -> Path:
    """Train a tiny model for two epochs through `python -m model.train`'s own code path (flags in `extra` override
    the defaults below); returns its directory."""
    from model.train import main

    h, w = (int(v) for v in size.split("x"))
    images = write_synthetic_images(root / f"{name}-images", n=n_images, size=(h, w), channels=channels)
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
