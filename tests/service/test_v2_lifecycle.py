"""The Open Inference Protocol (v2) over model versions (docs/models.md, docs/protocols.md): a v2 model's versions are
the served model's, every answer names the version that computed it (checked against a direct call of that version),
a request in flight across a reload is answered by the version it started on."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from lifecycle_helpers import ADMIN, computed_by, put_version, seeded_latents, settings
from service_helpers import serve
from tritonclient.utils import InferenceServerException
from v2_helpers import assert_v2_error, images_uint8, json_request, outputs_of

from model.vae import VAE

pytestmark = pytest.mark.anyio


def latents(z: list[list[float]]) -> dict[str, Any]:
    return json_request({"latents": (np.array(z, dtype=np.float32), "FP32")})


async def infer(client: httpx.AsyncClient, model: str, z: list[list[float]], version: str | None = None) -> Any:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return await client.post(path, json=latents(z))


def answered(response: httpx.Response) -> tuple[str, np.ndarray]:
    """A decoder's answer: the version it names and its images."""
    answer, out = outputs_of(response)
    return answer["model_version"], out["images"]


# -- versions ----------------------------------------------------------------------------------------------------------
async def test_a_named_version_answers_and_no_version_is_the_default(root: Path, oracles: dict[str, VAE]) -> None:
    z = seeded_latents(0, n=2)
    async with serve(settings(root)) as (_, client):
        version, images = answered(await infer(client, "swap-decoder", z))
        assert version == "2" and computed_by(oracles["b"], z, images)
        version, images = answered(await infer(client, "swap-decoder", z, "1"))
        assert version == "1" and computed_by(oracles["a"], z, images)
        assert answered(await infer(client, "swap-decoder", z, "2"))[0] == "2"
        assert answered(await infer(client, "tiny-decoder", z))[0] == "1"  # a flat folder is version 1
        encoded, _ = outputs_of(
            await client.post(
                "/v2/models/swap-encoder/versions/1/infer", json=json_request({"images": (images_uint8(1), "UINT8")})
            )
        )
        assert (encoded["model_name"], encoded["model_version"]) == ("swap-encoder", "1")
        metrics = (await client.get("/metrics")).text
        assert 'vae_model_requests_total{model="swap",outcome="ok",version="1"} 2.0' in metrics


async def test_metadata_lists_the_real_versions_and_unknown_ones_are_404s(root: Path, weights) -> None:
    async with serve(settings(root)) as (_, client):
        meta = (await client.get("/v2/models/swap-encoder")).json()
        assert meta["name"] == "swap-encoder" and meta["versions"] == ["1", "2"]
        assert (await client.get("/v2/models/swap-scorer/versions/1")).json()["versions"] == ["1", "2"]
        assert (await client.get("/v2/models/tiny-decoder")).json()["versions"] == ["1"]
        ready = await client.get("/v2/models/swap-decoder/versions/1/ready")
        assert ready.status_code == 200 and ready.json() == {"name": "swap-decoder", "ready": True}
        assert_v2_error(await client.get("/v2/models/swap-encoder/versions/9"), 404, "no version '9'", "versions: 1, 2")
        assert_v2_error(await client.get("/v2/models/swap-decoder/versions/9/ready"), 404, "versions: 1, 2")
        r = await infer(client, "swap-decoder", [[0.0, 0.0]], "9")
        assert_v2_error(r, 404, "model 'swap-decoder' has no version '9'; its versions: 1, 2")
        put_version(root / "swap", "3", weights["a"])
        assert (await client.post("/v1/models/swap/reload", headers=ADMIN)).status_code == 200
        assert (await client.get("/v2/models/swap-decoder")).json()["versions"] == ["1", "2", "3"]
        assert answered(await infer(client, "swap-decoder", [[0.0, 0.0]]))[0] == "3"


async def test_a_plain_autoencoder_version_has_no_scorer(root: Path, ae_checkpoint: Path) -> None:
    """Roles are per version: with an autoencoder as the newest (default) version, swap-scorer is the VAE versions'
    only, and naming none is a 404 that says which to name."""
    put_version(root / "swap", "3", ae_checkpoint)
    async with serve(settings(root)) as (_, client):
        assert (await client.get("/v2/models/swap-encoder")).json()["versions"] == ["1", "2", "3"]
        assert (await client.get("/v2/models/swap-scorer/versions/2")).json()["versions"] == ["1", "2"]
        r = await client.get("/v2/models/swap-scorer")
        assert_v2_error(r, 404, "the default version of 'swap', '3', has no scorer", "versions: 1, 2")
        assert_v2_error(await client.get("/v2/models/swap-scorer/versions/3"), 404, "versions: 1, 2")
        body = json_request({"images": (images_uint8(1), "UINT8")})
        answer, out = outputs_of(await client.post("/v2/models/swap-scorer/versions/2/infer", json=body))
        assert answer["model_version"] == "2" and out["elbo"].shape == (1,)


async def test_a_request_in_flight_across_a_reload_is_answered_by_its_version(root: Path, weights, oracles) -> None:
    """The v2 request holds version 2 and is between that and its batcher when a reload retires version 2: it still
    runs on version 2, whose batcher stops only after it is answered, while new v2 requests get version 3."""
    z = seeded_latents(2)
    async with serve(settings(root)) as (app, client):
        predictor = app.state.registry.models["swap"].predictor
        entered, opened = asyncio.Event(), asyncio.Event()
        real = predictor.decode_request

        async def held(call: Any) -> Any:
            entered.set()
            await opened.wait()
            return await real(call)

        predictor.decode_request = held
        in_flight = asyncio.ensure_future(infer(client, "swap-decoder", z))
        await entered.wait()
        shutil.rmtree(root / "swap" / "2")
        put_version(root / "swap", "3", weights["a"])
        reload = asyncio.ensure_future(client.post("/v1/models/swap/reload", headers=ADMIN))
        while app.state.registry.models["swap"].version != "3":
            await asyncio.sleep(0.001)
        version, images = answered(await infer(client, "swap-decoder", z))
        assert version == "3" and computed_by(oracles["a"], z, images)
        assert_v2_error(await infer(client, "swap-decoder", z, "2"), 404, "versions: 1, 3")
        await asyncio.sleep(0.05)
        assert not reload.done() and not in_flight.done()  # the reload waits for the old version's requests
        opened.set()
        version, images = answered(await in_flight)
        assert version == "2" and computed_by(oracles["b"], z, images)
        assert (await reload).json()["unloaded"] == ["2"]


async def test_grpc_names_versions_as_rest_does(root: Path, oracles) -> None:
    z = seeded_latents(4)
    async with serve(settings(root, grpc=True, grpc_port=0)) as (app, _):
        async with aioclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}") as client:
            tensor = aioclient.InferInput("latents", [1, 2], "FP32")
            tensor.set_data_from_numpy(np.array(z, dtype=np.float32))
            for version, key in (("", "b"), ("1", "a")):
                result = await client.infer("swap-decoder", [tensor], model_version=version)
                assert result.get_response().model_version == (version or "2")
                assert computed_by(oracles[key], z, result.as_numpy("images"))
            assert list((await client.get_model_metadata("swap-decoder")).versions) == ["1", "2"]
            assert await client.is_model_ready("swap-decoder", "1")
            assert not await client.is_model_ready("swap-decoder", "9")
            with pytest.raises(InferenceServerException, match="its versions: 1, 2") as info:
                await client.get_model_metadata("swap-decoder", model_version="9")
            assert info.value.status() == "StatusCode.NOT_FOUND"
