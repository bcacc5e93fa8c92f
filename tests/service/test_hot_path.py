"""The hot path's shortcuts give exactly what the general code gives: uploads already at the model's mode and size
skip pil_to_tensor's tensor ops but not its result, the encode answer is the schema's JSON with the model's float32
numbers exactly, and simple multipart headers parse as python-multipart parses them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from python_multipart.multipart import parse_options_header
from service_helpers import assert_error, digit_like, files, png

from model import preprocess
from service import media, rendering
from service.multipart import SIMPLE_DISPOSITION
from service.predictor import float32_rows
from service.rendering import json_response
from service.schemas import Answer, EncodeResponse

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("channels", [1, 3])
def test_ready_pixels_scale_exactly_as_pil_to_tensor(channels: int) -> None:
    rng = np.random.default_rng(channels)
    arrays = [rng.integers(0, 256, size=(16, 16, channels), dtype=np.uint8) for _ in range(3)]
    arrays[0].reshape(-1)[:256] = np.arange(256)  # every byte value
    images = [Image.fromarray(a[:, :, 0] if channels == 1 else a) for a in arrays]
    shape = (channels, 16, 16)
    expected = torch.stack([preprocess.pil_to_tensor(im, shape) for im in images])
    got = preprocess.unit_floats(np.stack([preprocess.ready_pixels(im, shape) for im in images]))
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)


def test_ready_pixels_only_when_nothing_to_convert() -> None:
    grey = Image.fromarray(digit_like(0))  # 8x8 "L"
    assert preprocess.ready_pixels(grey, (1, 8, 8)) is not None
    assert preprocess.ready_pixels(grey, (1, 16, 16)) is None  # needs a resize
    assert preprocess.ready_pixels(grey, (3, 8, 8)) is None  # needs a mode conversion
    assert preprocess.ready_pixels(grey.convert("LA"), (1, 8, 8)) is None  # transparency to composite


def png_bytes(array: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 3]), st.integers(0, 9), st.booleans())
def test_ready_png_gives_pillows_pixels(seed: int, channels: int, level: int, smooth: bool) -> None:
    """Any 8-bit grey or RGB PNG at the model's size decodes by libspng to the bytes Pillow reads, whatever the
    compression level and the per-row filters the encoder picked (smooth images draw the Sub/Up/Paeth filters)."""
    rng = np.random.default_rng(seed)
    shape = (12, 9, channels)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if smooth:
        a = np.cumsum(a // 16, axis=0, dtype=np.uint8)
    data = png_bytes(a[:, :, 0] if channels == 1 else a, compress_level=level)
    got = media.ready_png(data, (channels, 12, 9))
    assert got is not None and got.dtype == np.uint8
    expected = preprocess.ready_pixels(media.load_image(media.open_image(data, 10**6)), (channels, 12, 9))
    assert np.array_equal(got, expected)


def test_ready_png_leaves_everything_else_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    grey = digit_like(0)  # 8x8
    good = png_bytes(grey)
    assert media.ready_png(good, (1, 8, 8)) is not None
    assert media.ready_png(png_bytes(grey, transparency=7), (1, 8, 8)) is not None  # tRNS is not applied to "L"
    assert media.ready_png(good, (1, 16, 16)) is None  # needs a resize
    assert media.ready_png(good, (3, 8, 8)) is None  # needs a mode conversion
    assert media.ready_png(png_bytes(np.stack([grey] * 3, axis=-1)), (1, 8, 8)) is None
    assert media.ready_png(png_bytes(grey.astype(np.uint16) * 257), (1, 8, 8)) is None  # 16-bit
    assert media.ready_png(png_bytes(grey, bits=4), (1, 8, 8)) is None  # palette
    assert media.ready_png(png_bytes(np.stack([grey, grey], -1), optimize=True), (1, 8, 8)) is None  # LA
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG")
    assert media.ready_png(jpeg.getvalue(), (1, 8, 8)) is None
    for cut in (0, 8, 20, 33, len(good) - 12, len(good) - 1):
        assert media.ready_png(good[:cut], (1, 8, 8)) is None, cut
    for flip in range(8, len(good)):  # any flipped byte after the signature: a checksum catches it
        corrupt = bytearray(good)
        corrupt[flip] ^= 0x40
        got = media.ready_png(bytes(corrupt), (1, 8, 8))
        assert got is None or np.array_equal(got[:, :, 0], grey), flip
    monkeypatch.setattr(media, "pyspng", None)
    assert media.ready_png(good, (1, 8, 8)) is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["L", "RGB"]), st.integers(1, 70), st.integers(1, 70))
def test_answer_pngs_read_back_exactly_by_pillow_and_libspng(seed: int, mode: str, height: int, width: int) -> None:
    """The answers' own PNG writer (media.png_bytes): any 8-bit grey or RGB image comes back byte for byte through
    Pillow and through libspng, which checks every chunk's CRC and the zlib stream's checksum."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(height, width, 3) if mode == "RGB" else (height, width), dtype=np.uint8)
    data = media.png_bytes(Image.fromarray(a))
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == mode and np.array_equal(np.asarray(back), a)
    assert media.pyspng is not None
    assert np.array_equal(media.pyspng.load(data).reshape(a.shape), a)


def test_answer_pngs_of_other_modes_go_through_pillow() -> None:
    image = Image.fromarray(digit_like(1)).convert("P")
    assert Image.open(io.BytesIO(media.png_bytes(image))).mode == "P"


async def test_corrupt_png_at_the_models_size_is_still_a_400(client) -> None:
    data = bytearray(png_bytes(digit_like(3)))
    data[len(data) // 2] ^= 0xFF
    assert_error(await client.post("/v1/encode", files=files(bytes(data))), 400, "invalid_payload")


async def test_mixed_uploads_keep_their_order(client, tiny_model) -> None:
    """Uploads at the model's size (fast path) and others (pil_to_tensor) in one request, in order."""
    small, large = digit_like(1), np.kron(digit_like(2), np.ones((2, 2), dtype=np.uint8))
    r = await client.post("/v1/encode", files=files(png(small), png(large), png(small)))
    assert r.status_code == 200, r.text
    x = torch.stack([preprocess.pil_to_tensor(Image.fromarray(a), (1, 8, 8)) for a in (small, large, small)])
    mu, _ = tiny_model.encode(x)
    torch.testing.assert_close(torch.tensor([res["mu"] for res in r.json()["results"]]), mu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", [{}, {"sample": "true", "seed": "3"}])
async def test_encode_answer_is_the_schema_json(client, form: dict[str, str]) -> None:
    r = await client.post("/v1/encode", files=files(png(digit_like(0)), png(digit_like(1))), data=form)
    assert r.status_code == 200, r.text
    parsed = EncodeResponse.model_validate_json(r.content)
    assert json.loads(r.content) == json.loads(parsed.model_dump_json(exclude_none=True))  # same fields and values
    assert [len(res.z or ()) for res in parsed.results] == [parsed.latent_dim if form else 0] * 2


def test_float32_rows_are_written_at_float32_precision() -> None:
    """Every number reads back as exactly the float32 it came from, in no more digits than that needs (never
    float64's 17); NaN and infinities are null, as pydantic's inf_nan_mode="null" writes them elsewhere."""
    rng = np.random.default_rng(0)
    scaled = rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 8, 2000)
    edges = [0.3, 1 / 3, -0.0, 1e-45, 3.4e38, np.nan, np.inf, -np.inf]
    values = np.concatenate([scaled, edges]).astype(np.float32)
    wide = torch.from_numpy(values.reshape(-1, 2))
    rows = float32_rows(wide[:, 1])  # a column slice: strided, as a model's mu is
    body = json.loads(json_response(Answer({"results": [{"v": r} for r in rows]})).body)
    got = [res["v"] for res in body["results"]]
    finite = np.isfinite(values[1::2])
    assert [v is None for v in got] == list(~finite)
    parsed = np.array([v for v in got if v is not None], dtype=np.float32)
    assert np.array_equal(parsed, values[1::2][finite])
    numbers = bytes(json_response(Answer({"v": rows})).body).decode().removeprefix('{"v":[').removesuffix("]}")
    assert max(significant_digits(t) for t in numbers.split(",")) <= 9


def significant_digits(number: str) -> int:
    return len(number.lstrip("-").split("e")[0].replace(".", "").strip("0"))


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(codec="latin-1", exclude_characters='"\\\r\n'), max_size=12),
    st.one_of(st.none(), st.text(st.characters(codec="latin-1", exclude_characters='"\\\r\n'), max_size=12)),
)
def test_simple_content_disposition_parses_as_python_multipart(name: str, filename: str | None) -> None:
    header = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
    raw = header.encode("latin-1")
    match = SIMPLE_DISPOSITION.fullmatch(raw)
    assert match is not None
    params = parse_options_header(raw)[1]
    assert match.group(1, 2) == (params[b"name"], params.get(b"filename"))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_numpy_rendering_gives_the_torch_paths_bytes(channels: int, n: int) -> None:
    """rendering.to_pil and grid quantise in numpy; every pixel as model.preprocess's tensor_to_pil and make_grid
    give it, exact halves (k + 0.5) / 255, values outside [0, 1] and padding included."""
    g = torch.Generator().manual_seed(n * channels)
    images = torch.rand(n, channels, 6, 5, generator=g) * 1.2 - 0.1
    ties = min(64, images.numel())
    images.view(-1)[:ties] = (torch.arange(ties) + 0.5) / 255.0  # ties: rounded half to even in both
    for image, expected in zip(rendering.to_pil(images), images, strict=True):
        assert image.tobytes() == preprocess.tensor_to_pil(expected).tobytes()
    for nrow, padding in [(None, 2), (2, 0), (3, 1)]:
        got = rendering.grid(images, nrow, padding)
        if n == 1:
            want = preprocess.tensor_to_pil(images[0])
        else:
            rows = nrow or int(np.ceil(np.sqrt(n)))
            want = preprocess.tensor_to_pil(preprocess.make_grid(images, nrow=rows, padding=padding))
        assert (got.mode, got.size, got.tobytes()) == (want.mode, want.size, want.tobytes())


@pytest.mark.parametrize("channels", [1, 3])
def test_json_answer_pngs_hold_the_torch_paths_pixels(channels: int) -> None:
    """A JSON answer's `images` are written from the quantised pixels with no PIL image between: each decodes to
    model.preprocess's tensor_to_pil of its image, mode and pixels."""
    g = torch.Generator().manual_seed(channels)
    images = torch.rand(3, channels, 7, 4, generator=g) * 1.2 - 0.1
    encoded = rendering.image_fields(images, "png")["images"]
    assert len(encoded) == 3
    for text, image in zip(encoded, images, strict=True):
        back, want = Image.open(io.BytesIO(base64.b64decode(text))), preprocess.tensor_to_pil(image)
        assert (back.format, back.mode, back.size, back.tobytes()) == ("PNG", want.mode, want.size, want.tobytes())
