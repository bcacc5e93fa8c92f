"""Model versions and changes at run time (docs/models.md): the layout, `model=NAME@VERSION`, the version named in every
answer, the admin API (reload, load, unload) and its refusals, the watch, and swaps under load that neither drop
nor cross a request: every answer is checked against a direct call of the version it names."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from lifecycle_helpers import (
    ADMIN,
    computed_by,
    corrupt_weights,
    decode,
    hold_across_a_reload,
    put_version,
    seeded_latents,
    settings,
)
from service_helpers import assert_error, digit_like, files, png, serve

from model import checkpoint
from model.vae import VAE
from service.errors import ModelNotFound
from service.registry import IndexEntry, natural_key

pytestmark = pytest.mark.anyio


# -- versions ----------------------------------------------------------------------------------------------------------
async def test_a_flat_folder_is_version_1_and_every_answer_names_its_version(root: Path) -> None:
    async with serve(settings(root)) as (_, client):
        for r in (
            await client.post("/v1/encode", files=files(png(digit_like(0)))),
            await client.get("/v1/sample?n=1&seed=0&format=json"),
            await client.post("/v1/decode", json={"latents": [[0.0, 0.0]]}),
        ):
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["model"], body["version"], r.headers["X-Model-Version"]) == ("tiny", "1", "1")
            assert list(body)[:2] == ["model", "version"]
        r = await client.get("/v1/sample?n=1&seed=0&format=png")
        assert r.headers["content-type"] == "image/png" and r.headers["X-Model-Version"] == "1"


async def test_the_newest_version_is_the_default_and_any_can_be_named(root: Path, oracles: dict[str, VAE]) -> None:
    z = seeded_latents(0)
    async with serve(settings(root)) as (_, client):
        newest, first = await decode(client, "swap", z), await decode(client, "swap@1", z)
        assert newest.json()["version"] == newest.headers["X-Model-Version"] == "2"
        assert computed_by(oracles["b"], z, newest.json()["pixels"])
        assert first.json()["version"] == "1" and computed_by(oracles["a"], z, first.json()["pixels"])
        in_body = await client.post("/v1/decode", json={"latents": z, "model": "swap@1", "encoding": "pixels"})
        assert in_body.json()["version"] == "1" and in_body.json()["pixels"] == first.json()["pixels"]
        form = await client.post("/v1/encode", files=files(png(digit_like(0))), data={"model": "swap@1"})
        assert form.status_code == 200 and form.json()["version"] == "1"


def test_versions_sort_in_natural_order() -> None:
    names = ["v10", "10", "2024-06-10", "9", "v2", "2024-06-09"]
    assert sorted(names, key=natural_key) == ["9", "10", "2024-06-09", "2024-06-10", "v2", "v10"]


async def test_versions_json_pins_the_default(root: Path) -> None:
    (root / "swap" / "versions.json").write_text(json.dumps({"default": "1"}))
    async with serve(settings(root)) as (_, client):
        assert (await decode(client, "swap", [[0.0, 0.0]])).json()["version"] == "1"
        assert (await decode(client, "swap@2", [[0.0, 0.0]])).json()["version"] == "2"


async def test_unknown_models_and_versions_are_404s_naming_what_exists(root: Path) -> None:
    async with serve(settings(root)) as (_, client):
        assert_error(await decode(client, "swap@9", [[0.0, 0.0]]), 404, "model_not_found", "'9'", "versions: 1, 2")
        assert_error(await decode(client, "nope@1", [[0.0, 0.0]]), 404, "model_not_found", "'nope'", "swap, tiny")
        assert_error(await client.get("/v1/models/swap@3"), 404, "model_not_found", "versions: 1, 2")


async def test_the_models_list_shows_every_version_with_its_card(root: Path) -> None:
    async with serve(settings(root)) as (_, client):
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        swap = models["swap"]
        assert swap["version"] == "2" and swap["load_error"] is None
        assert [(v["version"], v["default"]) for v in swap["versions"]] == [("1", False), ("2", True)]
        shas = [v["weights"]["sha256"] for v in swap["versions"]]
        assert shas[0] != shas[1] and all(
            v["card"]["weights"]["sha256"] == s for v, s in zip(swap["versions"], shas, strict=True)
        )
        assert [v["version"] for v in models["tiny"]["versions"]] == ["1"]
        one = (await client.get("/v1/models/swap@1")).json()
        assert one["version"] == "1" and one["weights"]["sha256"] == shas[0]


# -- the admin API: on with a key, refused without it ------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["reload", "load", "unload"])
async def test_admin_calls_are_404_when_off_and_401_without_the_key(root: Path, verb: str) -> None:
    async with serve(settings(root, admin_key=None)) as (_, client):
        r = await client.post(f"/v1/models/swap/{verb}", headers=ADMIN)
        assert_error(r, 404, "not_found", "admin API is off")
    async with serve(settings(root)) as (_, client):
        assert_error(await client.post(f"/v1/models/swap/{verb}"), 401, "unauthorized", "X-Admin-Key")
        r = await client.post(f"/v1/models/swap/{verb}", headers={"X-Admin-Key": "wrong"})
        assert_error(r, 401, "unauthorized", "wrong admin key")
        assert (await decode(client, "swap", [[0.0, 0.0]])).json()["version"] == "2"  # nothing changed


async def test_with_an_api_key_too_admin_calls_need_both(root: Path) -> None:
    async with serve(settings(root, api_key="api")) as (_, client):
        assert_error(await client.post("/v1/models/swap/reload", headers=ADMIN), 401, "unauthorized", "API key")
        r = await client.post("/v1/models/swap/reload", headers={**ADMIN, "X-API-Key": "api"})
        assert r.status_code == 200, r.text


async def test_reload_serves_new_versions_and_drops_removed_ones(root: Path, weights, oracles) -> None:
    z = seeded_latents(1)
    async with serve(settings(root)) as (_, client):
        put_version(root / "swap", "3", weights["a"])
        r = await client.post("/v1/models/swap/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() | {"seconds": 0} == {
            "model": "swap",
            "default_version": "3",
            "versions": ["1", "2", "3"],
            "loaded": ["3"],
            "unloaded": [],
            "seconds": 0,
        }
        answer = (await decode(client, "swap", z)).json()
        assert answer["version"] == "3" and computed_by(oracles["a"], z, answer["pixels"])
        shutil.rmtree(root / "swap" / "1")
        r = await client.post("/v1/models/swap/reload", headers=ADMIN)
        assert (r.json()["loaded"], r.json()["unloaded"], r.json()["versions"]) == ([], ["1"], ["2", "3"])
        assert_error(await decode(client, "swap@1", z), 404, "model_not_found", "versions: 2, 3")
        # Weights replaced under a version's name: that version is reloaded, the others are untouched.
        shutil.rmtree(root / "swap" / "3")
        put_version(root / "swap", "3", weights["b"])
        r = await client.post("/v1/models/swap/reload", headers=ADMIN)
        assert (r.json()["loaded"], r.json()["unloaded"]) == (["3"], ["3"])
        assert computed_by(oracles["b"], z, (await decode(client, "swap", z)).json()["pixels"])


def nan_weights(version: Path) -> None:
    model, card = checkpoint.load(version)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    checkpoint.save(model, card, version)


BAD_FOLDERS = {
    "truncated weights": (lambda swap, w: corrupt_weights(put_version(swap, "3", w["a"])), "version '3'", "sha256"),
    "NaN weights": (lambda swap, w: nan_weights(put_version(swap, "3", w["a"])), "version '3'", "not finite"),
    "versions.json not JSON": (lambda swap, w: (swap / "versions.json").write_text("{"), "not valid JSON"),
    "versions.json names no version": (
        lambda swap, w: (swap / "versions.json").write_text('{"default": "7"}'),
        "'7'",
        "versions: 1, 2",
    ),
    "flat and versioned at once": (
        lambda swap, w: shutil.copy(w["a"] / checkpoint.CARD_FILE, swap / checkpoint.CARD_FILE),
        "use one layout",
    ),
    "a version name with a space": (lambda swap, w: put_version(swap, "v 3", w["a"]), "not a version name"),
    "no versions left": (lambda swap, w: [shutil.rmtree(swap / v) for v in ("1", "2")], "no checkpoint"),
}


@pytest.mark.parametrize("fault", list(BAD_FOLDERS))
async def test_a_folder_that_fails_validation_is_a_422_and_the_old_versions_keep_serving(
    root: Path, weights, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, *fragments = BAD_FOLDERS[fault]
    async with serve(settings(root)) as (app, client):
        make(root / "swap", weights)
        with caplog.at_level(logging.ERROR, logger="vae_serve"):
            r = await client.post("/v1/models/swap/reload", headers=ADMIN)
        body = assert_error(r, 422, "invalid_model", "model 'swap'", *fragments)
        assert "\n" not in body["detail"]
        assert any(body["detail"] in rec.getMessage() and "still serving" in rec.getMessage() for rec in caplog.records)
        assert (await decode(client, "swap", [[0.0, 0.0]])).json()["version"] == "2"
        info = (await client.get("/v1/models/swap")).json()
        assert info["load_error"] == body["detail"] and [v["version"] for v in info["versions"]] == ["1", "2"]
        text = (await client.get("/metrics")).text
        assert 'vae_model_loads_total{model="swap",result="failed"} 1.0' in text
        assert 'vae_model_load_failing{model="swap"} 1.0' in text


async def test_a_fixed_folder_clears_the_error(root: Path, weights) -> None:
    async with serve(settings(root)) as (_, client):
        corrupt_weights(put_version(root / "swap", "3", weights["a"]))
        assert (await client.post("/v1/models/swap/reload", headers=ADMIN)).status_code == 422
        shutil.rmtree(root / "swap" / "3")
        put_version(root / "swap", "3", weights["a"])
        assert (await client.post("/v1/models/swap/reload", headers=ADMIN)).json()["loaded"] == ["3"]
        assert (await client.get("/v1/models/swap")).json()["load_error"] is None
        assert 'vae_model_load_failing{model="swap"} 0.0' in (await client.get("/metrics")).text


async def test_the_rollout_recipe(root: Path, weights, oracles) -> None:
    """docs/models.md's recipe, step by step: flat -> version 1 (nothing reloaded), pin it, v2 in beside it, try v2
    by name, switch the default, retire v1."""
    z = seeded_latents(3)
    folder = root / "tiny"
    async with serve(settings(root)) as (_, client):

        async def reload() -> dict[str, Any]:
            r = await client.post("/v1/models/tiny/reload", headers=ADMIN)
            assert r.status_code == 200, r.text
            return r.json()

        async def answered_by(model: str) -> str:
            body = (await decode(client, model, z)).json()
            assert computed_by(oracles["ab"[body["version"] == "2"]], z, body["pixels"])
            return body["version"]

        (folder / "1").mkdir()
        for name in (checkpoint.WEIGHTS_FILE, checkpoint.CARD_FILE):
            os.replace(folder / name, folder / "1" / name)
        assert (await reload())["loaded"] == []  # the same card: version 1 serves on, untouched
        (folder / "versions.json").write_text('{"default": "1"}')
        put_version(folder, "2", weights["b"])
        change = await reload()
        assert (change["loaded"], change["default_version"]) == (["2"], "1")
        assert (await answered_by("tiny@2"), await answered_by("tiny")) == ("2", "1")
        (folder / "versions.json").write_text('{"default": "2"}')
        change = await reload()
        assert (change["loaded"], change["unloaded"], change["default_version"]) == ([], [], "2")
        assert await answered_by("tiny") == "2"
        shutil.move(folder / "1", root.parent / "archive-1")
        assert (await reload())["unloaded"] == ["1"]
        assert (await answered_by("tiny"), await answered_by(None)) == ("2", "2")


# -- in flight: drained, never moved -----------------------------------------------------------------------------------
class Gate:
    """Holds a batcher's forward passes until opened, and says when the first one has started."""

    def __init__(self, forward: Any) -> None:
        self.forward = forward
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, op: str, inputs: Any, arg: Any = None) -> Any:
        self.entered.set()
        assert self.opened.wait(10), "the gate was never opened"
        return self.forward(op, inputs, arg)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "no forward started"


async def test_a_request_in_flight_finishes_on_the_version_it_started_on(root: Path, weights, oracles) -> None:
    """The request has resolved version 2 and is between that and its batcher when version 2 is retired: it still
    runs on version 2, whose batcher stops only after it is answered, while new requests get version 3."""
    z = seeded_latents(2)
    async with serve(settings(root)) as (app, client):
        in_flight, reload, opened = await hold_across_a_reload(
            app, client, root, weights, lambda: decode(client, "swap", z)
        )
        r = await decode(client, "swap", z)
        assert r.json()["version"] == "3" and computed_by(oracles["a"], z, r.json()["pixels"])
        assert_error(await decode(client, "swap@2", z), 404, "model_not_found")
        await asyncio.sleep(0.05)
        assert not reload.done() and not in_flight.done()  # the reload waits for the old version's requests
        opened.set()
        old = await in_flight
        assert old.status_code == 200 and old.json()["version"] == old.headers["X-Model-Version"] == "2"
        assert computed_by(oracles["b"], z, old.json()["pixels"])
        assert (await reload).json()["unloaded"] == ["2"]


async def test_unload_lets_queued_work_finish_then_answers_404_until_loaded_again(root: Path, oracles) -> None:
    async with serve(settings(root)) as (app, client):
        registry = app.state.registry
        batcher = registry.models["swap"].batcher
        gate = batcher._forward = Gate(batcher._forward)
        batcher._inline_max = 0  # held at the gate on the worker thread, not on the event loop (inline_max_images)
        latents = [seeded_latents(10 + i) for i in range(4)]
        queued = [asyncio.ensure_future(decode(client, "swap", latents[0]))]
        await gate.wait_entered()  # one in the forward, the rest queued behind it
        queued += [asyncio.ensure_future(decode(client, "swap", z)) for z in latents[1:]]
        while batcher.queued_images < len(latents) - 1:
            await asyncio.sleep(0.001)
        unload = asyncio.ensure_future(client.post("/v1/models/swap/unload", headers=ADMIN))
        while "swap" in registry.models:
            await asyncio.sleep(0.001)
        assert_error(await decode(client, "swap", latents[0]), 404, "model_not_found", "'swap' is not loaded")
        gate.opened.set()
        for z, r in zip(latents, await asyncio.gather(*queued), strict=True):
            assert (
                r.status_code == 200 and r.json()["version"] == "2" and computed_by(oracles["b"], z, r.json()["pixels"])
            )
        done = (await unload).json()
        assert (done["default_version"], done["versions"], done["unloaded"]) == (None, [], ["1", "2"])
        assert_error(await client.post("/v1/models/swap/unload", headers=ADMIN), 404, "model_not_found", "unloaded")
        assert [m["name"] for m in (await client.get("/v1/models")).json()["models"]] == ["tiny"]
        assert (await client.post("/v1/models/swap/load", headers=ADMIN)).json()["versions"] == ["1", "2"]
        assert (await decode(client, "swap", latents[0])).json()["version"] == "2"


async def test_unloaded_versions_leave_nothing_holding_their_weights(root: Path) -> None:
    async with serve(settings(root)) as (app, client):
        registry = app.state.registry
        held = [weakref.ref(served.predictor.model) for served in registry.states["swap"].versions.values()]
        await decode(client, "swap@1", [[0.0, 0.0]])
        await decode(client, "swap@2", [[0.0, 0.0]])
        assert (await client.post("/v1/models/swap/unload", headers=ADMIN)).status_code == 200
        gc.collect()
        assert [ref() for ref in held] == [None, None]


async def test_load_takes_a_new_folder_and_refuses_names_that_are_not_one(root: Path, weights) -> None:
    async with serve(settings(root)) as (app, client):
        put_version(root / "later", "1", weights["b"])
        assert (await client.post("/v1/models/later/load", headers=ADMIN)).json()["versions"] == ["1"]
        assert (await decode(client, "later", [[0.0, 0.0]])).json()["model"] == "later"
        r = await client.post("/v1/models/nothing/load", headers=ADMIN)
        assert_error(r, 404, "model_not_found", "no model folder 'nothing'", "later, swap, tiny")
        assert_error(await client.post("/v1/models/nothing/reload", headers=ADMIN), 404, "model_not_found")
        for name in ("..", ".hidden", "a@1"):
            with pytest.raises(ModelNotFound):
                await app.state.registry.load(name)


async def test_concurrent_changes_of_one_model_run_one_at_a_time(root: Path, weights, monkeypatch) -> None:
    async with serve(settings(root)) as (app, client):
        registry = app.state.registry
        active, most = 0, 0
        real = registry._sync

        async def spy(state: Any) -> Any:
            nonlocal active, most
            active += 1
            most = max(most, active)
            try:
                await asyncio.sleep(0.01)
                return await real(state)
            finally:
                active -= 1

        monkeypatch.setattr(registry, "_sync", spy)
        put_version(root / "swap", "3", weights["a"])
        calls = [client.post("/v1/models/swap/reload", headers=ADMIN) for _ in range(4)]
        answers = await asyncio.gather(*calls, client.post("/v1/models/swap/load", headers=ADMIN))
        assert [r.status_code for r in answers] == [200] * 5 and most == 1
        assert sorted(len(r.json()["loaded"]) for r in answers) == [0, 0, 0, 0, 1]  # version 3 was loaded once


# -- the proof: swaps under load ---------------------------------------------------------------------------------------
async def test_swaps_under_load_drop_and_cross_no_request(root: Path, weights, oracles) -> None:
    """16 clients send seeded decodes of `swap` while its version changes 12 times (a new version in, the oldest
    out, reload): every answer is 200 and equals a direct call of the version it names, in its field and header."""
    clients, swaps = 16, 12
    held_by = {"1": "a", "2": "b"}
    answers: list[tuple[list[list[float]], httpx.Response]] = []
    done = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, n: int) -> None:
        i = 0
        while not done.is_set():
            z = seeded_latents(n * 10_000 + i)
            answers.append((z, await decode(client, "swap", z)))
            i += 1

    async with serve(settings(root)) as (_, client):
        load = [asyncio.ensure_future(client_loop(client, n)) for n in range(clients)]
        for version in range(3, 3 + swaps):
            held_by[str(version)] = "ab"[version % 2]
            put_version(root / "swap", str(version), weights[held_by[str(version)]])
            shutil.rmtree(root / "swap" / str(version - 2))
            r = await client.post("/v1/models/swap/reload", headers=ADMIN)
            assert r.json()["loaded"] == [str(version)] and r.json()["unloaded"] == [str(version - 2)]
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.gather(*load)
        metrics = (await client.get("/metrics")).text

    failed = [r for _, r in answers if r.status_code != 200]
    named = [(z, r.json(), r.headers["X-Model-Version"]) for z, r in answers if r.status_code == 200]
    mislabelled = [body["version"] for _, body, header in named if body["version"] != header]
    right = [computed_by(oracles[held_by[body["version"]]], z, body["pixels"]) for z, body, _ in named]
    crossed = [
        body["version"]
        for (z, body, _), ok in zip(named, right, strict=True)
        if not ok and computed_by(oracles["ba"[held_by[body["version"]] == "b"]], z, body["pixels"])
    ]
    assert (len(failed), right.count(False), len(crossed), len(mislabelled)) == (0, 0, 0, 0)
    assert len({body["version"] for _, body, _ in named}) >= 6, "the load did not span the swaps"
    assert f'vae_model_requests_total{{model="swap",outcome="ok",version="{2 + swaps}"}}' in metrics
    assert 'version="3"' not in metrics  # long retired: its series is gone (metrics.RETIRED_KEPT bounds them)


# -- the watch and the index -------------------------------------------------------------------------------------------
async def until(predicate: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_the_watch_reloads_changed_folders_and_loads_new_ones(root: Path, weights) -> None:
    async with serve(settings(root, watch_models_s=0.05)) as (app, client):

        async def version_of(model: str) -> str | None:
            r = await decode(client, model, [[0.0, 0.0]])
            return r.json()["version"] if r.status_code == 200 else None

        put_version(root / "swap", "3", weights["a"])
        await until(lambda: _is(version_of("swap"), "3"))
        put_version(root / "fresh", "7", weights["b"])
        await until(lambda: _is(version_of("fresh"), "7"))
        corrupt_weights(put_version(root / "swap", "4", weights["a"]))  # e.g. a copy still in progress
        await until(lambda: _has_error(app, "swap"))
        assert await version_of("swap") == "3"
        await client.post("/v1/models/fresh/unload", headers=ADMIN)
        (root / "fresh" / "versions.json").write_text('{"default": "7"}')
        await asyncio.sleep(0.2)
        assert await version_of("fresh") is None  # unloaded on purpose: the watch leaves it alone


async def _is(value: Any, expected: Any) -> bool:
    return await value == expected


async def _has_error(app: Any, model: str) -> bool:
    return app.state.registry.states[model].error is not None


async def test_the_index_lists_every_model_folder_and_version_with_its_state(root: Path, weights) -> None:
    async with serve(settings(root)) as (app, client):
        registry = app.state.registry
        put_version(root / "later", "1", weights["a"])
        corrupt_weights(put_version(root / "broken", "1", weights["a"]))
        await client.post("/v1/models/broken/load", headers=ADMIN)
        await client.post("/v1/models/tiny/unload", headers=ADMIN)
        assert registry.index() == [
            IndexEntry("broken", "", "UNAVAILABLE", f"load failed: {registry.states['broken'].error}"),
            IndexEntry("later", "", "UNAVAILABLE", "not loaded"),
            IndexEntry("swap", "1", "READY"),
            IndexEntry("swap", "2", "READY"),
            IndexEntry("tiny", "", "UNAVAILABLE", "unloaded"),
        ]
        assert "sha256" in registry.index()[0].reason
