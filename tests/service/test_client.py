"""service.client.VAEClient builds the requests the API documents and maps errors to VAEServiceError.
(Against a real server it is exercised by the end-to-end test.)"""

from __future__ import annotations

import json

import httpx
import pytest
from service_helpers import digit_like, png

from service.client import VAEClient, VAEServiceError


class Recorder:
    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.response is not None:
            return self.response
        if request.url.params.get("format") == "png":
            return httpx.Response(200, content=png(digit_like(0)), headers={"content-type": "image/png"})
        return httpx.Response(200, json={"ok": True, "images": []})


def client_with(recorder: Recorder, **kw) -> VAEClient:
    http = httpx.Client(transport=httpx.MockTransport(recorder), base_url="http://server")
    return VAEClient(http=http, **kw)


def test_encode_uploads_files_and_form_fields(tmp_path) -> None:
    rec = Recorder()
    path = tmp_path / "digit.png"
    path.write_bytes(png(digit_like(1)))
    with client_with(rec, model="mnist") as vae:
        assert vae.encode([path, png(digit_like(2))], sample=True, seed=3) == {"ok": True, "images": []}
    request = rec.requests[0]
    assert request.method == "POST" and request.url.path == "/v1/encode"
    body = request.content
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert body.count(b'name="image"') == 2
    for field, value in (("sample", b"true"), ("seed", b"3"), ("model", b"mnist")):
        assert f'name="{field}"'.encode() in body and value in body


def test_json_verbs_and_formats() -> None:
    rec = Recorder()
    with client_with(rec, api_key="k") as vae:
        vae.decode([[0.0, 1.0]], encoding="pixels")
        grid = vae.sample(4, seed=1, temperature=0.5, format="png")
        vae.interpolate([0.0, 0.0], [1.0, 1.0], steps=3, path="spherical")
        vae.manifold(5, model="other")
        vae.models()
        vae.model_card("mnist")
    decode, sample, interp, manifold, models, card = rec.requests
    assert json.loads(decode.content) == {"latents": [[0.0, 1.0]], "encoding": "pixels"}
    assert decode.headers["x-api-key"] == "k"
    assert dict(sample.url.params) == {"n": "4", "seed": "1", "temperature": "0.5", "encoding": "png", "format": "png"}
    assert grid.startswith(b"\x89PNG") and VAEClient.to_images(grid)[0].size == (8, 8)
    assert json.loads(interp.content)["latents"] == [[0.0, 0.0], [1.0, 1.0]]
    assert manifold.url.params["model"] == "other" and manifold.url.params["steps"] == "5"
    assert models.url.path == "/v1/models" and card.url.path == "/v1/models/mnist"


def test_errors_carry_status_code_and_detail() -> None:
    body = {"detail": "model 'x' is overloaded; retry later", "code": "overloaded"}
    rec = Recorder(httpx.Response(503, json=body, headers={"Retry-After": "1"}))
    with client_with(rec) as vae, pytest.raises(VAEServiceError) as info:
        vae.score([png(digit_like(0))], k=10)
    assert (info.value.status, info.value.code, info.value.retry_after) == (503, "overloaded", "1")
    assert "retry later" in str(info.value)
