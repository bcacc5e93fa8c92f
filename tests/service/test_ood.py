"""/v1/score as an out-of-distribution score: on the MNIST model, Fashion-MNIST images score far lower than MNIST
digits. Needs the shipped checkpoint (checkpoints/mnist, or $VAE_MNIST_CHECKPOINT) and ../shared/data."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from service_helpers import files, png, serve

from service.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def mnist_checkpoint() -> Path:
    path = Path(os.environ.get("VAE_MNIST_CHECKPOINT", REPO / "checkpoints" / "mnist"))
    if not (path / "model_card.json").is_file() or not (path / "weights.safetensors").is_file():
        pytest.skip(f"no MNIST checkpoint at {path} (train it with checkpoints/train.sh or set VAE_MNIST_CHECKPOINT)")
    return path


def idx_images(path: Path, n: int) -> np.ndarray:
    """The first n images of a gzipped IDX file -> uint8 (n, 28, 28)."""
    with gzip.open(path, "rb") as f:
        data = f.read(16 + n * 28 * 28)
    assert int.from_bytes(data[:4], "big") == 2051
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(n, 28, 28)


async def test_fashion_mnist_scores_far_lower_than_mnist_on_the_mnist_model(shared_data: Path) -> None:
    ckpt = mnist_checkpoint()
    settings = Settings(models_dir=ckpt.parent, models=[str(ckpt)], default_model=ckpt.name, cpu_threads=1, grpc=False)
    digits = idx_images(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", 16)
    clothes = idx_images(shared_data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 16)
    async with serve(settings) as (_, client):
        scores = {}
        for name, images in (("mnist", digits), ("fashion", clothes)):
            r = await client.post("/v1/score", files=files(*map(png, images)), data={"k": "100"})
            assert r.status_code == 200, r.text
            scores[name] = np.array([s["log_likelihood"] for s in r.json()["results"]])
    mnist, fashion = scores["mnist"], scores["fashion"]
    # Far lower: hundreds of nats on average, and the typical clothing item below nearly every digit.
    assert fashion.mean() < mnist.mean() - 100, (mnist.mean(), fashion.mean())
    assert np.median(fashion) < np.percentile(mnist, 5), (mnist, fashion)


async def test_the_calibrated_score_flags_digits_on_the_fashion_model(shared_data: Path) -> None:
    """The hard case raw likelihood gets backwards (Nalisnick et al. 2019): the Fashion-MNIST model gives MNIST digits
    high likelihood, but its calibrated ood_score flags them, and passes most of its own test items."""
    ckpt = REPO / "checkpoints" / "fashion-mnist"
    if not (ckpt / "calibration.safetensors").is_file():
        pytest.skip(f"{ckpt} has no calibration")
    settings = Settings(models=[str(ckpt)], default_model=ckpt.name, cpu_threads=1)
    digits = idx_images(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", 32)
    clothes = idx_images(shared_data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 32)
    async with serve(settings) as (_, client):
        flagged = {}
        for name, images in (("digits", digits), ("clothes", clothes)):
            r = await client.post("/v1/score", files=files(*map(png, images)))
            assert r.status_code == 200 and r.json()["calibrated"] is True, r.text
            flagged[name] = np.mean([s["is_anomaly"] for s in r.json()["results"]])
    assert flagged["digits"] >= 0.8 and flagged["clothes"] <= 0.2, flagged
