"""Shared fixtures: tiny seeded checkpoints made by the real training module on synthetic images, in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from tiny_models import make_tiny_checkpoint

# Property tests explore the same examples on every run: the suite is deterministic, like every other test here.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only waits for a busy core (seconds, on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
