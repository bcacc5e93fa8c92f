"""Real clients of the binary path against a real server (uvicorn in a thread on a free port, the tiny models):
diffusers' remote_decode / remote_encode (diffusers/utils/remote_utils.py, Hugging Face's remote-VAE client),
unchanged, and VAEClient's numpy methods. Each answer equals the /v1 JSON answer for the same input: float32 within
1e-5, uint8 within 1 (most are exact)."""

from __future__ import annotations

import ast
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import digit_like, files, png, serve_http

from service.client import VAEClient

remote_utils = pytest.importorskip("diffusers.utils.remote_utils")
image_processor = pytest.importorskip("diffusers.image_processor")
remote_decode, remote_encode = remote_utils.remote_decode, remote_utils.remote_encode
TOL = {"rtol": 1e-5, "atol": 1e-5}
LATENTS = [[0.0, 0.0], [1.0, -0.5], [-1.2, 0.3]]


@pytest.fixture(scope="module")
def base_url(settings_for) -> Iterator[str]:
    with serve_http(settings_for()) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def png_pixels(encoded: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in encoded])


def decoded(http: httpx.Client, latents: list[list[float]], model: str = "tiny") -> tuple[np.ndarray, np.ndarray]:
    """/v1/decode's JSON answers: the pixels (N, C, H, W) in [0, 1], and the PNGs' pixels (N, H, W[, C])."""
    body = {"latents": latents, "model": model}
    pixels = np.array(http.post("/v1/decode", json={**body, "encoding": "pixels"}).json()["pixels"], np.float32)
    return pixels, png_pixels(http.post("/v1/decode", json=body).json()["images"])


def encoded(http: httpx.Client, images: np.ndarray, **fields: str) -> dict[str, np.ndarray]:
    """/v1/encode's JSON answer for uint8 images uploaded as PNGs: float32 arrays per field."""
    results = http.post("/v1/encode", files=files(*(png(i) for i in images)), data=fields).json()["results"]
    return {k: np.array([r[k] for r in results], np.float32) for k in results[0]}


# -- diffusers' remote_decode ------------------------------------------------------------------------------------------
def test_remote_decode_pt(base_url: str, http: httpx.Client) -> None:
    pixels, pngs = decoded(http, LATENTS)
    z = torch.tensor(LATENTS)
    endpoint = f"{base_url}/v1/decode"
    floats = remote_decode(endpoint, z, do_scaling=False, output_type="pt", return_type="pt")
    assert floats.dtype == torch.float32 and floats.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(floats.numpy(), pixels * 2 - 1, **TOL)  # diffusers' [-1, 1]
    uint8 = remote_decode(endpoint, z, do_scaling=False, output_type="pt", return_type="pt", partial_postprocess=True)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 8, 8)
    np.testing.assert_array_equal(uint8.numpy(), pngs)
    images = remote_decode(endpoint, z, do_scaling=False, output_type="pt", partial_postprocess=True)  # -> PIL
    assert [image.size for image in images] == [(8, 8)] * 3
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in images]), pngs)
    processor = image_processor.VaeImageProcessor()
    image = remote_decode(endpoint, z[:1], processor=processor, do_scaling=False, output_type="pt")
    assert np.abs(np.asarray(image, np.int16) - pngs[0]).max() <= 1  # postprocessed by diffusers itself


def test_remote_decode_pil(base_url: str, http: httpx.Client) -> None:
    _, pngs = decoded(http, LATENTS[:1])
    z = torch.tensor(LATENTS[:1])
    image = remote_decode(f"{base_url}/v1/decode", z, do_scaling=False, output_type="pil", image_format="png")
    assert image.format == "png" and image.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], pngs[0])  # diffusers converts it to RGB
    image = remote_decode(f"{base_url}/v1/decode", z, do_scaling=False)  # output_type="pil", image_format="jpg"
    assert image.format == "jpeg" and image.size == (8, 8)
    assert np.abs(np.asarray(image, np.int16)[..., 0] - pngs[0]).mean() < 8  # lossy


def test_remote_decode_with_scaling_and_defaults(base_url: str, http: httpx.Client) -> None:
    """scaling_factor and shift_factor as diffusers' pipelines apply them: the model decodes z / s + t; the default
    do_scaling=True (deprecated in diffusers, which warns) scales by the model's own factor, 1 here."""
    pixels, pngs = decoded(http, LATENTS)
    z = torch.tensor(LATENTS)
    endpoint = f"{base_url}/v1/decode"
    scaled = remote_decode(endpoint, (z - 0.1159) * 0.3611, scaling_factor=0.3611, shift_factor=0.1159,
                           output_type="pt", return_type="pt")  # fmt: skip
    np.testing.assert_allclose(scaled.numpy(), pixels * 2 - 1, **TOL)
    with pytest.warns(FutureWarning, match="do_scaling"):
        image = remote_decode(endpoint, z[:1], output_type="pil", image_format="png")
    np.testing.assert_array_equal(np.asarray(image)[..., 0], pngs[0])
    spatial = remote_decode(endpoint, z[:, :, None, None], do_scaling=False, output_type="pt", return_type="pt")
    np.testing.assert_allclose(spatial.numpy(), pixels * 2 - 1, **TOL)  # (N, latent_dim, 1, 1) latents


def test_remote_decode_rgb(base_url: str, http: httpx.Client) -> None:
    pixels, pngs = decoded(http, [[0.0, 0.5, -0.5]], model="tiny-rgb")
    z = torch.tensor([[0.0, 0.5, -0.5]])
    endpoint = f"{base_url}/v1/decode?model=tiny-rgb"
    uint8 = remote_decode(endpoint, z, do_scaling=False, output_type="pt", return_type="pt", partial_postprocess=True)
    assert uint8.shape == (1, 8, 8, 3)
    assert np.abs(uint8.numpy().astype(np.int16) - pngs).max() <= 1
    image = remote_decode(endpoint, z, do_scaling=False, output_type="pt", partial_postprocess=True)
    assert image.mode == "RGB" and np.abs(np.asarray(image, np.int16) - pngs[0]).max() <= 1
    floats = remote_decode(endpoint, z, do_scaling=False, output_type="pt", return_type="pt")
    np.testing.assert_allclose(floats.numpy(), pixels * 2 - 1, **TOL)


def test_remote_decode_errors_come_back(base_url: str) -> None:
    with pytest.raises(RuntimeError, match="latent_dim"):
        remote_decode(
            f"{base_url}/v1/decode", torch.zeros(1, 4, 8, 8), do_scaling=False, output_type="pt", return_type="pt"
        )


# -- diffusers' remote_encode ------------------------------------------------------------------------------------------
def test_remote_encode(base_url: str, http: httpx.Client) -> None:
    images = np.stack([digit_like(i) for i in range(3)])
    expected = encoded(http, images)["mu"]
    endpoint = f"{base_url}/v1/encode"
    x = torch.from_numpy(images[:, None]).float() / 127.5 - 1  # diffusers' [-1, 1] images
    np.testing.assert_allclose(remote_encode(endpoint, x).numpy(), expected, **TOL)
    uint8 = remote_encode(endpoint, torch.from_numpy(images[:, None].copy()))
    np.testing.assert_array_equal(uint8.numpy(), expected)
    one = remote_encode(endpoint, Image.fromarray(images[0]))  # a PIL image goes as a PNG file
    np.testing.assert_array_equal(one.numpy(), expected[:1])
    scaled = remote_encode(endpoint, x, scaling_factor=0.3611, shift_factor=0.1159)
    np.testing.assert_allclose(scaled.numpy(), (expected - 0.1159) * 0.3611, **TOL)
    back = remote_decode(f"{base_url}/v1/decode", scaled, scaling_factor=0.3611, shift_factor=0.1159,
                         output_type="pt", return_type="pt")  # fmt: skip
    pixels, _ = decoded(http, expected.tolist())
    np.testing.assert_allclose(back.numpy(), pixels * 2 - 1, **TOL)


# -- VAEClient's numpy methods -----------------------------------------------------------------------------------------
def test_client_arrays(base_url: str, http: httpx.Client) -> None:
    images = np.stack([digit_like(i) for i in range(3)])
    expected = encoded(http, images, sample="true", seed="7")
    with VAEClient(base_url) as vae:
        posterior = vae.encode_array(images, sample=True, seed=7)
        for key in ("mu", "logvar", "z"):
            np.testing.assert_array_equal(posterior[key], expected[key])
        floats = vae.encode_array(images / 255.0)  # float pixels in [0, 1]
        np.testing.assert_allclose(floats["mu"], expected["mu"], **TOL)
        pixels, pngs = decoded(http, LATENTS)
        np.testing.assert_array_equal(vae.decode_array(LATENTS), pixels[:, 0])  # exact, channels last
        np.testing.assert_array_equal(vae.decode_array(LATENTS, dtype="uint8"), pngs)
        recon = http.post("/v1/reconstruct", files=files(*(png(i) for i in images)), data={"encoding": "pixels"})
        np.testing.assert_array_equal(vae.reconstruct_array(images), np.array(recon.json()["pixels"])[:, 0])
        scores = http.post("/v1/score", files=files(*(png(i) for i in images)), data={"k": "9"}).json()["results"]
        got = vae.score_array(images, k=9)
        for key, values in got.items():
            np.testing.assert_allclose(values, [s[key] for s in scores], rtol=1e-5)
        rgb = np.stack([digit_like(i, channels=3) for i in range(2)])
        expected_rgb = encoded(http, rgb, model="tiny-rgb")
        got_rgb = vae.encode_array(rgb, model="tiny-rgb")
        np.testing.assert_array_equal(got_rgb["mu"], expected_rgb["mu"])
        rgb_pixels, _ = decoded(http, got_rgb["mu"].tolist(), model="tiny-rgb")
        decoded_rgb = vae.decode_array(got_rgb["mu"], model="tiny-rgb")
        assert decoded_rgb.shape == (2, 8, 8, 3)
        np.testing.assert_array_equal(decoded_rgb, rgb_pixels.transpose(0, 2, 3, 1))


def test_diffusers_stays_a_test_dependency() -> None:
    """The service speaks diffusers' convention without importing it (it is in the test extra only)."""
    imported = set()
    for path in (Path(__file__).resolve().parents[2] / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert imported and "diffusers" not in imported
