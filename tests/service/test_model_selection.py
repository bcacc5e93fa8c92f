"""Model selection means the same on every verb: `?model=` selects the model on POST endpoints as on GET ones, a query
string and a body (JSON or form field) that name different models are refused, and an unknown query parameter is a
422 naming it, never silently dropped (a wrong model answering 200 is the hazard no fuzzer flags)."""

from __future__ import annotations

from typing import Any

import pytest
from service_helpers import assert_error, digit_like, files, png

pytestmark = pytest.mark.anyio

LATENT = {"tiny": 2, "tiny-rgb": 3}
CHANNELS = {"tiny": 1, "tiny-rgb": 3}


def request_for(verb: str, model: str, body_model: str | None = None, form: bool = False) -> dict[str, Any]:
    """httpx keyword arguments of a valid request of `verb` for `model` (the body names `body_model`, if given)."""
    image = png(digit_like(1, channels=CHANNELS[model]))
    named = {} if body_model is None else {"model": body_model}
    if verb == "decode":
        return {"json": {"latents": [[0.0] * LATENT[model]], **named}}
    if verb == "interpolate":
        if form:
            return {"files": files(image, image), "data": {"steps": "3", **named}}
        return {"json": {"latents": [[0.0] * LATENT[model], [1.0] * LATENT[model]], "steps": 3, **named}}
    fields = {"k": "2"} if verb == "score" else {}
    return {"files": files(image), "data": {**fields, **named}}


POSTS = ["encode", "decode", "reconstruct", "score", "interpolate"]
GETS = {"sample": "n=1&seed=0", "manifold": "steps=2"}


@pytest.mark.parametrize("verb", POSTS)
async def test_the_query_selects_the_model_on_post(client, verb: str) -> None:
    for model in ("tiny-rgb", "tiny"):
        r = await client.post(f"/v1/{verb}?model={model}", **request_for(verb, model))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model


@pytest.mark.parametrize("verb", POSTS)
async def test_the_body_selects_the_model_and_may_agree_with_the_query(client, verb: str) -> None:
    r = await client.post(f"/v1/{verb}", **request_for(verb, "tiny-rgb", body_model="tiny-rgb"))
    assert r.status_code == 200 and r.json()["model"] == "tiny-rgb", r.text
    r = await client.post(f"/v1/{verb}?model=tiny-rgb", **request_for(verb, "tiny-rgb", body_model="tiny-rgb"))
    assert r.status_code == 200 and r.json()["model"] == "tiny-rgb", r.text


@pytest.mark.parametrize(("verb", "form"), [(v, f) for v in POSTS for f in (False, True) if not (f and v == "decode")])
async def test_a_query_and_a_body_that_disagree_are_refused(client, verb: str, form: bool) -> None:
    kwargs = request_for(verb, "tiny", body_model="tiny-rgb", form=form)
    assert_error(await client.post(f"/v1/{verb}?model=tiny", **kwargs), 422, "invalid_input", "tiny-rgb", "once")


@pytest.mark.parametrize("verb", POSTS)
async def test_an_unknown_model_in_the_query_is_a_404(client, verb: str) -> None:
    r = await client.post(f"/v1/{verb}?model=no-such-model", **request_for(verb, "tiny"))
    assert_error(r, 404, "model_not_found", "no-such-model", "tiny-rgb")


@pytest.mark.parametrize("verb", POSTS)
@pytest.mark.parametrize("param", ["modle=tiny", "k=5", "seed=3", "sample=true"])
async def test_an_unknown_query_parameter_on_post_is_named(client, verb: str, param: str) -> None:
    name = param.split("=")[0]  # k is a body field of score: still not a query parameter
    r = await client.post(f"/v1/{verb}?{param}", **request_for(verb, "tiny"))
    assert_error(r, 422, "invalid_request", f"query.{name}")


@pytest.mark.parametrize("verb", list(GETS))
async def test_get_verbs_select_by_query_and_refuse_unknown_parameters(client, verb: str) -> None:
    r = await client.get(f"/v1/{verb}?{GETS[verb]}&model=tiny-rgb&format=json")
    assert r.status_code == 200 and r.json()["model"] == "tiny-rgb", r.text
    assert_error(await client.get(f"/v1/{verb}?{GETS[verb]}&model=nope"), 404, "model_not_found", "nope")
    assert_error(await client.get(f"/v1/{verb}?{GETS[verb]}&modle=tiny-rgb"), 422, "invalid_request", "query.modle")


async def test_a_format_the_endpoint_cannot_produce_is_refused(client) -> None:
    """encode answers JSON or a raw tensor (docs/binary-tensors.md): a PNG is a 406 naming those; a misspelt
    `formt` is an unknown parameter."""
    r = await client.post("/v1/encode?format=png", **request_for("encode", "tiny"))
    assert_error(r, 406, "not_acceptable", "json", "tensor")
    r = await client.post("/v1/encode?formt=json", **request_for("encode", "tiny"))
    assert_error(r, 422, "invalid_request", "query.formt")
