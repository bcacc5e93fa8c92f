"""Raw tensor bodies and answers on /v1 (Hugging Face's remote-VAE convention, docs/binary-tensors.md), in-process
against the tiny models: each answer equals the /v1 JSON answer for the same input, and every bad input gets a
4xx naming what was expected against what came."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from service_helpers import assert_error, digit_like, files, png, serve

from service.decoding import read_tensor, wire_images, wire_latents
from service.errors import InvalidInput, InvalidPayload
from service.predictor import VAEPredictor
from service.schemas import DecodeTensorQuery

pytestmark = pytest.mark.anyio
TENSOR = {"Accept": "application/octet-stream"}
AS_JSON = {"Accept": "application/json"}


def raw(array: np.ndarray, dtype: str | None = None, headers: dict[str, str] | None = None, **params: Any) -> dict:
    """client.post keyword arguments for a raw tensor body: the bytes, `shape` and `dtype` in the query string."""
    query = {"shape": ",".join(str(n) for n in array.shape), "dtype": dtype or str(array.dtype), **params}
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()}
    return {
        "content": array.tobytes(),
        "params": query,
        "headers": {"Content-Type": "application/octet-stream", **(headers or {})},
    }


def bfloat16_bytes(array: np.ndarray) -> np.ndarray:
    """float32 -> its bfloat16 bits (round to nearest even, as torch does), as uint16."""
    return torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def tensor_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    dtype = {"float32": "<f4", "uint8": "u1"}[response.headers["dtype"]]
    return np.frombuffer(response.content, dtype).reshape(json.loads(response.headers["shape"]))


def digits(n: int = 3, channels: int = 1) -> np.ndarray:
    """n uint8 images (N, H, W) or (N, H, W, C)."""
    return np.stack([digit_like(i, channels=channels) for i in range(n)])


def nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def tiny_predictor(tiny_checkpoint) -> VAEPredictor:
    return VAEPredictor.load("tiny", tiny_checkpoint, torch.device("cpu"))


# -- answers equal the JSON answers ------------------------------------------------------------------------------------
async def test_encode_a_uint8_tensor_as_the_png_uploads(client) -> None:
    images = digits()
    expected = (await client.post("/v1/encode", files=files(*(png(i) for i in images)))).json()
    as_json = await client.post("/v1/encode", **raw(nchw(images), headers=AS_JSON))
    assert as_json.json() == expected  # the same inputs, bit for bit
    mu = tensor_of(await client.post("/v1/encode", **raw(nchw(images))))  # no Accept: answered in kind
    assert mu.dtype == np.float32 and mu.shape == (3, 2)
    np.testing.assert_array_equal(mu, np.array([r["mu"] for r in expected["results"]], np.float32))
    r = await client.post("/v1/encode", **raw(nchw(images), posterior=True))
    assert json.loads(r.headers["fields"]) == ["mu", "logvar"]
    posterior = tensor_of(r)
    assert posterior.shape == (3, 2, 2)
    np.testing.assert_array_equal(posterior[:, 1], np.array([r["logvar"] for r in expected["results"]], np.float32))


async def test_a_sampled_latent_and_its_seed(client) -> None:
    images = nchw(digits(2))
    expected = (await client.post("/v1/encode", **raw(images, headers=AS_JSON, sample=True, seed=3))).json()
    r = await client.post("/v1/encode", **raw(images, sample=True, seed=3))
    assert r.headers["seed"] == "3"
    np.testing.assert_array_equal(tensor_of(r), np.array([x["z"] for x in expected["results"]], np.float32))
    r = await client.post("/v1/encode", **raw(images, sample=True))
    seed = int(r.headers["seed"])  # a fresh one, said so the sample can be drawn again
    again = await client.post("/v1/encode", **raw(images, sample=True, seed=seed))
    np.testing.assert_array_equal(tensor_of(r), tensor_of(again))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
async def test_float_images_are_in_minus_one_to_one(client, dtype: str) -> None:
    """diffusers' convention: a float image x in [-1, 1] is the service's (x + 1) / 2."""
    pixels = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    wire = pixels * 2 - 1
    if dtype == "float16":
        wire = wire.astype(np.float16)
    sent = (wire.astype(np.float32) + 1) / 2 if dtype != "bfloat16" else None
    body = bfloat16_bytes(wire) if dtype == "bfloat16" else wire
    if sent is None:  # what the bfloat16 bits say
        sent = (torch.from_numpy(body.view(np.int16)).view(torch.bfloat16).float().numpy() + 1) / 2
    expected = (await client.post("/v1/encode", json={"pixels": sent.tolist()})).json()
    got = tensor_of(await client.post("/v1/encode", **raw(body, dtype=dtype)))
    np.testing.assert_allclose(got, [r["mu"] for r in expected["results"]], rtol=1e-5, atol=1e-5)


async def test_decode_answers_each_image_convention(client) -> None:
    z = np.array([[0.0, 0.0], [1.0, -0.5], [-1.2, 0.3]], np.float32)
    pixels = np.array(
        (await client.post("/v1/decode", json={"latents": z.tolist(), "encoding": "pixels"})).json()["pixels"]
    )
    pngs = (await client.post("/v1/decode", json={"latents": z.tolist()})).json()["images"]
    png_pixels = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in pngs])

    floats = tensor_of(await client.post("/v1/decode", **raw(z)))  # output_type=pt: diffusers' [-1, 1]
    assert floats.shape == (3, 1, 8, 8) and floats.dtype == np.float32
    np.testing.assert_allclose(floats, pixels * 2 - 1, atol=1e-6)
    uint8 = tensor_of(await client.post("/v1/decode", **raw(z, partial_postprocess=True)))
    assert uint8.shape == (3, 8, 8) and uint8.dtype == np.uint8  # one channel: (N, H, W), as PIL holds it
    np.testing.assert_array_equal(uint8, png_pixels)  # the PNGs' pixels, exactly
    unit = tensor_of(await client.post("/v1/decode", **raw(z, output_type="pil", headers=TENSOR)))
    np.testing.assert_array_equal(unit, pixels.astype(np.float32))  # [0, 1], as the JSON pixels
    spatial = tensor_of(await client.post("/v1/decode", **raw(z.reshape(3, 2, 1, 1))))  # (N, latent_dim, 1, 1)
    np.testing.assert_array_equal(spatial, floats)

    one = z[:1]
    r = await client.post("/v1/decode", **raw(one, output_type="pil"))  # no Accept: an image, as image_format says
    assert r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), png_pixels[0])
    r = await client.post("/v1/decode", **raw(one, output_type="pil", image_format="jpg"))
    assert r.headers["content-type"] == "image/jpeg"
    jpeg = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.int16)
    assert jpeg.shape == (8, 8) and np.abs(jpeg - png_pixels[0]).mean() < 8  # lossy, but the same image
    r = await client.post("/v1/decode", **raw(one, headers={"Accept": "image/jpeg"}))
    assert r.headers["content-type"] == "image/jpeg"


async def test_rgb_images_go_out_channels_last_with_partial_postprocess(client) -> None:
    z = np.zeros((2, 3), np.float32)
    pixels = np.array(
        (await client.post("/v1/decode?model=tiny-rgb", json={"latents": z.tolist(), "encoding": "pixels"})).json()[
            "pixels"
        ]
    )
    uint8 = tensor_of(await client.post("/v1/decode", **raw(z, model="tiny-rgb", partial_postprocess=True)))
    assert uint8.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(uint8, np.round(np.clip(pixels, 0, 1) * 255).transpose(0, 2, 3, 1), atol=1)
    images = digits(2, channels=3)
    expected = (await client.post("/v1/encode?model=tiny-rgb", files=files(*(png(i) for i in images)))).json()
    mu = tensor_of(await client.post("/v1/encode", **raw(nchw(images), model="tiny-rgb")))
    np.testing.assert_array_equal(mu, np.array([r["mu"] for r in expected["results"]], np.float32))


async def test_latent_scaling_as_diffusers_pipelines_do_it(client) -> None:
    """decode: the model decodes latents / scaling_factor + shift_factor; encode: (latent - shift) * scaling."""
    z = np.array([[0.5, -0.25], [1.0, 2.0]], np.float32)
    scaled = ((z - np.float32(0.5)) * np.float32(2.0)).astype(np.float32)
    plain = tensor_of(await client.post("/v1/decode", **raw(z)))
    got = tensor_of(await client.post("/v1/decode", **raw(scaled, scaling_factor=2.0, shift_factor=0.5)))
    np.testing.assert_allclose(got, plain, atol=1e-6)
    noop = tensor_of(await client.post("/v1/decode", **raw(z, do_scaling=True)))  # the model's own factor is 1
    np.testing.assert_array_equal(noop, plain)
    images = nchw(digits(2))
    mu = tensor_of(await client.post("/v1/encode", **raw(images)))
    got = tensor_of(await client.post("/v1/encode", **raw(images, scaling_factor=2.0, shift_factor=0.5)))
    np.testing.assert_allclose(got, (mu - 0.5) * 2.0, atol=1e-6)


async def test_reconstruct_and_score_take_tensors(client) -> None:
    images = digits(2)
    uploads = files(*(png(i) for i in images))
    for endpoint, options in (("/v1/reconstruct", {"seed": "4"}), ("/v1/score", {"k": "7", "seed": "4"})):
        expected = (await client.post(endpoint, files=uploads, data=options)).json()
        got = (await client.post(endpoint, **raw(nchw(images), headers=AS_JSON, **options))).json()
        assert got == expected
    r = await client.post("/v1/score", **raw(nchw(images), k=7, seed=4))
    columns = json.loads(r.headers["fields"])
    # tiny is uncalibrated: no ood_score, p_value, is_anomaly columns (tests/service/test_ood_score.py)
    assert columns == ["elbo", "recon", "kl", "elbo_bits_per_dim", "log_likelihood", "bits_per_dim", "complexity_bits"]
    table = tensor_of(r)
    for i, name in enumerate(columns):
        np.testing.assert_allclose(table[:, i], [x[name] for x in expected["results"]], rtol=1e-5)
    recon = (await client.post("/v1/reconstruct", files=uploads, data={"encoding": "pixels"})).json()["pixels"]
    got = tensor_of(await client.post("/v1/reconstruct", **raw(nchw(images), output_type="pil", headers=TENSOR)))
    np.testing.assert_array_equal(got, np.array(recon, np.float32))


async def test_one_image_file_as_the_body(client) -> None:
    """diffusers' remote_encode sends a PIL image as PNG bytes, with no Content-Type and no shape."""
    data = png(digit_like(0))
    expected = (await client.post("/v1/encode", files=files(data))).json()["results"][0]["mu"]
    r = await client.post("/v1/encode", content=data)
    np.testing.assert_array_equal(tensor_of(r), np.array([expected], np.float32))
    r = await client.post("/v1/encode", content=data, headers={"Content-Type": "image/png", **AS_JSON})
    assert r.json()["results"][0]["mu"] == expected
    r = await client.post("/v1/encode", content=png(np.zeros((12, 16), np.uint8)))
    assert r.status_code == 200 and "resized from 16x12 to 8x8" in r.headers["x-input-converted"]


async def test_tensor_answers_to_json_and_multipart_bodies(client) -> None:
    data = png(digit_like(1))
    expected = (await client.post("/v1/encode", files=files(data))).json()["results"][0]["mu"]
    mu = tensor_of(await client.post("/v1/encode", files=files(data), headers={"Accept": "tensor/binary"}))
    np.testing.assert_array_equal(mu, np.array([expected], np.float32))
    by_query = await client.post("/v1/encode?format=tensor", files=files(data))
    np.testing.assert_array_equal(tensor_of(by_query), mu)
    pixels = (await client.post("/v1/decode", json={"latents": [[0.0, 0.0]], "encoding": "pixels"})).json()["pixels"]
    floats = tensor_of(await client.post("/v1/decode", json={"latents": [[0.0, 0.0]]}, headers=TENSOR))
    np.testing.assert_allclose(floats, np.array(pixels) * 2 - 1, atol=1e-6)


@pytest.mark.parametrize(
    "shape_params",
    [[("shape", "1"), ("shape", "2")], [("shape", "1,2")], [("shape", "[1, 2]")]],
    ids=["repeated", "commas", "json"],
)
async def test_shape_as_clients_write_it(client, shape_params) -> None:
    z = np.zeros((1, 2), np.float32)
    r = await client.post("/v1/decode", content=z.tobytes(), params=[*shape_params, ("dtype", "float32")])
    assert tensor_of(r).shape == (1, 1, 8, 8)


# -- bad input ---------------------------------------------------------------------------------------------------------
LATENT = np.zeros((1, 2), np.float32)
IMAGE = np.zeros((1, 1, 8, 8), np.uint8)


@pytest.mark.parametrize(
    ("endpoint", "kwargs", "status", "code", "fragments"),
    [
        ("/v1/decode", {"content": LATENT.tobytes()[:-1], "params": {"shape": "1,2", "dtype": "float32"}}, 400,
         "invalid_payload", ("7 bytes", "shape [1, 2] of float32 takes 8")),
        ("/v1/encode", {"content": IMAGE.tobytes(), "params": {"shape": "1,1,8,8", "dtype": "int8"}}, 422,
         "invalid_request", ("unknown dtype 'int8'", "uint8")),
        ("/v1/decode", {"content": LATENT.tobytes(), "params": {"dtype": "float32"}}, 422, "invalid_input",
         ("needs `shape` and `dtype`", "missing: shape")),
        ("/v1/encode", {"content": IMAGE.tobytes(), "headers": {"Content-Type": "application/octet-stream"}}, 422,
         "invalid_input", ("missing: shape and dtype",)),
        ("/v1/encode", raw(IMAGE.reshape(1, 64)), 422, "invalid_input", ("[1, 64]", "[N, 1, 8, 8]")),
        ("/v1/score", raw(np.zeros((1, 1, 9, 9), np.uint8)), 422, "invalid_input", ("[1, 1, 9, 9]", "[N, 1, 8, 8]")),
        ("/v1/encode", raw(np.zeros((0, 1, 8, 8), np.uint8)), 422, "invalid_input", ("[0, 1, 8, 8]",)),
        ("/v1/decode", raw(np.zeros((1, 3), np.float32)), 422, "invalid_input", ("[1, 3]", "[N, 2]")),
        ("/v1/decode", raw(np.zeros((1, 4, 8, 8), np.float32)), 422, "invalid_input",
         ("[1, 4, 8, 8]", "[N, latent_dim, 1, 1]")),
        ("/v1/decode", raw(np.array([[0.0, np.inf]], np.float32)), 422, "invalid_input", ("finite",)),
        ("/v1/decode", raw(np.zeros((1, 2), np.uint8)), 422, "invalid_input", ("latents are floats", "uint8")),
        ("/v1/encode", raw(np.full((1, 1, 8, 8), np.nan, np.float32)), 422, "invalid_input", ("[-1, 1]", "NaN")),
        ("/v1/reconstruct", raw(np.full((1, 1, 8, 8), 2.0, np.float32)), 422, "invalid_input",
         ("[-1, 1]", "from 2 to 2")),
        ("/v1/decode", raw(LATENT, height=8, width=8), 422, "invalid_request", ("query.height", "not permitted")),
        ("/v1/encode", raw(IMAGE, partial_postprocess=True), 422, "invalid_request", ("query.partial_postprocess",)),
        ("/v1/encode", raw(IMAGE, modle="tiny"), 422, "invalid_request", ("query.modle",)),
        ("/v1/decode", raw(LATENT, scaling_factor=0), 422, "invalid_request", ("query.scaling_factor",)),
        ("/v1/encode", raw(IMAGE, posterior=True, scaling_factor=2), 422, "invalid_request", ("posterior",)),
        ("/v1/score", raw(IMAGE, k=0), 422, "invalid_request", ("query.k",)),
        ("/v1/encode", raw(IMAGE, headers={"Accept": "image/png"}), 406, "not_acceptable", ("octet-stream",)),
        ("/v1/encode", {"content": b"x", "params": {"shape": "1", "dtype": "uint8"},
                        "headers": {"Content-Type": "image/png"}}, 422, "invalid_input", ("not an image file",)),
        ("/v1/encode", {"content": b"x"}, 400, "invalid_payload", ("the body", "not a PNG or JPEG")),
        ("/v1/decode", {"content": png(digit_like(0)), "headers": {"Content-Type": "image/png"}}, 415,
         "unsupported_media_type", ("application/octet-stream",)),
        ("/v1/interpolate", {"content": IMAGE.tobytes(), "headers": {"Content-Type": "application/octet-stream"}}, 415,
         "unsupported_media_type", ("multipart",)),
    ],
)  # fmt: skip
async def test_bad_raw_bodies(client, endpoint, kwargs, status, code, fragments) -> None:
    assert_error(await client.post(endpoint, **kwargs), status, code, *fragments)


async def test_raw_parameters_are_refused_beside_other_bodies(client) -> None:
    r = await client.post("/v1/decode?shape=1,2&dtype=float32", json={"latents": [[0.0, 0.0]]})
    assert_error(r, 422, "invalid_request", "query.shape", "not permitted")
    r = await client.post("/v1/encode?partial_postprocess=true", files=files(png(digit_like(0))))
    assert_error(r, 422, "invalid_request", "query.partial_postprocess")
    r = await client.post(
        "/v1/encode?dtype=uint8&dtype=uint8", **{k: v for k, v in raw(IMAGE).items() if k != "params"}
    )
    assert_error(r, 422, "invalid_input", "'dtype' is given twice")


async def test_limits_apply_to_raw_bodies(settings_for) -> None:
    async with serve(settings_for(max_images_per_request=3, max_request_bytes=2048)) as (_, client):
        r = await client.post("/v1/encode", **raw(np.zeros((4, 1, 8, 8), np.uint8)))
        assert_error(r, 422, "invalid_input", "too many images: 4", "at most 3", "VAE_MAX_IMAGES_PER_REQUEST")
        r = await client.post("/v1/decode", **raw(np.zeros((4, 2), np.float32)))
        assert_error(r, 422, "invalid_input", "too many latents: 4")
        r = await client.post("/v1/encode", **raw(np.zeros((2, 1, 8, 8), np.float32)))  # 512 bytes: fine
        assert r.status_code == 200
        r = await client.post("/v1/encode", **raw(np.zeros((3, 1, 16, 16), np.float32)))  # 3072 bytes
        assert_error(r, 413, "payload_too_large", "3072", "2048")


# -- the parser, property-tested ---------------------------------------------------------------------------------------
@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[bytes, list[int], str, bool]:
    """A shape near the tiny model's, a dtype, and bytes of about the right length: often valid, often not."""
    images = draw(st.booleans())
    n = draw(st.integers(0, 3))
    shape = draw(st.one_of(st.just([n, 1, 8, 8] if images else [n, 2]), st.lists(st.integers(0, 9), max_size=5)))
    dtype = draw(st.sampled_from(["uint8", "float16", "float32", "bfloat16"]))
    count = int(np.prod(shape))
    size = count * np.dtype({"uint8": "u1", "float32": "<f4"}.get(dtype, "<f2")).itemsize
    body = draw(st.binary(min_size=size, max_size=size)) if draw(st.booleans()) else draw(st.binary(max_size=600))
    if dtype != "uint8" and draw(st.booleans()):  # plausible values, not only random bit patterns
        values = np.array(draw(st.lists(st.floats(-1.5, 1.5, width=32), min_size=count, max_size=count)), "<f4")
        if dtype == "bfloat16":
            body = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            body = values.astype("<f2" if dtype == "float16" else "<f4").tobytes()
    return body, shape, dtype, images


@settings(max_examples=300, deadline=None)
@given(raw_bodies())
def test_any_raw_body_becomes_a_valid_input_or_a_documented_error(tiny_predictor, case) -> None:
    body, shape, dtype, images = case
    try:
        array = read_tensor(body, shape, dtype)
        if images:
            x = tiny_predictor.images_tensor(wire_images(array))
            assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
            assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1
        else:
            z = tiny_predictor.latents_array(wire_latents(array, DecodeTensorQuery()))
            assert z.shape[1:] == (2,) and bool(torch.isfinite(z).all())
    except (InvalidInput, InvalidPayload):
        pass


async def test_browsers_may_read_a_tensor_answers_headers(settings_for) -> None:
    async with serve(settings_for(cors_origins=["https://app.example"])) as (_, client):
        r = await client.post("/v1/decode", **raw(LATENT, headers={"Origin": "https://app.example"}))
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"shape", "dtype", "seed", "fields"} <= exposed and tensor_of(r).shape == (1, 1, 8, 8)
