"""Property tests of the two parsers that take untrusted input: image bytes (service.media + the predictor's
conversion) and latent vectors (the JSON schema + VAEPredictor.latents_tensor). Whatever comes in, the outcome is a
valid tensor or one of the documented errors, never another exception."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.preprocess import pil_to_tensor
from service import media
from service.decoding import validate
from service.errors import ImageTooLarge, InvalidInput, InvalidPayload
from service.predictor import VAEPredictor
from service.schemas import DecodeRequest

MAX_PIXELS = 64 * 64
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def predictors(tiny_checkpoint: Path, tiny_gaussian_checkpoint: Path) -> list[VAEPredictor]:
    """The 8x8 grey Bernoulli model and the 8x8 RGB Gaussian one."""
    cpu = torch.device("cpu")
    return [VAEPredictor.load(path.name, path, cpu) for path in (tiny_checkpoint, tiny_gaussian_checkpoint)]


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (12, 10), dtype=np.uint8), rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    return [
        encoded(Image.fromarray(grey), "PNG"),
        encoded(Image.fromarray(rgb), "JPEG"),
        encoded(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        encoded(Image.fromarray(grey).convert("P"), "PNG"),
        encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
    ]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid PNG or JPEG with a few bytes flipped, cut short, or spliced in."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(damaged_images(), st.binary(max_size=512), st.sampled_from(seeds())))
def test_any_bytes_give_an_image_tensor_or_a_documented_error(predictors, data: bytes) -> None:
    for p in predictors:
        try:
            image = media.open_image(data, MAX_PIXELS)
            x = p.image_tensor(image)
        except (InvalidPayload, ImageTooLarge) as e:
            assert e.status in (400, 413) and e.detail
            continue
        assert x.shape == p.input_shape and x.dtype == torch.float32
        assert bool(torch.isfinite(x).all()) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=64))
def test_16_bit_grey_scales_to_the_nearest_8_bit_level(values: list[int]) -> None:
    """round(v / 257): 0 -> 0, 65535 -> 255, every level reachable, no clipping at 255 (PIL's own convert clips)."""
    wide = np.array(values, dtype=np.uint16).reshape(1, -1)
    x = pil_to_tensor(Image.fromarray(wide), (1, 1, wide.shape[1]))
    expected = np.round(wide.astype(np.float64) / 257.0) / 255.0
    np.testing.assert_array_equal(x.numpy()[0], expected.astype(np.float32))


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-4e38, max_value=4e38),  # around float32's limit, finite as float64
    st.integers(-(10**40), 10**40),
)


def fits_float32(v: float) -> bool:
    """Finite once rounded to float32 (struct rounds as C does, and refuses what rounds to infinity)."""
    try:
        return math.isfinite(float(v)) and bool(struct.pack("<f", float(v)))
    except OverflowError:
        return False


rows = st.lists(st.lists(numbers, min_size=0, max_size=4), min_size=0, max_size=5)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_latents_parse_to_a_finite_tensor_or_a_documented_error(predictors, latents: list[list[float]]) -> None:
    p = predictors[0]  # latent_dim 2
    body = json.dumps({"latents": latents}, allow_nan=True).encode()
    valid = (
        len(latents) >= 1
        and all(len(row) == p.latent_dim for row in latents)
        and all(fits_float32(v) for row in latents for v in row)
    )
    try:
        z = p.latents_tensor(validate(DecodeRequest, body).latents)
    except (RequestValidationError, InvalidInput):
        assert not valid
        return
    assert valid
    assert z.shape == (len(latents), p.latent_dim) and z.dtype == torch.float32
    assert torch.equal(z, torch.tensor([[float(v) for v in row] for row in latents], dtype=torch.float32))
    assert float(z.abs().max()) <= FLOAT32_MAX
