"""The Open Inference Protocol (v2) over model versions (docs/models.md, docs/protocols.md): a v2 model's versions are
the served model's, every answer names the version that computed it (checked against a direct call of that version),
a request in flight across a reload is answered by the version it started on; and the model repository extension
(index, load, unload) over REST and gRPC, behind the admin key."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from lifecycle_helpers import (
    ADMIN,
    KEY,
    computed_by,
    corrupt_weights,
    hold_across_a_reload,
    put_version,
    seeded_latents,
    settings,
)
from service_helpers import serve, serve_app
from tritonclient.utils import InferenceServerException
from v2_helpers import assert_v2_error, images_uint8, json_request, outputs_of

from model.vae import VAE
from service.main import create_app

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
        in_flight, reload, opened = await hold_across_a_reload(
            app, client, root, weights, lambda: infer(client, "swap-decoder", z)
        )
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


# -- the repository extension over REST --------------------------------------------------------------------------------
INDEX = [
    {"name": "swap-encoder", "version": "1", "state": "READY", "reason": ""},
    {"name": "swap-encoder", "version": "2", "state": "READY", "reason": ""},
    {"name": "swap-decoder", "version": "1", "state": "READY", "reason": ""},
    {"name": "swap-decoder", "version": "2", "state": "READY", "reason": ""},
    {"name": "swap-scorer", "version": "1", "state": "READY", "reason": ""},
    {"name": "swap-scorer", "version": "2", "state": "READY", "reason": ""},
    {"name": "tiny-encoder", "version": "1", "state": "READY", "reason": ""},
    {"name": "tiny-decoder", "version": "1", "state": "READY", "reason": ""},
    {"name": "tiny-scorer", "version": "1", "state": "READY", "reason": ""},
]


@pytest.mark.parametrize("call", ["index", "models/swap/load", "models/swap-encoder/unload"])
async def test_repository_calls_are_404_when_off_and_401_without_the_key(root: Path, call: str) -> None:
    async with serve(settings(root, admin_key=None)) as (_, client):
        assert_v2_error(await client.post(f"/v2/repository/{call}", headers=ADMIN), 404, "admin API is off")
        assert "model_repository" not in (await client.get("/v2")).json()["extensions"]
    async with serve(settings(root, api_key="api")) as (_, client):
        api = {"X-API-Key": "api"}
        assert_v2_error(await client.post(f"/v2/repository/{call}", headers=api), 401, "X-Admin-Key")
        r = await client.post(f"/v2/repository/{call}", headers={**api, "X-Admin-Key": "wrong"})
        assert_v2_error(r, 401, "wrong admin key")
        assert_v2_error(await client.post(f"/v2/repository/{call}", headers=ADMIN), 401, "API key")
        assert "model_repository" in (await client.get("/v2", headers=api)).json()["extensions"]
        assert (await client.post("/v2/repository/index", headers={**api, **ADMIN})).json() == INDEX  # unchanged


async def test_the_index_lists_v2_models_by_version_and_state(root: Path, weights) -> None:
    async with serve(settings(root)) as (_, client):
        for body in ({}, {"content": b""}, {"json": {}}, {"json": {"ready": False, "other": 1}}):
            r = await client.post("/v2/repository/index", headers=ADMIN, **body)
            assert r.status_code == 200 and r.json() == INDEX, r.text
        put_version(root / "later", "1", weights["a"])
        corrupt_weights(put_version(root / "broken", "1", weights["a"]))
        assert (await client.post("/v2/repository/models/broken/load", headers=ADMIN)).status_code == 400
        assert (await client.post("/v2/repository/models/tiny-scorer/unload", headers=ADMIN)).status_code == 200
        rows = (await client.post("/v2/repository/index", headers=ADMIN)).json()
        assert [row for row in rows if row["state"] != "READY"] == [
            {"name": "broken-encoder", "state": "UNAVAILABLE", "reason": rows[0]["reason"]},
            {"name": "broken-decoder", "state": "UNAVAILABLE", "reason": rows[0]["reason"]},
            {"name": "later-encoder", "state": "UNAVAILABLE", "reason": "not loaded"},
            {"name": "later-decoder", "state": "UNAVAILABLE", "reason": "not loaded"},
            {"name": "tiny-encoder", "state": "UNAVAILABLE", "reason": "unloaded"},
            {"name": "tiny-decoder", "state": "UNAVAILABLE", "reason": "unloaded"},
        ]
        assert rows[0]["reason"].startswith("load failed:") and "sha256" in rows[0]["reason"]
        ready = (await client.post("/v2/repository/index", headers=ADMIN, json={"ready": True})).json()
        assert ready == INDEX[:6]
        assert_v2_error(await client.post("/v2/repository/index", headers=ADMIN, json={"ready": "yes"}), 400, "ready")
        assert_v2_error(await client.post("/v2/repository/index", headers=ADMIN, content=b"{"), 400, "JSON")


async def test_load_and_unload_by_base_or_v2_name(root: Path, weights) -> None:
    z = [[0.0, 0.0]]
    async with serve(settings(root)) as (_, client):
        put_version(root / "later", "5", weights["b"])
        r = await client.post("/v2/repository/models/later-decoder/load", headers=ADMIN)
        assert r.status_code == 200 and r.content == b""
        assert answered(await infer(client, "later-decoder", z))[0] == "5"
        assert (await client.get("/v2/models/later-scorer")).status_code == 200  # the whole model loaded
        body = {"parameters": {"unload_dependents": False}}
        r = await client.post("/v2/repository/models/swap-scorer/unload", headers=ADMIN, json=body)
        assert r.status_code == 200 and r.content == b""
        for name in ("swap-encoder", "swap-decoder", "swap-scorer"):
            assert_v2_error(await client.get(f"/v2/models/{name}/ready"), 404, f"unknown model '{name}'")
        assert_v2_error(await client.post("/v2/repository/models/swap/unload", headers=ADMIN), 404, "unloaded")
        assert (await client.post("/v2/repository/models/swap", headers=ADMIN)).status_code == 404  # no such route
        assert (await client.post("/v2/repository/models/swap/load", headers=ADMIN, json={})).status_code == 200
        assert answered(await infer(client, "swap-decoder", z, "1"))[0] == "1"
        # A load of a served model reloads it: a new version in, the old ones untouched.
        put_version(root / "swap", "3", weights["a"])
        assert (await client.post("/v2/repository/models/swap-encoder/load", headers=ADMIN)).status_code == 200
        assert (await client.get("/v2/models/swap-encoder")).json()["versions"] == ["1", "2", "3"]


async def test_repository_refusals(root: Path, weights) -> None:
    async with serve(settings(root)) as (_, client):
        r = await client.post("/v2/repository/models/nothing-encoder/load", headers=ADMIN)
        assert_v2_error(r, 404, "no model folder 'nothing-encoder'", "swap, tiny")
        config = {"parameters": {"config": "{}", "file:1/model.onnx": "AAAA"}}
        r = await client.post("/v2/repository/models/swap/load", headers=ADMIN, json=config)
        assert_v2_error(r, 400, "load takes no parameters ('config', 'file:1/model.onnx' given)", "models_dir")
        r = await client.post("/v2/repository/models/swap/unload", headers=ADMIN, json={"parameters": {"x": 1}})
        assert_v2_error(r, 400, "unload takes no parameter 'x'")
        r = await client.post("/v2/repository/models/swap/unload", headers=ADMIN, json={"parameters": []})
        assert_v2_error(r, 400, "parameters")
        corrupt_weights(put_version(root / "swap", "3", weights["a"]))
        r = await client.post("/v2/repository/models/swap/load", headers=ADMIN)
        assert_v2_error(r, 400, "model 'swap' version '3'", "sha256")
        assert answered(await infer(client, "swap-decoder", [[0.0, 0.0]]))[0] == "2"  # the old versions still serve


# -- real clients: tritonclient.http and tritonclient.grpc -------------------------------------------------------------
@pytest.fixture
def live(root: Path) -> Iterator[dict[str, str]]:
    """uvicorn in a thread over `root` with the admin API on: HTTP on a free port and gRPC on another."""
    app = create_app(settings(root, grpc=True, grpc_port=0))
    with serve_app(app) as port:
        yield {"http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{app.state.grpc_port}"}


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_tritonclient_manages_the_repository_and_infers_on_versions(live: dict[str, str], kind: str, oracles) -> None:
    module: Any = httpclient if kind == "http" else grpcclient
    admin = {"X-Admin-Key": KEY} if kind == "http" else {"x-admin-key": KEY}
    client = module.InferenceServerClient(live[kind])
    try:
        index = client.get_model_repository_index(headers=admin)
        rows = index if kind == "http" else [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models
        ]  # fmt: skip
        assert [(row["name"], row["version"]) for row in rows] == [(row["name"], row["version"]) for row in INDEX]
        with pytest.raises(InferenceServerException, match="admin key"):
            client.unload_model("swap-encoder")
        client.unload_model("swap-encoder", headers=admin, unload_dependents=True)
        assert not client.is_model_ready("swap-decoder")
        client.load_model("swap-decoder", headers=admin)
        assert client.is_model_ready("swap-scorer", "1")
        z = seeded_latents(7)
        tensor = module.InferInput("latents", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array(z, dtype=np.float32))
        result = client.infer("swap-decoder", [tensor], model_version="1")
        version = result.get_response()["model_version"] if kind == "http" else result.get_response().model_version
        assert version == "1" and computed_by(oracles["a"], z, result.as_numpy("images"))
    finally:
        client.close()


async def test_without_an_admin_key_grpc_has_no_repository_methods(root: Path) -> None:
    async with serve(settings(root, admin_key=None, grpc=True, grpc_port=0)) as (app, _):
        async with aioclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}") as client:
            with pytest.raises(InferenceServerException) as info:
                await client.get_model_repository_index(headers={"x-admin-key": KEY})
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            assert "model_repository" not in (await client.get_server_metadata()).extensions
