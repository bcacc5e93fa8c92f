"""service.client.VAEClient builds the requests the API documents and maps errors to VAEServiceError.
(Against a real server it is exercised by the end-to-end test.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import digit_like, png, serve_http

from service.client import VAEClient, VAEServiceError

REPO = Path(__file__).resolve().parents[2]


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


def uploaded_images(request: httpx.Request) -> list[np.ndarray]:
    """The image parts of a recorded multipart request, decoded."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = request.content.split(b"--" + boundary)[1:-1]
    datas = [part.split(b"\r\n\r\n", 1)[1][:-2] for part in parts if b'name="image"' in part]
    return [np.asarray(Image.open(io.BytesIO(data))) for data in datas]


def test_every_kind_of_image_input(tmp_path) -> None:
    """A path (str or Path), a list of paths, bytes, a PIL image, numpy pixels (uint8 or floats in [0, 1], one image
    or a batch, grey or RGB): each uploads the same pixels."""
    grey, rgb = digit_like(1), digit_like(2, channels=3)
    path = tmp_path / "digit.png"
    path.write_bytes(png(grey))
    cases = {
        "str path": (str(path), [grey]),
        "Path": (path, [grey]),
        "list of paths": ([str(path), path], [grey, grey]),
        "bytes": (png(rgb), [rgb]),
        "PIL image": (Image.fromarray(rgb), [rgb]),
        "uint8 (H, W)": (grey, [grey]),
        "uint8 (H, W, 1)": (grey[:, :, None], [grey]),
        "float (H, W, 3)": (rgb / 255.0, [rgb]),
        "uint8 batch (N, H, W)": (np.stack([grey, grey]), [grey, grey]),
        "float batch (N, H, W, 3)": (np.stack([rgb, rgb]).astype(np.float32) / 255, [rgb, rgb]),
        "list of arrays": ([grey, rgb], [grey, rgb]),
    }
    for name, (images, expected) in cases.items():
        rec = Recorder()
        with client_with(rec) as vae:
            vae.encode(images)
        got = uploaded_images(rec.requests[0])
        assert len(got) == len(expected), name
        for g, e in zip(got, expected, strict=True):
            assert np.array_equal(g, e), name


def test_bad_image_inputs_say_what_to_send() -> None:
    with client_with(Recorder()) as vae:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            vae.encode(np.full((8, 8), 2.0))
        with pytest.raises(ValueError, match="shape"):
            vae.encode(np.zeros((2, 2, 8, 8, 1), dtype=np.uint8))
        with pytest.raises(TypeError, match="path, bytes, a PIL image or a numpy array"):
            vae.encode([1.5])


def test_the_module_docstring_runs(settings_for, tmp_path, monkeypatch) -> None:
    """The examples in service.client's docstring, against the tiny models served by uvicorn on a free port."""
    import doctest

    from service import client as client_module

    with serve_http(settings_for()) as url:
        (tmp_path / "digit.png").write_bytes(png(digit_like(1)))
        monkeypatch.chdir(tmp_path)
        real_client = httpx.Client
        monkeypatch.setattr(client_module.httpx, "Client", lambda base_url, **kw: real_client(base_url=url, **kw))
        result = doctest.testmod(client_module, raise_on_error=False, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


def test_score_sends_the_false_positive_rate() -> None:
    rec = Recorder()
    with client_with(rec) as vae:
        vae.score([png(digit_like(0))], k=10, fpr=0.01)
    body = rec.requests[0].content
    assert b'name="fpr"\r\n\r\n0.01' in body and b'name="k"\r\n\r\n10' in body


# -- numpy in, numpy out ---------------------------------------------------------------------------------------------
def tensor_answer(array: np.ndarray, **headers: str) -> httpx.Response:
    head = {
        "content-type": "application/octet-stream",
        "shape": json.dumps(list(array.shape)),
        "dtype": array.dtype.name,
    }
    return httpx.Response(200, content=array.tobytes(), headers={**head, **headers})


def test_array_methods_send_raw_tensors() -> None:
    """uint8 pixels go as they are, (N, C, H, W); float pixels in [0, 1] as float32 in [-1, 1]; the answer's
    `fields` name the arrays of the returned dict."""
    posterior = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    rec = Recorder(tensor_answer(posterior, fields='["mu", "logvar", "z"]'))
    images = np.stack([digit_like(0), digit_like(1)])
    with client_with(rec, model="tiny") as vae:
        got = vae.encode_array(images, sample=True, seed=5)
        vae.encode_array(images[0] / 255.0)
    request, floats = rec.requests
    assert request.url.path == "/v1/encode" and request.headers["content-type"] == "application/octet-stream"
    assert request.headers["accept"] == "application/octet-stream"
    params = dict(request.url.params)
    assert params == {"shape": "2,1,8,8", "dtype": "uint8", "sample": "true", "seed": "5", "posterior": "true",
                      "model": "tiny"}  # fmt: skip
    assert request.content == images.tobytes()
    assert sorted(got) == ["logvar", "mu", "z"] and np.array_equal(got["z"], posterior[:, 2])
    got["mu"][0, 0] = 1.0  # writable copies
    assert dict(floats.url.params)["shape"] == "1,1,8,8" and dict(floats.url.params)["dtype"] == "float32"
    sent = np.frombuffer(floats.content, np.float32).reshape(8, 8)
    np.testing.assert_allclose((sent + 1) / 2, images[0] / 255.0, atol=1e-7)


def test_array_methods_return_channels_last_images() -> None:
    unit = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    rec = Recorder(tensor_answer(unit))
    with client_with(rec) as vae:
        images = vae.decode_array([0.0, 1.0])  # one latent vector
    assert images.shape == (2, 8, 8, 3) and np.array_equal(images, unit.transpose(0, 2, 3, 1))
    params = dict(rec.requests[0].url.params)
    assert params == {"output_type": "pil", "shape": "1,2", "dtype": "float32"}
    grey = np.zeros((2, 8, 8), np.uint8)
    rec = Recorder(tensor_answer(grey))
    with client_with(rec) as vae:
        assert vae.reconstruct_array(grey, dtype="uint8", seed=2).shape == (2, 8, 8)
        with pytest.raises(ValueError, match="float32' or 'uint8'"):
            vae.decode_array([[0.0, 0.0]], dtype="float16")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            vae.encode_array(np.full((8, 8), 2.0))
        with pytest.raises(ValueError, match="shape"):
            vae.score_array(np.zeros((2, 2, 8, 8, 1), np.uint8))
    params = dict(rec.requests[0].url.params)
    assert params == {"seed": "2", "partial_postprocess": "true", "shape": "2,1,8,8", "dtype": "uint8"}


def test_array_helpers_need_numpy_not_torch() -> None:
    code = (
        "import sys, numpy as np; from service import client; "
        "x = client._images_tensor(np.zeros((2, 8, 8), np.uint8)); client._image_options('uint8'); "
        "assert x.shape == (2, 1, 8, 8) and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
