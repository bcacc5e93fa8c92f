"""The Open Inference Protocol (v2) over REST, in-process: metadata, health, and every model's answer against the /v1
JSON answer for the same input (float32 within 1e-5, uint8 within 1), JSON and binary tensors both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from service_helpers import assert_error, decode_png, files, png, serve
from v2_helpers import HEADER, assert_v2_error, binary_request, images_uint8, json_request, outputs_of

pytestmark = pytest.mark.anyio
TOL = {"atol": 1e-5, "rtol": 1e-5}


async def test_server_metadata_and_health(client) -> None:
    r = await client.get("/v2")
    assert r.status_code == 200
    assert r.json()["name"] == "vae-serve" and "binary_tensor_data" in r.json()["extensions"]
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    ready = await client.get("/v2/models/tiny-encoder/ready")
    assert ready.status_code == 200 and ready.json() == {"name": "tiny-encoder", "ready": True}
    assert (await client.get("/v2/models/tiny-encoder/versions/1/ready")).status_code == 200


async def test_model_metadata_comes_from_the_checkpoints(client) -> None:
    r = await client.get("/v2/models/tiny-rgb-encoder")
    assert r.json() == {
        "name": "tiny-rgb-encoder",
        "versions": ["1"],
        "platform": "pytorch_safetensors",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, 8, 8]}],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, 3]} for n in ("mu", "logvar", "z")],
    }
    decoder = (await client.get("/v2/models/tiny-decoder/versions/1")).json()
    assert decoder["inputs"] == [{"name": "latents", "datatype": "FP32", "shape": [-1, 2]}]
    assert decoder["outputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
        {"name": "images_uint8", "datatype": "UINT8", "shape": [-1, 1, 8, 8]},
    ]
    scorer = (await client.get("/v2/models/tiny-scorer")).json()
    assert [o["name"] for o in scorer["outputs"]] == [
        "elbo",
        "recon",
        "kl",
        "elbo_bits_per_dim",
        "log_likelihood",
        "bits_per_dim",
        "complexity_bits",  # tiny is uncalibrated: no ood_score, p_value, is_anomaly (tests/service/test_ood_score.py)
    ]
    assert all(o["shape"] == [-1] for o in scorer["outputs"])
    # A plain autoencoder has no likelihood, so no scorer; unknown names and versions list what is served.
    message = assert_v2_error(await client.get("/v2/models/tiny-ae-scorer"), 404, "tiny-ae-encoder", "tiny-scorer")
    assert "tiny-ae-scorer," not in message
    assert_v2_error(await client.get("/v2/models/tiny"), 404, "unknown model 'tiny'")
    assert_v2_error(await client.get("/v2/models/tiny-encoder/versions/2"), 404, "no version '2'")
    assert_v2_error(await client.get("/v2/models/tiny-encoder/versions/2/ready"), 404)


async def test_encoder_binary_both_ways_equals_v1(client) -> None:
    images = images_uint8(5)
    v1 = (await client.post("/v1/encode", files=files(*(png(a[0]) for a in images)))).json()["results"]
    body, headers = binary_request({"images": (images, "UINT8")}, request_id="req-7")
    r = await client.post("/v2/models/tiny-encoder/infer", content=body, headers=headers)
    assert r.headers["content-type"] == "application/octet-stream"
    answer, out = outputs_of(r)
    assert answer["id"] == "req-7" and answer["model_name"] == "tiny-encoder" and answer["model_version"] == "1"
    assert "parameters" not in answer and set(out) == {"mu", "logvar"}  # z only when sampled
    np.testing.assert_allclose(out["mu"], [res["mu"] for res in v1], **TOL)
    np.testing.assert_allclose(out["logvar"], [res["logvar"] for res in v1], **TOL)
    assert out["mu"].shape == (5, 2) and out["mu"].dtype == np.float32


async def test_encoder_samples_with_a_seed_like_v1(client) -> None:
    images = images_uint8(3, seed=10)
    v1 = await client.post(
        "/v1/encode", files=files(*(png(a[0]) for a in images)), data={"sample": "true", "seed": "9"}
    )
    body = json_request({"images": (images, "UINT8")}, {"sample": True, "seed": 9})
    answer, out = outputs_of(await client.post("/v2/models/tiny-encoder/infer", json=body))
    assert answer["parameters"] == {"seed": 9} and answer["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(out["z"], [res["z"] for res in v1.json()["results"]], **TOL)
    # Asking for output z alone samples too, with a fresh seed that the answer gives back.
    body = json_request({"images": (images, "UINT8")}, outputs=[{"name": "z"}])
    answer, out = outputs_of(await client.post("/v2/models/tiny-encoder/infer", json=body))
    assert set(out) == {"z"} and isinstance(answer["parameters"]["seed"], int)


async def test_fp32_images_in_json_equal_v1_pixels(client) -> None:
    images = images_uint8(2, channels=3).astype(np.float32) / 255
    v1 = (await client.post("/v1/encode", json={"pixels": images.tolist(), "model": "tiny-rgb"})).json()["results"]
    body = json_request({"images": (images, "FP32")})
    answer, out = outputs_of(await client.post("/v2/models/tiny-rgb-encoder/infer", json=body))
    np.testing.assert_allclose(out["mu"], [res["mu"] for res in v1], **TOL)
    # Nested data is row-major too.
    body["inputs"][0]["data"] = images.tolist()
    np.testing.assert_allclose(
        outputs_of(await client.post("/v2/models/tiny-rgb-encoder/infer", json=body))[1]["mu"], out["mu"], **TOL
    )


async def test_decoder_equals_v1_pixels_and_pngs(client) -> None:
    latents = np.array([[0.0, 0.0], [1.5, -0.5], [-2.0, 1.0]], dtype=np.float32)
    v1_pixels = (await client.post("/v1/decode", json={"latents": latents.tolist(), "encoding": "pixels"})).json()
    v1_pngs = (await client.post("/v1/decode", json={"latents": latents.tolist()})).json()["images"]
    body, headers = binary_request({"latents": (latents, "FP32")})
    _, out = outputs_of(await client.post("/v2/models/tiny-decoder/infer", content=body, headers=headers))
    np.testing.assert_allclose(out["images"], v1_pixels["pixels"], **TOL)
    assert out["images_uint8"].dtype == np.uint8 and out["images_uint8"].shape == (3, 1, 8, 8)
    expected = np.stack([(decode_png(p).numpy() * 255).round() for p in v1_pngs])
    assert np.abs(out["images_uint8"].astype(int) - expected).max() <= 1
    # One output, as JSON.
    body = json_request({"latents": (latents, "FP32")}, outputs=[{"name": "images_uint8"}])
    answer, out = outputs_of(await client.post("/v2/models/tiny-decoder/infer", json=body))
    assert [o["name"] for o in answer["outputs"]] == ["images_uint8"] and "data" in answer["outputs"][0]
    assert np.abs(out["images_uint8"].astype(int) - expected).max() <= 1


async def test_scorer_equals_v1_score(client) -> None:
    images = images_uint8(3, seed=4)
    v1 = await client.post("/v1/score", files=files(*(png(a[0]) for a in images)), data={"k": "16", "seed": "5"})
    v1 = v1.json()
    body, headers = binary_request({"images": (images, "UINT8")}, parameters={"k": 16, "seed": 5})
    answer, out = outputs_of(await client.post("/v2/models/tiny-scorer/infer", content=body, headers=headers))
    assert answer["parameters"] == {"k": 16, "seed": 5, "binarized": True}
    for name in ("elbo", "recon", "kl", "elbo_bits_per_dim", "log_likelihood", "bits_per_dim"):
        np.testing.assert_allclose(out[name], [res[name] for res in v1["results"]], **TOL, err_msg=name)
    # The scorer takes /v1's parameters with /v1's limits.
    body = json_request({"images": (images, "UINT8")}, {"k": 5000})
    assert_v2_error(await client.post("/v2/models/tiny-scorer/infer", json=body), 400, "k=5000", "VAE_MAX_SCORE_K")


async def test_bad_input_is_a_400_naming_expected_and_got(client) -> None:
    infer = "/v2/models/tiny-encoder/infer"
    images = images_uint8(2)
    body, headers = binary_request({"images": (images, "UINT8")})
    short = body[:-1]
    r = await client.post(infer, content=short, headers=headers)
    assert_v2_error(r, 400, "binary_data_size is 128 bytes", "only 127")
    wrong_size, headers2 = binary_request({"images": (images.reshape(2, 1, 4, 16), "UINT8")})
    assert_v2_error(
        await client.post(infer, content=wrong_size, headers=headers2), 400, "[2, 1, 4, 16]", "[-1, 1, 8, 8]"
    )
    assert_v2_error(
        await client.post(infer, content=body, headers={**headers, HEADER: str(len(body) + 1)}),
        400,
        f"{HEADER} is {len(body) + 1} bytes, longer than the whole body ({len(body)} bytes)",
    )
    r = await client.post(infer, content=body + b"xx", headers=headers)
    assert_v2_error(r, 400, "add up to 128 bytes, but 130 follow")
    # The byte count against shape x datatype.
    bad = json_request({"images": (images, "UINT8")})
    bad["inputs"][0].pop("data")
    bad["inputs"][0]["parameters"] = {"binary_data_size": 100}
    head = json.dumps(bad).encode()
    r = await client.post(infer, content=head + bytes(100), headers={HEADER: str(len(head))})
    assert_v2_error(r, 400, "shape [2, 1, 8, 8] of UINT8 is 128 bytes; got 100 bytes")
    for datatype, fragment in (("FLOAT", "unknown datatype 'FLOAT'"), ("INT32", "takes UINT8 or FP32; got INT32")):
        bad = json_request({"images": (images, datatype)})
        assert_v2_error(await client.post(infer, json=bad), 400, fragment)
    bad = json_request({"images": (images, "UINT8")})
    bad["inputs"][0]["data"] = bad["inputs"][0]["data"][:-1]
    assert_v2_error(await client.post(infer, json=bad), 400, "holds 128 values; data has 127")
    floats = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
    floats[0, 0, 0, 0] = np.nan
    body, headers = binary_request({"images": (floats, "FP32")})
    assert_v2_error(await client.post(infer, content=body, headers=headers), 400, "finite values in [0, 1]")
    latents = np.array([[np.inf, 0.0]], dtype=np.float32)
    body, headers = binary_request({"latents": (latents, "FP32")})
    assert_v2_error(await client.post("/v2/models/tiny-decoder/infer", content=body, headers=headers), 400, "finite")
    wrong_rank = json_request({"latents": (np.zeros((1, 3), np.float32), "FP32")})
    assert_v2_error(await client.post("/v2/models/tiny-decoder/infer", json=wrong_rank), 400, "[1, 3]", "[-1, 2]")
    # Names, parameters and outputs.
    assert_v2_error(
        await client.post(infer, json=json_request({"pixels": (images, "UINT8")})), 400, "no input 'pixels'"
    )
    bad = json_request({"images": (images, "UINT8")}, {"sampel": True})
    assert_v2_error(await client.post(infer, json=bad), 400, "no parameter 'sampel'", "sample, seed")
    bad = json_request({"images": (images, "UINT8")}, {"seed": -1})
    assert_v2_error(await client.post(infer, json=bad), 400, "parameter seed")
    bad = json_request({"images": (images, "UINT8")}, outputs=[{"name": "x_hat"}])
    assert_v2_error(await client.post(infer, json=bad), 400, "no output 'x_hat'", "mu, logvar, z")
    assert_v2_error(await client.post(infer, content=b"{not json"), 400, "not valid JSON")
    assert_v2_error(await client.post(infer, json={"inputs": []}), 400, "inputs")


async def test_limits_apply(settings_for) -> None:
    settings = settings_for(max_images_per_request=4, max_request_bytes=16384)
    async with serve(settings) as (_, client):
        infer = "/v2/models/tiny-encoder/infer"
        body, headers = binary_request({"images": (images_uint8(5), "UINT8")})
        assert_v2_error(await client.post(infer, content=body, headers=headers), 400, "holds 5 items", "VAE_MAX_IMAGES")
        body, headers = binary_request({"images": (images_uint8(4), "UINT8")})
        r = await client.post(infer, content=body + bytes(16384), headers=headers)
        assert_v2_error(r, 413, "VAE_MAX_REQUEST_BYTES")
        values = json_request({"images": (images_uint8(4), "UINT8")})  # 256 values: 2000 are more than any can use
        values["inputs"][0]["data"] = [0] * 2000
        assert_v2_error(await client.post(infer, json=values), 400, "more values", "VAE_MAX_IMAGES_PER_REQUEST")


async def test_errors_keep_each_api_its_body(client) -> None:
    """/v2's errors are {"error"}; /v1's stay {"detail", "code"}, even for the same failure."""
    assert_v2_error(await client.get("/v2/nowhere"), 404)
    assert_v2_error(await client.post("/v2/models/nope-encoder/infer", json={"inputs": []}), 404, "nope-encoder")
    assert_error(await client.post("/v1/decode", json={"latents": [[0.0]]}), 422, "invalid_input", "latent_dim")
    assert_error(await client.get("/v1/nowhere"), 404, "not_found")


async def test_the_api_key_guards_v2_but_not_its_health(settings_for) -> None:
    async with serve(settings_for(api_key="sesame")) as (_, client):
        for path in ("/v2", "/v2/models/tiny-encoder", "/v2/models/tiny-encoder/ready"):
            r = await client.get(path)
            assert_v2_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        r = await client.get("/v2/models/tiny-encoder", headers={"Authorization": "Bearer sesame"})
        assert r.status_code == 200
        assert_error(await client.get("/v1/models"), 401, "unauthorized")


async def test_gzip_bodies_are_read(client) -> None:
    import gzip

    images = images_uint8(2)
    body, headers = binary_request({"images": (images, "UINT8")})
    plain = outputs_of(await client.post("/v2/models/tiny-encoder/infer", content=body, headers=headers))[1]
    r = await client.post(
        "/v2/models/tiny-encoder/infer", content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"}
    )
    np.testing.assert_array_equal(outputs_of(r)[1]["mu"], plain["mu"])
    r = await client.post(
        "/v2/models/tiny-encoder/infer", content=b"\x1f\x8bjunk", headers={**headers, "Content-Encoding": "gzip"}
    )
    assert_v2_error(r, 400, "gzip")


async def test_a_bulk_binary_request_is_one_batched_forward(settings_for) -> None:
    """256 uint8 images in one binary request: one forward pass of 256 (max_batch_size 256), the input converted
    once for the whole batch, the answer the same as the model's on the same pixels."""
    settings = settings_for(max_images_per_request=256, max_batch_size=256)
    async with serve(settings) as (app, client):
        served = app.state.registry.models["tiny"]
        predictor, batcher = served.predictor, served.batcher
        calls: list[tuple[str, int]] = []
        conversions: list[int] = []
        forward, images_tensor = batcher._forward, predictor.images_tensor

        def spy_forward(op, inputs, arg=None):
            calls.append((op, len(next(iter(inputs.values())))))
            return forward(op, inputs, arg)

        def spy_images(array, what="the tensor"):
            conversions.append(len(array))
            return images_tensor(array, what)

        batcher._forward, predictor.images_tensor = spy_forward, spy_images
        images = images_uint8(256)
        body, headers = binary_request({"images": (images, "UINT8")}, outputs=["mu"])
        _, out = outputs_of(await client.post("/v2/models/tiny-encoder/infer", content=body, headers=headers))
    assert calls == [("encode", 256)] and conversions == [256]
    expected = predictor.model.encode(torch.from_numpy(images).float() / 255)[0]
    np.testing.assert_allclose(out["mu"], expected.detach().numpy(), **TOL)


async def test_v2_requests_are_counted_by_route(served) -> None:
    _, client = served
    body, headers = binary_request({"images": (images_uint8(1), "UINT8")})
    assert (await client.post("/v2/models/tiny-encoder/infer", content=body, headers=headers)).status_code == 200
    assert (await client.get("/v2/models/nope")).status_code == 404
    metrics = (await client.get("/metrics")).text
    assert 'vae_http_requests_total{method="POST",path="/v2/models/{model_name}/infer",status="200"} 1.0' in metrics
    assert 'vae_http_requests_total{method="GET",path="/v2/models/{model_name}",status="404"} 1.0' in metrics
    assert 'vae_images_processed_total{model="tiny",op="encode"}' in metrics


async def test_a_raw_binary_body_is_one_item(client) -> None:
    """`Inference-Header-Content-Length: 0`: the body is one item of the model's input, its datatype told by its size,
    and every output comes back as binary data."""
    image = images_uint8(1)
    body, headers = binary_request({"images": (image, "UINT8")})
    expected = outputs_of(await client.post("/v2/models/tiny-encoder/infer", content=body, headers=headers))[1]
    for raw in (image.tobytes(), (image.astype(np.float32) / 255).tobytes()):
        r = await client.post("/v2/models/tiny-encoder/infer", content=raw, headers={HEADER: "0"})
        answer, out = outputs_of(r)
        assert all("binary_data_size" in o["parameters"] for o in answer["outputs"])
        np.testing.assert_allclose(out["mu"], expected["mu"], **TOL)
    r = await client.post("/v2/models/tiny-encoder/infer", content=bytes(100), headers={HEADER: "0"})
    assert_v2_error(r, 400, "one images item [1, 1, 8, 8]: 64 bytes (UINT8) or 256 bytes (FP32); got 100 bytes")
