"""HTTP request parsing and response rendering shared by the routes: body limits, JSON or multipart bodies,
image inputs, content negotiation, JSON / PNG / GIF responses, and the disconnect watch."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import orjson
import torch
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import deps, media, multipart
from service.errors import (
    BodyTimeout,
    ClientDisconnected,
    InvalidInput,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.predictor import Tensors, VAEPredictor
from service.registry import ServedModel
from service.schemas import ErrorResponse
from service.settings import Settings

T = TypeVar("T", bound=BaseModel)
Format = Literal["json", "png", "gif"]
JSON = "application/json"
MULTIPART = "multipart/form-data"
# Images up to this many pixels are decoded on the event loop (tens of microseconds); larger ones in a thread.
INLINE_PIXELS = 256 * 256

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "payload cannot be decoded (not an image, truncated, bad base64, malformed multipart)",
        401: "API key missing or wrong (only when the server has one)",
        404: "unknown model",
        406: "the requested response format is not available here",
        408: "the request body did not arrive within body_timeout_s",
        413: "body over max_request_bytes, or an image over max_image_pixels",
        415: "Content-Type is not one this endpoint reads",
        422: "invalid request, or one that does not fit the model or the limits",
        503: "not ready, or overloaded (with Retry-After)",
        504: "no result within request_timeout_s",
    }.items()
}


# -- request bodies ---------------------------------------------------------------------------------------------------
def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refusing more than `max_request_bytes` (by Content-Length first, then while reading) and
    a body still incomplete `body_timeout_s` after the handler started reading it (a client trickling bytes in
    would otherwise hold its connection and buffer for as long as it likes)."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected while sending the body") from None
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {settings.body_timeout_s:g} s ({total} bytes came)",
            headers={"Connection": "close"},  # the rest of the body may still come: this connection is done
        ) from None
    return b"".join(chunks)


def validate(schema: type[T], data: bytes | dict[str, Any]) -> T:
    try:
        if isinstance(data, bytes):  # JSON carries types: strict, so `"seed": false` or `"k": "5"` is a 422
            return schema.model_validate_json(data, strict=True)
        return schema.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


async def read_json(request: Request, schema: type[T], settings: Settings) -> T:
    """A JSON body validated against `schema`; 415 for any other Content-Type."""
    kind = media_type(request)
    if kind != JSON and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"send {JSON} (got {kind or 'no Content-Type'})")
    return validate(schema, await read_json_body(request, settings))


async def read_json_body(request: Request, settings: Settings) -> bytes:
    """A JSON body, refused before parsing when it has more values than any valid request can: parsed, a number
    takes ~50 times its bytes, so a 16 MiB body of them would take ~1 GB. Commas count the values (at most two per
    value, with the arrays around them); base64 has none."""
    body = await read_body(request, settings)
    per_item = deps.registry(request).max_item_values
    limit = 2 * per_item * settings.max_images_per_request + 1024
    if per_item and body.count(b",") > limit:
        raise InvalidInput(f"the JSON body holds more values than a request can use here (at most ~{limit // 2})")
    return body


async def read_images_request(request: Request, schema: type[T], settings: Settings) -> tuple[T, list[bytes]]:
    """A JSON body, or a multipart form whose `image` parts are files and whose other parts are `schema`'s fields
    -> (validated request, uploaded files' bytes). 415 for any other Content-Type."""
    kind = media_type(request)
    if kind == MULTIPART:
        body = await read_body(request, settings)
        limit = settings.max_images_per_request
        uploads: list[bytes] = []
        fields: dict[str, Any] = {}
        for part in multipart.parse(request.headers["content-type"], body, max_parts=limit + 100):
            if part.name == "image":  # a file part, or (curl -F 'image=<f', httpx with no filename) a plain one
                if len(uploads) == limit:
                    raise InvalidInput(f"too many images: at most {limit} per request")
                uploads.append(part.data)
            elif part.filename is not None:
                raise InvalidInput(f"unexpected file field {part.name!r}: upload images as field 'image'")
            elif part.name in fields:
                raise InvalidInput(f"form field {part.name!r} is given twice")
            else:
                fields[part.name] = part.data.decode("utf-8", errors="replace")
        return validate(schema, fields), uploads
    if kind == JSON or kind.endswith("+json"):
        return validate(schema, await read_json_body(request, settings)), []
    raise UnsupportedMediaType(f"send {MULTIPART} (files in field 'image') or {JSON} (got {kind or 'no Content-Type'})")


async def image_inputs(p: VAEPredictor, settings: Settings, uploads: Sequence[bytes], images: Sequence[str] | None,
                       pixels: Sequence[Any] | None, exactly: int | None = None) -> torch.Tensor:  # fmt: skip
    """Uploaded files, base64 images or pixel arrays (one kind per request) -> (N, C, H, W) for model `p`."""
    given = [kind for kind, v in (("multipart files", uploads), ("images", images), ("pixels", pixels)) if v]
    if len(given) > 1:
        raise InvalidInput(f"send images one way per request, not {' and '.join(given)}")
    n = len(uploads) + len(images or ()) + len(pixels or ())
    if exactly is not None and n != exactly:
        raise InvalidInput(f"send exactly {exactly} images (got {n})")
    if n == 0:
        raise InvalidInput("no images: upload files in field 'image', or send 'images' (base64) or 'pixels'")
    if n > settings.max_images_per_request:
        raise InvalidInput(f"too many images: {n} in one request, at most {settings.max_images_per_request}")
    if pixels:
        return torch.stack([p.pixels_tensor(v, f"pixels[{i}]") for i, v in enumerate(pixels)])
    if images:
        datas = [media.b64decode(text, f"images[{i}]") for i, text in enumerate(images)]
        names = [f"images[{i}]" for i in range(n)]
    else:
        datas = list(uploads)
        names = [f"image {i} (upload)" for i in range(n)]
    parts = []
    for data, name in zip(datas, names, strict=True):
        part = inline_input(p, data, settings.max_image_pixels, name)
        if isinstance(part, Image.Image):
            part = await run_in_threadpool(p.image_tensor, part, name)
        parts.append(part)
    return p.stack_images(parts)


def inline_input(p: VAEPredictor, data: bytes, max_pixels: int, what: str) -> np.ndarray | torch.Tensor | Image.Image:
    """One uploaded image -> the model's input, for stack_images, when it is cheap enough for the event loop: an
    8-bit PNG at the model's size and mode by libspng, any image up to INLINE_PIXELS by Pillow. A larger one comes
    back opened but not decoded, for VAEPredictor.image_tensor in a thread."""
    ready = media.ready_png(data, p.input_shape)
    if ready is not None:
        return ready
    image = media.open_image(data, max_pixels, what)
    if image.width * image.height <= INLINE_PIXELS:
        return p.image_input(image, what)
    return image


def fresh_seed() -> int:
    return random.getrandbits(63)


def generator(seed: int) -> torch.Generator:
    """A request's own CPU generator: its draws never depend on what else is in the batch, nor on the device."""
    return torch.Generator(device="cpu").manual_seed(seed)


# -- running ----------------------------------------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    # After the body has been read, the next ASGI message is http.disconnect: when the client goes away, or
    # when the response has been sent (by which time this watch has been cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run(served: ServedModel, request: Request, settings: Settings, op: str, inputs: Tensors,
              arg: Any = None) -> Tensors:  # fmt: skip
    """Submit to the model's batcher; the work is withdrawn if the client disconnects first. Latents far outside
    the prior (finite, but huge) can overflow the decoder: that is the request's fault, a 422, never NaN pixels."""
    out = await served.batcher.submit(
        op, inputs, arg, timeout=settings.request_timeout_s, cancel_on=lambda: _disconnected(request)
    )
    if op == "decode" and not all(bool(torch.isfinite(t).all()) for t in (inputs["z"], out["image"])):
        raise InvalidInput("the latents are too large: they or the decoder's output overflow float32")
    return out


# -- responses --------------------------------------------------------------------------------------------------------
def negotiate(request: Request, fmt: str | None, allowed: tuple[str, ...]) -> str:
    """`format` if given, else the Accept header: 'json' (application/json, */*), 'png' (image/png, image/*),
    'gif' (image/gif); raises NotAcceptable. No Accept header means JSON."""
    if fmt is not None:
        if fmt not in allowed:
            raise NotAcceptable(f"format {fmt!r} is not available here; choose one of {', '.join(allowed)}")
        return fmt
    accept = request.headers.get("accept")
    if not accept:
        return "json"
    ranked = []
    for i, part in enumerate(accept.split(",")):
        media_range, *params = (s.strip() for s in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            ranked.append((-q, i, media_range.lower()))
    for _, _, media_range in sorted(ranked):
        if media_range in (JSON, "*/*", "application/*"):
            return "json"
        if media_range in ("image/png", "image/*") and "png" in allowed:
            return "png"
        if media_range in ("image/gif", "image/*") and "gif" in allowed:
            return "gif"
    types = {"json": JSON, "png": "image/png", "gif": "image/gif"}
    raise NotAcceptable(f"cannot produce {accept!r} here; available: {', '.join(types[f] for f in allowed)}")


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(exclude_none=True), media_type=JSON)


def json_fields_response(fields: dict[str, Any]) -> Response:
    """json_response for a hot route's body given as the fields of its schema, in order and without None, without
    building and validating the pydantic objects first. Model outputs go in as float32 numpy arrays (float32_rows):
    orjson writes each number as the shortest decimal that reads back as the same float32, where Python floats
    would print float64's 17 digits, 8 of them noise. NaN and infinities become null, as in json_response. For a
    256-image encode answer: 1.9 against 6.1 us per image, and 311 against 536 kB (docs/benchmarks.md)."""
    return Response(orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)


def float32_rows(t: torch.Tensor) -> np.ndarray:
    """A (N, ...) CPU float32 tensor as a C-contiguous array, whose rows json_fields_response can write (orjson
    refuses strided arrays; a model's outputs are often column slices of one tensor)."""
    return np.ascontiguousarray(t.numpy())


async def png_response(image: Image.Image) -> Response:
    """One PNG; large ones are compressed in a thread so the event loop keeps serving."""
    if image.width * image.height <= INLINE_PIXELS:
        data = media.png_bytes(image)
    else:
        data = await run_in_threadpool(media.png_bytes, image)
    return Response(data, media_type="image/png")


async def gif_response(frames: list[Image.Image], frame_ms: int) -> Response:
    data = await run_in_threadpool(media.gif_bytes, frames, frame_ms)
    return Response(data, media_type="image/gif")


def image_fields(images: torch.Tensor, encoding: str) -> dict[str, Any]:
    """The `images` (base64 PNGs) or `pixels` field of a JSON response."""
    if encoding == "pixels":
        return {"pixels": images.tolist()}
    return {"images": [media.png_base64(img) for img in VAEPredictor.to_pil(images)]}


# -- OpenAPI ----------------------------------------------------------------------------------------------------------
def _schema(schema: type[BaseModel]) -> dict[str, Any]:
    return schema.model_json_schema(ref_template="#/components/schemas/{model}")


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself (to enforce the size limit first)."""
    return {"requestBody": {"required": True, "content": {JSON: {"schema": _schema(schema)}}}}


def images_body(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that takes JSON or multipart uploads (`image`, repeated) plus form fields."""
    form = _schema(schema)
    props = {k: v for k, v in form.get("properties", {}).items() if k not in ("images", "pixels", "latents")}
    props["image"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "PNG or JPEG files, one part per image"}  # fmt: skip
    multipart = {"type": "object", "properties": props, "required": ["image"]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {"schema": multipart, "encoding": {"image": {"contentType": "image/png, image/jpeg"}}},
                JSON: {"schema": form},
            },
        }
    }


def image_responses(model: type[BaseModel], *types: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering JSON (`model`) or, by negotiation, the given image types."""
    content: dict[str, Any] = {t: {"schema": {"type": "string", "format": "binary"}} for t in types}
    return {200: {"model": model, "content": content}, **ERRORS}
