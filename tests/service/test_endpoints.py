"""Each endpoint against the model itself: the response must equal a direct call on the same input."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import as_tensor, b64, decode_png, digit_like, files, png, serve

from model import latent, losses
from model.preprocess import make_grid, pil_to_tensor, tensor_to_pil
from service.predictor import MANIFOLD_SPAN

pytestmark = pytest.mark.anyio
TOL = {"atol": 1e-5, "rtol": 1e-5}


def close(a: object, b: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), b.float(), **TOL)


def close_images(pngs: list[str], expected: torch.Tensor) -> None:
    """Returned PNGs against the model's images, allowing one grey level of float noise at rounding edges."""
    got = torch.stack([decode_png(p) for p in pngs])
    assert got.shape == expected.shape
    assert (got - expected.clamp(0, 1)).abs().max() <= 1.5 / 255


# -- encode ---------------------------------------------------------------------------------------------------------
async def test_encode_multipart_matches_the_encoder(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(3)]
    r = await client.post("/v1/encode", files=files(*map(png, images)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["latent_dim"] == 2 and "seed" not in body
    mu, logvar = tiny_model.encode(as_tensor(images))
    close([res["mu"] for res in body["results"]], mu)
    close([res["logvar"] for res in body["results"]], logvar)
    assert all("z" not in res for res in body["results"])


async def test_encode_converts_any_size_and_mode_as_training_did(client, tiny_model) -> None:
    """A 40x30 RGBA upload goes through model.preprocess.pil_to_tensor, exactly as the training reader does."""
    rgba = np.random.default_rng(0).integers(0, 256, size=(30, 40, 4), dtype=np.uint8)
    data = png(rgba)
    jpeg = png(rgba[:, :, :3], "JPEG")
    r = await client.post("/v1/encode", files=files(data, jpeg))
    assert r.status_code == 200, r.text
    x = torch.stack([pil_to_tensor(Image.open(io.BytesIO(d)), (1, 8, 8)) for d in (data, jpeg)])
    close([res["mu"] for res in r.json()["results"]], tiny_model.encode(x)[0])


async def test_encode_json_base64_and_pixels_agree(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(2)]
    x = as_tensor(images)
    by_b64 = await client.post("/v1/encode", json={"images": [b64(png(a)) for a in images]})
    by_pixels = await client.post("/v1/encode", json={"pixels": x.tolist()})
    flat = await client.post("/v1/encode", json={"pixels": [t.flatten().tolist() for t in x]})
    hw = await client.post("/v1/encode", json={"pixels": [t[0].tolist() for t in x]})
    mu = tiny_model.encode(x)[0]
    for r in (by_b64, by_pixels, flat, hw):
        assert r.status_code == 200, r.text
        close([res["mu"] for res in r.json()["results"]], mu)


async def test_encode_sample_is_seeded_and_matches_reparameterize(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(3)]
    body = {"images": [b64(png(a)) for a in images], "sample": True, "seed": 123}
    first, again = (
        (await client.post("/v1/encode", json=body)).json(),
        (await client.post("/v1/encode", json=body)).json(),
    )
    assert first == again and first["seed"] == 123
    mu, logvar = tiny_model.encode(as_tensor(images))
    z = tiny_model.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(123))
    close([res["z"] for res in first["results"]], z)
    other = (await client.post("/v1/encode", json={**body, "seed": 124})).json()
    assert other["results"][0]["z"] != first["results"][0]["z"]
    fresh = (await client.post("/v1/encode", json={**body, "seed": None})).json()
    assert isinstance(fresh["seed"], int)  # a fresh seed, returned so the caller can reproduce it


async def test_encode_multipart_form_fields(client, tiny_model) -> None:
    image = digit_like(5)
    r = await client.post("/v1/encode", files=files(png(image)), data={"sample": "true", "seed": "7", "model": "tiny"})
    assert r.status_code == 200, r.text
    mu, logvar = tiny_model.encode(as_tensor([image]))
    close(
        [r.json()["results"][0]["z"]], tiny_model.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    )


# -- decode ---------------------------------------------------------------------------------------------------------
async def test_decode_returns_probabilities_never_logits(client, tiny_model) -> None:
    z = [[0.0, 0.0], [2.5, -1.0], [-3.0, 3.0]]
    r = await client.post("/v1/decode", json={"latents": z, "encoding": "pixels"})
    assert r.status_code == 200, r.text
    expected = tiny_model.mean_image(tiny_model.decode(torch.tensor(z)))
    pixels = torch.tensor(r.json()["pixels"])
    close(pixels, expected)
    assert pixels.min() >= 0 and pixels.max() <= 1
    as_png = await client.post("/v1/decode", json={"latents": z})
    close_images(as_png.json()["images"], expected)


async def test_decode_png_grid_on_accept(client, tiny_model) -> None:
    z = [[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -2.0]]
    r = await client.post("/v1/decode", json={"latents": z}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    expected = make_grid(tiny_model.mean_image(tiny_model.decode(torch.tensor(z))), nrow=2)
    got = decode_png(r.content)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1.5 / 255
    by_query = await client.post("/v1/decode?format=png", json={"latents": z})
    assert by_query.content == r.content


async def test_gaussian_rgb_model(served, settings_for, rgb_model) -> None:
    _, client = served
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    r = await client.post("/v1/decode", json={"model": "tiny-rgb", "latents": z.tolist(), "encoding": "pixels"})
    close(r.json()["pixels"], rgb_model.mean_image(rgb_model.decode(z)))
    image = digit_like(1, channels=3)
    r = await client.post("/v1/encode", files=files(png(image)), data={"model": "tiny-rgb"})
    close([r.json()["results"][0]["mu"]], rgb_model.encode(as_tensor([image]))[0])


# -- sample ---------------------------------------------------------------------------------------------------------
async def test_sample_equals_model_sample_and_seeds_reproduce(client, tiny_model) -> None:
    r = await client.get("/v1/sample", params={"n": 5, "seed": 11, "temperature": 0.7, "encoding": "pixels"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = tiny_model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(11))
    close(body["pixels"], expected)
    assert body["seed"] == 11 and body["temperature"] == 0.7 and len(body["latents"]) == 5
    again = await client.get("/v1/sample", params={"n": 5, "seed": 11, "temperature": 0.7, "encoding": "pixels"})
    assert again.json() == body
    png_grid = await client.get("/v1/sample", params={"n": 5, "seed": 11, "temperature": 0.7, "format": "png"})
    assert png_grid.headers["content-type"] == "image/png"
    assert png_grid.content == (await client.get("/v1/sample?n=5&seed=11&temperature=0.7&format=png")).content
    grid = decode_png(png_grid.content)
    assert (grid - make_grid(expected, nrow=3)).abs().max() <= 1.5 / 255


async def test_sample_browser_accept_gets_png(client) -> None:
    accept = "image/avif,image/webp,image/*,*/*;q=0.8"
    r = await client.get("/v1/sample?n=4&seed=0", headers={"Accept": accept})
    assert r.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(r.content)).verify()


# -- reconstruct ----------------------------------------------------------------------------------------------------
async def test_reconstruct_matches_elbo_and_decoder(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(4)]
    r = await client.post("/v1/reconstruct", files=files(*map(png, images)), data={"seed": "5", "encoding": "pixels"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["binarized"] is True and body["seed"] == 5
    g = torch.Generator().manual_seed(5)
    x = torch.bernoulli(as_tensor(images), generator=g)  # Bernoulli models see binarised inputs, as in training
    terms = losses.elbo(tiny_model, x, generator=g)
    for key in ("elbo", "recon", "kl"):
        close([res[key] for res in body["results"]], getattr(terms, key))
    close([res["elbo_bits_per_dim"] for res in body["results"]], -terms.elbo / (64 * np.log(2)))
    close(body["pixels"], tiny_model.mean_image(tiny_model.decode(tiny_model.encode(x)[0])))


async def test_reconstruct_without_binarisation_and_png(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(2)]
    r = await client.post("/v1/reconstruct", json={"images": [b64(png(a)) for a in images], "binarize": False})
    body = r.json()
    assert body["binarized"] is False and body["seed"] == 0
    x = as_tensor(images)
    terms = losses.elbo(tiny_model, x, generator=torch.Generator().manual_seed(0))
    close([res["elbo"] for res in body["results"]], terms.elbo)
    close_images(body["images"], tiny_model.mean_image(tiny_model.decode(tiny_model.encode(x)[0])))
    grid = await client.post("/v1/reconstruct", files=files(png(images[0])), headers={"Accept": "image/png"})
    assert grid.headers["content-type"] == "image/png"


async def test_reconstruct_gaussian_model_is_never_binarised(client, rgb_model) -> None:
    image = digit_like(2, channels=3)
    r = await client.post("/v1/reconstruct", files=files(png(image)), data={"model": "tiny-rgb", "binarize": "true"})
    body = r.json()
    assert body["binarized"] is False
    terms = losses.elbo(rgb_model, as_tensor([image]), generator=torch.Generator().manual_seed(0))
    close([body["results"][0]["elbo"]], terms.elbo)


# -- score ----------------------------------------------------------------------------------------------------------
async def test_score_matches_elbo_and_iwae(client, tiny_model) -> None:
    images = [digit_like(i) for i in range(3)]
    r = await client.post("/v1/score", json={"images": [b64(png(a)) for a in images], "k": 64, "seed": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 64 and body["seed"] == 9 and body["binarized"] is True
    g = torch.Generator().manual_seed(9)
    x = torch.bernoulli(as_tensor(images), generator=g)
    terms = losses.elbo(tiny_model, x, generator=g)
    ll = losses.iwae_log_likelihood(tiny_model, x, k=64, generator=g)
    res = body["results"]
    close([s["elbo"] for s in res], terms.elbo)
    close([s["kl"] for s in res], terms.kl)
    close([s["log_likelihood"] for s in res], ll)
    close([s["bits_per_dim"] for s in res], losses.bits_per_dim(-ll, 64))
    assert all(s["log_likelihood"] >= s["elbo"] - 1.0 for s in res)  # IWAE is the tighter bound (up to noise)
    again = await client.post("/v1/score", json={"images": [b64(png(a)) for a in images], "k": 64, "seed": 9})
    assert again.json() == body


async def test_score_gaussian_model(client, rgb_model) -> None:
    image = digit_like(4, channels=3)
    r = await client.post("/v1/score", files=files(png(image)), data={"model": "tiny-rgb", "k": "16"})
    g = torch.Generator().manual_seed(0)
    x = as_tensor([image])
    terms = losses.elbo(rgb_model, x, generator=g)
    close([r.json()["results"][0]["log_likelihood"]], losses.iwae_log_likelihood(rgb_model, x, k=16, generator=g))
    close([r.json()["results"][0]["elbo"]], terms.elbo)


# -- interpolate ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["linear", "spherical"])
async def test_interpolate_latents(client, tiny_model, path) -> None:
    ends = [[-2.0, 0.5], [1.5, 1.0]]
    r = await client.post("/v1/interpolate", json={"latents": ends, "steps": 6, "path": path, "encoding": "pixels"})
    assert r.status_code == 200, r.text
    fn = latent.slerp if path == "spherical" else latent.lerp
    codes = fn(torch.tensor(ends[0]), torch.tensor(ends[1]), 6)
    close(r.json()["latents"], codes)
    close(r.json()["pixels"], tiny_model.mean_image(tiny_model.decode(codes)))


async def test_interpolate_images_png_strip_and_gif(client, tiny_model) -> None:
    a, b = digit_like(1), digit_like(2)
    mu = tiny_model.encode(as_tensor([a, b]))[0]
    codes = latent.lerp(mu[0], mu[1], 5)
    r = await client.post("/v1/interpolate", files=files(png(a), png(b)), data={"steps": "5"})
    close(r.json()["latents"], codes)
    strip = await client.post("/v1/interpolate?format=png", files=files(png(a), png(b)), data={"steps": "5"})
    assert strip.headers["content-type"] == "image/png"
    expected = make_grid(tiny_model.mean_image(tiny_model.decode(codes)), nrow=5)
    assert (decode_png(strip.content) - expected).abs().max() <= 1.5 / 255
    gif = await client.post(
        "/v1/interpolate", json={"images": [b64(png(a)), b64(png(b))], "steps": 5}, headers={"Accept": "image/gif"}
    )
    assert gif.headers["content-type"] == "image/gif"
    frames = Image.open(io.BytesIO(gif.content))
    assert frames.format == "GIF" and frames.n_frames == 5 and frames.size == (8, 8)


# -- manifold -------------------------------------------------------------------------------------------------------
async def test_manifold_2d_is_the_prior_plane(client, tiny_model) -> None:
    r = await client.get("/v1/manifold", params={"steps": 4, "encoding": "pixels"})
    assert r.status_code == 200, r.text
    body = r.json()
    codes = latent.manifold_grid(4, torch.zeros(2), torch.eye(2), torch.full((2,), MANIFOLD_SPAN))
    assert body["basis"] == "prior" and body["steps"] == 4
    close(body["latents"], codes)
    close(body["pixels"], tiny_model.mean_image(tiny_model.decode(codes)))
    grid = await client.get("/v1/manifold?steps=4", headers={"Accept": "image/png"})
    assert decode_png(grid.content).shape == (1, 32, 32)  # no padding: a continuous map, as in the paper's Fig. 4


async def test_manifold_uses_principal_directions_for_larger_latents(client, rgb_model, tiny_gaussian_checkpoint: Path):
    import json

    stats = json.loads((tiny_gaussian_checkpoint / "model_card.json").read_text())["latent_stats"]
    r = await client.get("/v1/manifold", params={"steps": 3, "model": "tiny-rgb", "encoding": "pixels"})
    assert r.status_code == 200, r.text
    body = r.json()
    span = MANIFOLD_SPAN * torch.tensor(stats["principal_stddevs"])
    codes = latent.manifold_grid(3, torch.tensor(stats["mean"]), torch.tensor(stats["principal_directions"]), span)
    assert body["basis"] == "principal_directions"
    close(body["latents"], codes)
    close(body["pixels"], rgb_model.mean_image(rgb_model.decode(codes)))


# -- models, health, metrics, docs ----------------------------------------------------------------------------------
async def test_models_list_and_card(client, tiny_checkpoint: Path) -> None:
    import json

    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "tiny"
    assert [m["name"] for m in body["models"]] == ["tiny", "tiny-ae", "tiny-rgb"]
    card = json.loads((tiny_checkpoint / "model_card.json").read_text())
    one = (await client.get("/v1/models/tiny")).json()
    assert one["default"] is True and one["latent_dim"] == 2 and one["input_shape"] == [1, 8, 8]
    assert one["weights"]["sha256"] == card["weights"]["sha256"]
    assert one["metrics"] == card["metrics"] and one["architecture"] == card["config"] and one["card"] == card
    assert one["input"]["color_mode"] == "L" and one["device"] == "cpu" and one["dtype"] == "float32"
    assert (await client.get("/v1/models/tiny-ae")).json()["kind"] == "ae"


async def test_health_ready_metrics(served) -> None:
    _, client = served
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny", "tiny-ae", "tiny-rgb"]
    await client.post("/v1/encode", files=files(png(digit_like(0)), png(digit_like(1))))
    await client.get("/v1/models/nope")
    text = (await client.get("/metrics")).text
    assert 'vae_http_requests_total{method="POST",path="/v1/encode",status="200"} 1.0' in text
    assert 'vae_http_requests_total{method="GET",path="/v1/models/{name}",status="404"} 1.0' in text
    assert 'vae_http_request_duration_seconds_bucket{le="0.1",method="POST",path="/v1/encode",status="200"}' in text
    assert 'vae_batch_size_bucket{le="2.0",model="tiny",op="encode"}' in text
    assert 'vae_images_processed_total{model="tiny",op="encode"}' in text
    assert 'vae_queue_depth{model="tiny"} 0.0' in text


async def test_openapi_lists_every_endpoint_with_examples(client) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in ("/v1/encode", "/v1/decode", "/v1/reconstruct", "/v1/score", "/v1/interpolate"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["examples"], path
    assert "multipart/form-data" in schema["paths"]["/v1/encode"]["post"]["requestBody"]["content"]
    for path in ("/v1/sample", "/v1/manifold", "/v1/models", "/v1/models/{name}", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"]
    assert "image/png" in schema["paths"]["/v1/sample"]["get"]["responses"]["200"]["content"]
    assert (await client.get("/docs")).status_code == 200


async def test_every_reference_in_the_openapi_schema_resolves(client) -> None:
    # A dangling $ref renders as "Something went wrong" in ReDoc (the v2 request's nested models once did).
    schema = (await client.get("/openapi.json")).json()
    refs = set(re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(schema)))
    assert refs, "no $ref at all: the check would pass vacuously"
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"], ref
    assert "$defs" not in json.dumps(schema["paths"])


async def test_index_serves_the_static_page_when_present(settings_for, monkeypatch, tmp_path) -> None:
    from service.routes import web

    async with serve(settings_for()) as (_, client):
        monkeypatch.setattr(web, "STATIC_DIR", tmp_path)
        assert (await client.get("/")).json()["docs"] == "/docs"
        (tmp_path / "index.html").write_text("<h1>vae</h1>")
        page = await client.get("/")
        assert page.text == "<h1>vae</h1>" and page.headers["content-type"].startswith("text/html")


async def test_tensor_to_pil_round_trip_of_outputs(client, tiny_model) -> None:
    """PNG outputs are model.preprocess.tensor_to_pil of the decoder's mean, byte for byte in pixel values."""
    z = [[0.2, -0.4]]
    r = await client.post("/v1/decode", json={"latents": z})
    expected = tensor_to_pil(tiny_model.mean_image(tiny_model.decode(torch.tensor(z)))[0])
    got = Image.open(io.BytesIO(__import__("base64").b64decode(r.json()["images"][0])))
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
async def test_gpu_serving_matches_the_cpu_model(settings_for, tiny_model, dtype) -> None:
    images = [digit_like(i) for i in range(4)]
    async with serve(settings_for(device="cuda", dtype=dtype)) as (_, client):
        info = (await client.get("/v1/models/tiny")).json()
        assert info["device"].startswith("cuda") and info["dtype"] == dtype
        r = await client.post("/v1/encode", files=files(*map(png, images)))
        sample = await client.get("/v1/sample", params={"n": 3, "seed": 2, "encoding": "pixels"})
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    mu = tiny_model.encode(as_tensor(images))[0]
    torch.testing.assert_close(torch.tensor([x["mu"] for x in r.json()["results"]]), mu, atol=tol, rtol=tol)
    expected = tiny_model.sample(3, generator=torch.Generator().manual_seed(2))  # CPU noise: same draws on GPU
    torch.testing.assert_close(torch.tensor(sample.json()["pixels"]), expected, atol=tol, rtol=tol)


@pytest.mark.anyio
async def test_one_image_as_png_is_the_image_itself_unframed(client) -> None:
    r = await client.post("/v1/decode?format=png", json={"latents": [[0.0, 0.0]]})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (8, 8)
    r = await client.get("/v1/sample?n=1&seed=0&format=png")
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    grid = await client.get("/v1/sample?n=2&seed=0&format=png")
    assert Image.open(io.BytesIO(grid.content)).size == (2 + 2 * 10, 2 + 10)  # two, framed in a grid


@pytest.mark.anyio
async def test_a_converted_upload_is_said_so(client) -> None:
    """A 16x16 RGB upload to the 8x8 grey model is resized and made grey: the X-Input-Converted header says so;
    an upload already at the model's size and mode gets no header."""
    big = png(digit_like(0, size=(16, 16), channels=3))
    r = await client.post("/v1/encode", files=files(png(digit_like(1)), big))
    assert r.status_code == 200
    note = r.headers["x-input-converted"]
    assert "image 1 (upload)" in note and "16x16 to 8x8" in note and "RGB to L" in note and "image 0" not in note
    plain = await client.post("/v1/encode", files=files(png(digit_like(1))))
    assert "x-input-converted" not in plain.headers


@pytest.mark.anyio
async def test_the_api_docs_work_offline(client) -> None:
    """/docs and /redoc load Swagger UI and ReDoc from this server, never a CDN."""
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = (await client.get(page)).text
        assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
        for asset in assets:
            url = f"/static-offline-docs/{asset}"
            assert url in html
            r = await client.get(url)
            assert r.status_code == 200 and len(r.content) > 10_000
