"""Real v2 clients against a real server: tritonclient.http and tritonclient.grpc (live, ready, metadata, inference
with binary data) against uvicorn serving the tiny models on a free port, with the gRPC service on another. Each
answer equals the /v1 JSON answer for the same input (float32 within 1e-5, uint8 within 1)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from service_helpers import decode_png, files, png, serve_app
from tritonclient.utils import InferenceServerException
from v2_helpers import images_uint8

from service.main import create_app

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def server(settings_for) -> Iterator[dict[str, Any]]:
    """uvicorn in a thread, HTTP on a free port and gRPC on another."""
    app = create_app(settings_for(grpc=True, grpc_port=0))
    with serve_app(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as v1:
        yield {"http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{app.state.grpc_port}", "v1": v1}


@pytest.fixture(scope="module", params=["http", "grpc"])
def triton(request, server) -> Iterator[Any]:
    """A tritonclient of each kind, and its module (for InferInput and InferRequestedOutput)."""
    module = httpclient if request.param == "http" else grpcclient
    client = module.InferenceServerClient(server[request.param])
    yield client, module
    client.close()


def infer_input(module: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        tensor.set_data_from_numpy(array, binary_data=True)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def outputs(module: Any, *names: str) -> list[Any]:
    if module is httpclient:
        return [module.InferRequestedOutput(n, binary_data=True) for n in names]
    return [module.InferRequestedOutput(n) for n in names]


def test_health_and_metadata(triton) -> None:
    client, module = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-encoder") and client.is_model_ready("tiny-decoder", "1")
    assert not client.is_model_ready("tiny-ae-scorer")
    as_json = {"as_json": True} if module is grpcclient else {}
    server = client.get_server_metadata(**as_json)
    assert server["name"] == "vae-serve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny-rgb-encoder", **as_json)
    assert meta["name"] == "tiny-rgb-encoder" and meta["versions"] == ["1"]
    images = meta["inputs"][0]
    assert images["name"] == "images" and images["datatype"] == "UINT8"
    assert [int(d) for d in images["shape"]] == [-1, 3, 8, 8]  # gRPC's JSON writes int64s as strings
    assert [o["name"] for o in meta["outputs"]] == ["mu", "logvar", "z"]


def test_encoder_equals_v1(triton, server) -> None:
    client, module = triton
    images = images_uint8(4, seed=20)
    v1 = server["v1"].post(
        "/v1/encode", files=files(*(png(a[0]) for a in images)), data={"sample": "true", "seed": "3"}
    )
    results = v1.json()["results"]
    result = client.infer(
        "tiny-encoder",
        [infer_input(module, "images", images, "UINT8")],
        outputs=outputs(module, "mu", "logvar", "z"),
        request_id="abc",
        parameters={"seed": 3},
    )
    assert result.get_response(**({"as_json": True} if module is grpcclient else {}))["id"] == "abc"
    for name in ("mu", "logvar", "z"):
        np.testing.assert_allclose(result.as_numpy(name), [r[name] for r in results], **TOL, err_msg=name)


def test_fp32_images_and_all_outputs_by_default(triton, server) -> None:
    client, module = triton
    images = images_uint8(2, channels=3).astype(np.float32) / 255
    v1 = server["v1"].post("/v1/encode", json={"pixels": images.tolist(), "model": "tiny-rgb"}).json()["results"]
    result = client.infer("tiny-rgb-encoder", [infer_input(module, "images", images, "FP32")])
    np.testing.assert_allclose(result.as_numpy("mu"), [r["mu"] for r in v1], **TOL)
    assert result.as_numpy("z") is None  # z only when sampled


def test_decoder_equals_v1(triton, server) -> None:
    client, module = triton
    latents = np.array([[0.5, -1.0], [0.0, 2.0]], dtype=np.float32)
    pixels = server["v1"].post("/v1/decode", json={"latents": latents.tolist(), "encoding": "pixels"}).json()
    pngs = server["v1"].post("/v1/decode", json={"latents": latents.tolist()}).json()["images"]
    result = client.infer("tiny-decoder", [infer_input(module, "latents", latents, "FP32")])
    np.testing.assert_allclose(result.as_numpy("images"), pixels["pixels"], **TOL)
    expected = np.stack([(decode_png(p).numpy() * 255).round() for p in pngs])
    assert np.abs(result.as_numpy("images_uint8").astype(int) - expected).max() <= 1


def test_scorer_equals_v1(triton, server) -> None:
    client, module = triton
    images = images_uint8(3, seed=30)
    v1 = server["v1"].post("/v1/score", files=files(*(png(a[0]) for a in images)), data={"k": "8", "seed": "2"})
    results = v1.json()["results"]
    result = client.infer(
        "tiny-scorer", [infer_input(module, "images", images, "UINT8")], parameters={"k": 8, "seed": 2}
    )
    for name in ("elbo", "recon", "kl", "elbo_bits_per_dim", "log_likelihood", "bits_per_dim"):
        np.testing.assert_allclose(result.as_numpy(name), [r[name] for r in results], **TOL, err_msg=name)


def test_errors_reach_the_client(triton) -> None:
    client, module = triton
    images = images_uint8(1)
    with pytest.raises(InferenceServerException, match="unknown model 'tiny-nope'") as info:
        client.infer("tiny-nope", [infer_input(module, "images", images, "UINT8")])
    assert info.value.status() in ("404", "StatusCode.NOT_FOUND")
    wrong = images.reshape(1, 1, 4, 16)
    with pytest.raises(InferenceServerException, match=r"\[1, 1, 4, 16\]; model 'tiny-encoder' takes") as info:
        client.infer("tiny-encoder", [infer_input(module, "images", wrong, "UINT8")])
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
