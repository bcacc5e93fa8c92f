"""Hostile uploads: each gets its documented status with the one JSON error body, or, for odd but valid images,
the same answer as the image converted the way training converts it; and memory stays bounded. (Random, empty,
truncated-PNG, static-GIF and header-only bombs: test_errors.py. Peak RSS of a real server per case:
bench/hostile.py.)"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import assert_error, files, png, serve

from bench import memory
from bench.hostile import animated, flipped, jpeg_claiming, noise
from model.preprocess import pil_to_tensor
from service import predictor

pytestmark = pytest.mark.anyio
CAP_PIXELS, CAP_BYTES = 100 * 100, 256 * 1024


def zeros_png(width: int, height: int) -> bytes:
    """A real, decodable grey PNG of zeros, streamed row by row: a few KB that decode to width * height bytes."""
    deflate = zlib.compressobj(9)
    row = bytes(width + 1)  # filter type 0, then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
async def capped(settings_for):
    """A server with small caps, so that over-the-cap cases stay small: 100x100 pixels, 256 KiB bodies."""
    async with serve(settings_for(max_image_pixels=CAP_PIXELS, max_request_bytes=CAP_BYTES)) as (_, client):
        yield client


PNG64 = png(noise(64, 64))
JPEG64 = png(Image.fromarray(noise(64, 64)), "JPEG")


@pytest.mark.parametrize(
    ("data", "status", "code", "fragment"),
    [
        (np.random.default_rng(1).bytes(64 * 1024), 400, "invalid_payload", "not a PNG or JPEG"),
        (flipped(PNG64, len(PNG64) // 2), 400, "invalid_payload", "cannot be decoded"),
        (JPEG64[: len(JPEG64) // 2], 400, "invalid_payload", "truncated"),
        (JPEG64[:2] + bytes(38) + JPEG64[40:], 400, "invalid_payload", "not a PNG or JPEG"),
        (animated("GIF"), 400, "invalid_payload", "not a PNG or JPEG"),
        (png(Image.fromarray(noise(28, 28)), "WEBP"), 400, "invalid_payload", "not a PNG or JPEG"),
        (png(Image.fromarray(noise(28, 28)), "TIFF"), 400, "invalid_payload", "not a PNG or JPEG"),
        (zeros_png(1000, 1000), 413, "image_too_large", "1000x1000 = 1000000 pixels"),  # 100x the cap, 2 KB
        (jpeg_claiming(65_000, 65_000), 413, "image_too_large", "too large"),
        (zeros_png(CAP_PIXELS + 1, 1), 413, "image_too_large", f"{CAP_PIXELS + 1}x1"),
    ],
    ids=[
        "random-bytes",
        "corrupt-png",
        "truncated-jpeg",
        "corrupt-jpeg-header",
        "animated-gif",
        "webp",
        "tiff",
        "zip-bomb-png",
        "bomb-jpeg-header",
        "one-pixel-over",
    ],
)
async def test_hostile_image_gets_its_documented_4xx(capped, data: bytes, status: int, code: str, fragment: str):
    body = assert_error(await capped.post("/v1/encode", files=files(data)), status, code, fragment)
    assert "Traceback" not in body["detail"]


def mode_16_bit() -> Image.Image:
    return Image.fromarray((np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64))


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(noise(30, 30)).convert("P")
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "data",
    [
        png(Image.new("L", (1, 1), 200)),
        png(Image.fromarray(noise(1, CAP_PIXELS))),  # 10000 pixels wide: exactly at the cap
        png(Image.fromarray(noise(CAP_PIXELS, 1))),
        png(mode_16_bit()),
        png(palette_with_transparency(), transparency=0),
        png(Image.new("CMYK", (40, 20), (10, 200, 30, 5)), "JPEG"),
        png(Image.fromarray(np.dstack([noise(20, 20), noise(20, 20, 1)]), "LA")),
        animated("PNG"),  # APNG: the first frame
        flipped(JPEG64, len(JPEG64) // 2),  # damaged scan data: libjpeg decodes it, as browsers do
    ],
    ids=["1x1", "10000x1", "1x10000", "16-bit", "palette", "cmyk-jpeg", "grey-alpha", "apng", "jpeg-scan-garbage"],
)
async def test_odd_but_valid_images_are_converted_as_training_did(capped, tiny_model, data: bytes) -> None:
    r = await capped.post("/v1/encode", files=files(data))
    assert r.status_code == 200, r.text
    x = pil_to_tensor(Image.open(io.BytesIO(data)), (1, 8, 8))[None]
    mu = tiny_model.encode(x)[0]
    torch.testing.assert_close(torch.tensor(r.json()["results"][0]["mu"]), mu[0], atol=1e-5, rtol=1e-5)


async def test_a_body_trickled_past_the_deadline_is_a_408(settings_for) -> None:
    """Under the byte cap but too slow: 408 once body_timeout_s has passed, with the connection closed, and the
    server serves on. The same small body sent at once is answered."""
    trickled = 0

    async def trickle():
        nonlocal trickled
        for _ in range(1000):
            trickled += 1
            yield b"\0" * 16
            await asyncio.sleep(0.01)

    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    async with serve(settings_for(body_timeout_s=0.2)) as (_, client):
        r = await client.post("/v1/encode", content=trickle(), headers=headers)
        assert_error(r, 408, "body_timeout", "0.2 s")
        assert r.headers["connection"] == "close"
        assert trickled < 100  # refused at the deadline, not after the client finished
        ok = await client.post("/v1/encode", files=files(png(noise(8, 8))))
        assert ok.status_code == 200, ok.text


async def test_an_upload_over_the_byte_cap_sent_slowly(capped) -> None:
    """No Content-Length, 4 KiB pieces 1 ms apart: refused once the cap is crossed, without reading the rest."""
    sent = []

    async def trickle():
        for _ in range(4 * CAP_BYTES // 4096):
            sent.append(4096)
            yield b"\0" * 4096
            await asyncio.sleep(0.001)

    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    assert_error(await capped.post("/v1/encode", content=trickle(), headers=headers), 413, "payload_too_large")
    assert CAP_BYTES < sum(sent) <= CAP_BYTES + 2 * 4096


async def test_hostile_json_and_multipart_bodies(capped) -> None:
    deep = b'{"pixels": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = await capped.post("/v1/encode", content=deep, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request")
    # More numbers than any valid request has: refused before parsing (parsed, they would take ~50x their bytes).
    many = b'{"latents": [' + b"[0,0]," * 40_000 + b"[0,0]]}"
    r = await capped.post("/v1/decode", content=many, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_input", "more values")
    r = await capped.post("/v1/encode", json={"pixels": [[0.5] * 30_000]})
    assert_error(r, 422, "invalid_input", "more values")
    parts = [("image", (f"{i}", b"", "image/png")) for i in range(1000)]
    assert_error(await capped.post("/v1/encode", files=parts), 422, "invalid_input", "too many")


async def test_a_real_decompression_bomb_costs_no_memory(client) -> None:
    """8192x8192 zeros (64 Mpx, 4 times the default cap) in a 64 KB PNG: refused from its header, never decoded."""
    bomb = zeros_png(8192, 8192)
    if not memory.reset_peak(os.getpid()):  # peak RSS := RSS now (Linux)
        pytest.skip("cannot reset this process's peak RSS")
    before = memory.peak_mb(os.getpid())
    assert_error(await client.post("/v1/encode", files=files(bomb)), 413, "image_too_large", "8192x8192")
    assert memory.peak_mb(os.getpid()) - before < 32  # decoding it would take 64 MiB


async def test_large_images_are_converted_two_at_a_time(served, monkeypatch) -> None:
    """Each large upload can take hundreds of MB while it converts: concurrent ones wait for their turn."""
    _, client = served
    lock, running, most = threading.Lock(), [0], [0]
    real = predictor.preprocess.pil_to_tensor

    def counting(image: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(image, shape)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(predictor.preprocess, "pil_to_tensor", counting)
    big = zeros_png(1100, 1000)  # 1.1 Mpx: over LARGE_IMAGE_PIXELS, a 2 KB file
    answers = await asyncio.gather(*(client.post("/v1/encode", files=files(big)) for _ in range(5)))
    assert [r.status_code for r in answers] == [200] * 5
    assert most[0] == predictor.LARGE_DECODES._initial_value == 2
