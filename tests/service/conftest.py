"""Service fixtures: a models directory holding the tiny checkpoints, and the app served in-process (lifespan on); a
second set of weights and a models directory with versions, for the tests of changes at run time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from lifecycle_helpers import put_version
from service_helpers import copy_checkpoint, serve

from model import checkpoint
from model.preprocess import input_spec
from model.vae import VAE, VAEConfig
from service.settings import Settings

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def make_ae_checkpoint(directory: Path) -> Path:
    """A plain autoencoder (kind 'ae'), untrained: enough to check the VAE-only verbs refuse it."""
    torch.manual_seed(0)
    config = VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,), kind="ae")
    card = {"name": "tiny-ae", "input": input_spec(config.input_shape, binarized=True)}
    checkpoint.save(VAE(config), card, directory)
    return directory


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_gaussian_checkpoint: Path) -> Path:
    """checkpoints/ with `tiny` (2-D Bernoulli MLP, 8x8 grey), `tiny-rgb` (conv Gaussian, 8x8 RGB, latent 3) and
    `tiny-ae` (plain autoencoder)."""
    root = tmp_path_factory.mktemp("models")
    (root / "tiny").symlink_to(tiny_checkpoint, target_is_directory=True)
    (root / "tiny-rgb").symlink_to(tiny_gaussian_checkpoint, target_is_directory=True)
    make_ae_checkpoint(root / "tiny-ae")
    (root / "not-a-checkpoint").mkdir()  # ignored: no model card
    return root


def build_settings(root: Path, **overrides: Any) -> Settings:
    """In-process apps start no gRPC service unless a test asks for one (`grpc=True, grpc_port=0`)."""
    values: dict[str, Any] = {"models_dir": root, "default_model": "tiny", "cpu_threads": 1, "grpc": False}
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="session")
def settings_for(models_dir: Path):
    """Settings over the tiny models dir; overrides as keyword arguments."""
    return lambda **overrides: build_settings(models_dir, **overrides)


@pytest.fixture
async def served(settings_for) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app of its own, for tests that patch it or count its metrics."""
    async with serve(settings_for()) as pair:
        yield pair


@pytest.fixture(scope="module")
async def client(settings_for) -> AsyncIterator[httpx.AsyncClient]:
    """A client of one app shared by a test module (read-only use: no patching, no metric counts)."""
    async with serve(settings_for()) as (_, shared):
        yield shared


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> VAE:
    return checkpoint.load(tiny_checkpoint)[0]


@pytest.fixture(scope="session")
def rgb_model(tiny_gaussian_checkpoint: Path) -> VAE:
    return checkpoint.load(tiny_gaussian_checkpoint)[0]


# -- model versions (tests/service/test_model_versions.py, test_v2_lifecycle.py) ------------------------------------
@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny model's architecture with other weights: a second version whose answers differ from the first's."""
    model, card = checkpoint.load(tiny_checkpoint)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    directory = tmp_path_factory.mktemp("other") / "tiny-b"
    checkpoint.save(model, card, directory)
    return directory


@pytest.fixture(scope="session")
def weights(tiny_checkpoint: Path, other_checkpoint: Path) -> dict[str, Path]:
    return {"a": tiny_checkpoint, "b": other_checkpoint}


@pytest.fixture(scope="session")
def oracles(weights: dict[str, Path]) -> dict[str, VAE]:
    return {key: checkpoint.load(path)[0] for key, path in weights.items()}


@pytest.fixture(scope="session")
def ae_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's shapes as a plain autoencoder: a version with no likelihood, so no v2 scorer."""
    return make_ae_checkpoint(tmp_path_factory.mktemp("ae") / "tiny-ae")


@pytest.fixture
def root(tmp_path: Path, weights: dict[str, Path]) -> Path:
    """models/ with `tiny` (flat: one version, "1") and `swap` (versions 1: weights a, 2: weights b)."""
    models = tmp_path / "models"
    models.mkdir()
    copy_checkpoint(weights["a"], models / "tiny")
    put_version(models / "swap", "1", weights["a"])
    put_version(models / "swap", "2", weights["b"])
    return models
