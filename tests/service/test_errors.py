"""Bad input gets a clear 4xx with the one error body, never a 500; start-up failures give one clear message."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import assert_error, b64, copy_checkpoint, digit_like, files, png, serve

from service.errors import StartupError
from service.main import create_app

pytestmark = pytest.mark.anyio


def with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (valid CRC): the shape of a decompression bomb."""
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return data[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + data[33:]


def noisy_png(size: int = 64) -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, size=(size, size), dtype=np.uint8))


# -- payloads -------------------------------------------------------------------------------------------------------
async def test_wrong_content_type(client) -> None:
    r = await client.post("/v1/encode", content=b"hello", headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", "multipart/form-data", "text/plain")
    # No Content-Type is a raw body (docs/binary-tensors.md): without `shape`, one image file.
    assert_error(await client.post("/v1/encode", content=b"x"), 400, "invalid_payload", "not a PNG or JPEG")
    r = await client.post("/v1/decode", files=files(png(digit_like(0))))
    assert_error(r, 415, "unsupported_media_type", "application/json")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"definitely not an image", "not a PNG or JPEG"),
        (b"", "empty"),
        (png(np.zeros((8, 8), np.uint8), "GIF"), "not a PNG or JPEG"),
        (noisy_png()[:600], "truncated"),
    ],
    ids=["text", "empty", "gif", "truncated-png"],
)
async def test_bytes_that_are_not_a_usable_image(client, data: bytes, fragment: str) -> None:
    assert_error(await client.post("/v1/encode", files=files(data)), 400, "invalid_payload", fragment)
    assert_error(await client.post("/v1/score", json={"images": [b64(data)]}), 400, "invalid_payload", fragment)


async def test_bad_base64(client) -> None:
    r = await client.post("/v1/encode", json={"images": ["%%% not base64 %%%"]})
    assert_error(r, 400, "invalid_payload", "images[0]", "base64")


async def test_decompression_bomb_by_header(client) -> None:
    bomb = with_size(png(np.zeros((8, 8), np.uint8)), 100_000, 100_000)  # 10 Gpx claimed in a 70-byte file
    assert_error(await client.post("/v1/encode", files=files(bomb)), 413, "image_too_large", "pixels")
    moderate = with_size(png(np.zeros((8, 8), np.uint8)), 10_000, 10_000)  # over PIL's warning threshold
    assert_error(await client.post("/v1/encode", files=files(moderate)), 413, "image_too_large")


async def test_image_over_the_pixel_limit(settings_for) -> None:
    async with serve(settings_for(max_image_pixels=1000)) as (_, client):
        r = await client.post("/v1/encode", files=files(noisy_png(64)))
        assert_error(r, 413, "image_too_large", "64x64 = 4096 pixels", "1000")
        assert (await client.post("/v1/encode", files=files(png(digit_like(0))))).status_code == 200


async def test_upload_over_the_size_limit(settings_for) -> None:
    async with serve(settings_for(max_request_bytes=2048)) as (_, client):
        big = noisy_png(64)  # ~4 KB
        assert_error(await client.post("/v1/encode", files=files(big)), 413, "payload_too_large", "2048")

        async def chunked():  # no Content-Length: counted while reading
            for i in range(0, len(big), 512):
                yield big[i : i + 512]

        r = await client.post("/v1/encode", content=chunked(), headers={"Content-Type": "image/png"})
        assert_error(r, 413, "payload_too_large")  # a raw image body
        r = await client.post("/v1/decode", content=chunked(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "payload_too_large")


async def test_too_many_images(settings_for) -> None:
    async with serve(settings_for(max_images_per_request=3)) as (_, client):
        four = [png(digit_like(i)) for i in range(4)]
        assert_error(await client.post("/v1/encode", files=files(*four)), 422, "invalid_input", "too many", "3")
        many = [png(digit_like(i)) for i in range(9)]
        assert_error(await client.post("/v1/encode", files=files(*many)), 422, "invalid_input", "too many")
        r = await client.post("/v1/score", json={"images": [b64(d) for d in four]})
        assert_error(r, 422, "invalid_input", "too many")
        r = await client.post("/v1/decode", json={"latents": [[0.0, 0.0]] * 4})
        assert_error(r, 422, "invalid_input", "too many")


async def test_image_sources(client) -> None:
    image = b64(png(digit_like(0)))
    assert_error(await client.post("/v1/encode", json={}), 422, "invalid_input", "no images")
    r = await client.post("/v1/encode", json={"images": [image], "pixels": [[0.0] * 64]})
    assert_error(r, 422, "invalid_input", "one way")
    r = await client.post("/v1/encode", data={"image": "text"}, files=[("other", ("a.png", b"x", "image/png"))])
    assert_error(r, 422, "invalid_input")
    r = await client.post("/v1/encode", data={"image": "text, not a file"})
    assert_error(r, 415, "unsupported_media_type")  # url-encoded form
    r = await client.post("/v1/encode", files={"image": (None, b"text, not a file")})  # a field, not a file
    assert_error(r, 400, "invalid_payload", "not a PNG or JPEG")
    r = await client.post("/v1/encode", files={"image": (None, png(digit_like(0)))})  # a field holding a PNG
    assert r.status_code == 200
    r = await client.post(
        "/v1/encode", content=b"--xyz\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert r.status_code in (400, 422)
    assert_error(r, r.status_code, r.json()["code"])


@pytest.mark.parametrize(
    ("pixels", "fragment"),
    [
        ([[0.5] * 7] * 8, "shape (8, 7)"),
        ([0.5] * 63, "flat 64"),
        ([[0.5] * 8] * 7 + [[0.5] * 7], "rectangular"),
        ([[2.0] * 8] * 8, "[0, 1]"),
        ([["a"] * 8] * 8, "rectangular"),
    ],
    ids=["shape", "length", "ragged", "range", "strings"],
)
async def test_bad_pixel_arrays(client, pixels, fragment: str) -> None:
    assert_error(await client.post("/v1/encode", json={"pixels": [pixels]}), 422, "invalid_input", fragment)


# -- latents and numbers --------------------------------------------------------------------------------------------
async def test_latents_of_the_wrong_length(client) -> None:
    r = await client.post("/v1/decode", json={"latents": [[0.0, 0.0], [1.0, 2.0, 3.0]]})
    assert_error(r, 422, "invalid_input", "latents[1] has 3 values", "latent_dim 2")
    r = await client.post("/v1/interpolate", json={"latents": [[0.0], [1.0]]})
    assert_error(r, 422, "invalid_input", "latent_dim 2")
    assert_error(await client.post("/v1/decode", json={"latents": []}), 422, "invalid_request", "latents")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_latents(client, token: str) -> None:
    body = f'{{"latents": [[0.5, {token}]]}}'.encode()
    r = await client.post("/v1/decode", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request", "latents.0.1", "finite")


async def test_latents_that_overflow_float32(client) -> None:
    r = await client.post("/v1/decode", json={"latents": [[1e39, 0.0]]})
    assert_error(r, 422, "invalid_input", "finite float32")


@pytest.mark.parametrize("temperature", ["0", "-1", "nan", "inf"])
async def test_temperature_must_be_positive_and_finite(client, temperature: str) -> None:
    r = await client.get(f"/v1/sample?temperature={temperature}")
    assert_error(r, 422, "invalid_request", "query.temperature")


async def test_limits_on_n_k_and_steps(settings_for) -> None:
    limits = {"max_sample_n": 4, "max_score_k": 8, "max_interpolate_steps": 5, "max_manifold_steps": 3}
    async with serve(settings_for(**limits)) as (_, client):
        assert_error(await client.get("/v1/sample?n=5"), 422, "invalid_input", "n=5", "4")
        assert_error(await client.get("/v1/sample?n=0"), 422, "invalid_request", "query.n")
        r = await client.post("/v1/score", files=files(png(digit_like(0))), data={"k": "9"})
        assert_error(r, 422, "invalid_input", "k=9")
        r = await client.post("/v1/interpolate", json={"latents": [[0, 0], [1, 1]], "steps": 6})
        assert_error(r, 422, "invalid_input", "steps=6")
        r = await client.post("/v1/interpolate", json={"latents": [[0, 0], [1, 1]], "steps": 1})
        assert_error(r, 422, "invalid_request", "steps")
        assert_error(await client.get("/v1/manifold?steps=4"), 422, "invalid_input", "steps=4")


async def test_interpolate_needs_exactly_two_ends(client) -> None:
    image = png(digit_like(0))
    r = await client.post("/v1/interpolate", files=files(image, image, image))
    assert_error(r, 422, "invalid_input", "exactly 2 images")
    r = await client.post("/v1/interpolate", json={"latents": [[0, 0]] * 3})
    assert_error(r, 422, "invalid_input", "exactly 2 latents")
    r = await client.post("/v1/interpolate", json={"latents": [[0, 0]] * 2, "images": [b64(image)] * 2})
    assert_error(r, 422, "invalid_input", "not both")


async def test_malformed_json_and_unknown_fields(client) -> None:
    r = await client.post("/v1/decode", content=b'{"latents": [[0, 0]', headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request", "not valid JSON")
    assert_error(await client.post("/v1/decode", json={"latents": [[0, 0]], "oops": 1}), 422, "invalid_request", "oops")
    r = await client.post("/v1/encode", files=files(png(digit_like(0))), data={"seed": "minus one"})
    assert_error(r, 422, "invalid_request", "seed")


# -- models, formats, routes ----------------------------------------------------------------------------------------
async def test_unknown_model_name(client) -> None:
    assert_error(await client.get("/v1/sample?model=nope"), 404, "model_not_found", "'nope'", "tiny")
    assert_error(await client.get("/v1/models/nope"), 404, "model_not_found")
    r = await client.post("/v1/decode", json={"model": "nope", "latents": [[0, 0]]})
    assert_error(r, 404, "model_not_found")
    r = await client.post("/v1/encode", files=files(png(digit_like(0))), data={"model": "nope"})
    assert_error(r, 404, "model_not_found")


async def test_vae_only_verbs_refuse_a_plain_autoencoder(client) -> None:
    r = await client.post("/v1/score", files=files(png(digit_like(0))), data={"model": "tiny-ae"})
    assert_error(r, 422, "unsupported_for_model", "plain autoencoder", "scoring")
    # sampling is allowed: decoding N(0, I) codes is how one sees that an AE is not a generative model
    r = await client.get("/v1/sample?model=tiny-ae&n=4&seed=0")
    assert r.status_code == 200 and len(r.json()["images"]) == 4
    r = await client.post("/v1/encode", files=files(png(digit_like(0))), data={"model": "tiny-ae", "sample": "true"})
    assert r.status_code == 200
    result = r.json()["results"][0]
    assert result["z"] == result["mu"]  # an autoencoder's code is its mean


async def test_manifold_without_latent_statistics(settings_for, tiny_gaussian_checkpoint: Path, tmp_path) -> None:
    ckpt = copy_checkpoint(tiny_gaussian_checkpoint, tmp_path / "rgb-nostats")
    card = json.loads((ckpt / "model_card.json").read_text())
    del card["latent_stats"]
    (ckpt / "model_card.json").write_text(json.dumps(card))
    async with serve(settings_for(models_dir=tmp_path, default_model="rgb-nostats")) as (_, client):
        assert_error(await client.get("/v1/manifold"), 422, "unsupported_for_model", "latent_dim 3", "latent_stats")


async def test_not_acceptable(client) -> None:
    assert_error(await client.get("/v1/sample", headers={"Accept": "image/jpeg"}), 406, "not_acceptable", "image/png")
    assert_error(await client.get("/v1/sample?format=gif"), 406, "not_acceptable", "json, png")
    assert_error(await client.get("/v1/sample?format=bmp"), 422, "invalid_request", "format")
    r = await client.post("/v1/decode", json={"latents": [[0, 0]]}, headers={"Accept": "text/html;q=1, */*;q=0"})
    assert_error(r, 406, "not_acceptable")


async def test_unknown_route_and_method(client) -> None:
    assert_error(await client.get("/v3/nothing"), 404, "not_found")
    assert_error(await client.get("/v1/encode"), 405, "method_not_allowed")


async def test_api_key(settings_for) -> None:
    async with serve(settings_for(api_key="s3cret")) as (_, client):
        r = await client.get("/v1/models")
        assert_error(r, 401, "unauthorized", "API key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(await client.get("/v1/models", headers={"X-API-Key": "wrong"}), 401, "unauthorized", "wrong")
        r = await client.post("/v1/decode", json={"latents": [[0, 0]]}, headers={"Authorization": "Bearer nope"})
        assert_error(r, 401, "unauthorized")
        assert (await client.get("/v1/models", headers={"X-API-Key": "s3cret"})).status_code == 200
        r = await client.post("/v1/decode", json={"latents": [[0, 0]]}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await client.get(open_path)).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert set(schema["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
        assert schema["paths"]["/v1/encode"]["post"]["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]


async def test_an_unexpected_failure_is_a_generic_500(served, monkeypatch) -> None:
    app, client = served
    predictor = app.state.registry.models["tiny"].predictor

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(predictor, "predict", explode)
    monkeypatch.setattr(app.state.registry.models["tiny"].batcher, "_forward", explode)
    r = await client.post("/v1/decode", json={"latents": [[0, 0]]})
    body = assert_error(r, 500, "internal_error")
    assert "secret" not in body["detail"]


# -- readiness and start-up -----------------------------------------------------------------------------------------
async def test_not_ready_before_the_lifespan_has_run(settings_for) -> None:
    app = create_app(settings_for())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert_error(await client.get("/readyz"), 503, "not_ready")
        assert_error(await client.get("/v1/sample"), 503, "not_ready")
        assert_error(await client.get("/v1/models"), 503, "not_ready")


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("corrupt", "sha256"),
        ("missing-default", "default model 'mnist' is not among the models found (tiny)"),
        ("empty", "no checkpoints in"),
        ("no-dir", "does not exist"),
        ("cuda", "CUDA is not available"),
        ("bad-card", "not valid JSON"),
    ],
)
async def test_a_bad_start_stops_with_one_clear_message(settings_for, tiny_checkpoint, tmp_path, setup, fragment):
    if setup == "cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is present")
    root = tmp_path / "models"
    root.mkdir()
    overrides: dict = {"models_dir": root, "default_model": "tiny"}
    if setup in ("corrupt", "missing-default", "cuda", "bad-card"):
        ckpt = copy_checkpoint(tiny_checkpoint, root / "tiny")
    if setup == "corrupt":
        weights = ckpt / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif setup == "missing-default":
        overrides["default_model"] = "mnist"
    elif setup == "no-dir":
        overrides["models_dir"] = tmp_path / "absent"
    elif setup == "cuda":
        overrides["device"] = "cuda:0"
    elif setup == "bad-card":
        (ckpt / "model_card.json").write_text("{not json")
    app = create_app(settings_for(**overrides))
    with pytest.raises(StartupError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        async with app.router.lifespan_context(app):
            pass
    assert "\n" not in str(info.value)


async def test_the_server_logs_one_line_not_a_traceback(settings_for, tmp_path) -> None:
    """Drive the ASGI lifespan protocol as uvicorn does: the failure message is the one-line reason."""
    app = create_app(settings_for(models_dir=tmp_path))
    sent: list[dict] = []
    messages = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    with pytest.raises(StartupError):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent[-1]["type"] == "lifespan.startup.failed"
    assert sent[-1]["message"].startswith("vae-serve cannot start: no checkpoints in")
    assert "Traceback" not in sent[-1]["message"] and "\n" not in sent[-1]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "kwargs", "setting"),
    [
        ("get", "/v1/sample?n=1000", {}, "VAE_MAX_SAMPLE_N / --max-sample-n"),
        ("get", "/v1/manifold?steps=31", {}, "VAE_MAX_MANIFOLD_STEPS / --max-manifold-steps"),
        ("post", "/v1/score", {"json": {"pixels": [[0.0] * 64], "k": 5000}}, "VAE_MAX_SCORE_K / --max-score-k"),
        ("post", "/v1/interpolate", {"json": {"latents": [[0, 0], [1, 1]], "steps": 65}}, "VAE_MAX_INTERPOLATE_STEPS"),
        ("post", "/v1/decode", {"json": {"latents": [[0, 0]] * 65}}, "VAE_MAX_IMAGES_PER_REQUEST"),
        ("post", "/v1/encode", {"json": {"pixels": [[0.0] * 64] * 65}}, "--max-images-per-request"),
    ],
)
async def test_every_limit_error_names_the_setting_that_raises_it(client, method, path, kwargs, setting) -> None:
    r = await getattr(client, method)(path, **kwargs)
    assert_error(r, 422, "invalid_input", "over the limit" if "many" not in r.text else "too many", setting)


@pytest.mark.anyio
async def test_size_limits_name_their_settings(settings_for) -> None:
    async with serve(settings_for(max_request_bytes=2048, max_image_pixels=16)) as (_, client):
        r = await client.post("/v1/encode", files=files(b"x" * 4096))
        assert_error(r, 413, "payload_too_large", "VAE_MAX_REQUEST_BYTES")
        r = await client.post("/v1/encode", files=files(png(digit_like(0))))
        assert_error(r, 413, "image_too_large", "VAE_MAX_IMAGE_PIXELS")
