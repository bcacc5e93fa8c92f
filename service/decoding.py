"""Request decoding: an HTTP request -> a Call (schemas.Call), the one place that reads bodies and query strings.

    body        Content-Type -> JSON, or a multipart form (files in field `image`, the other fields as form fields),
                or a raw body (a tensor with `shape` and `dtype` in the query, or one image file: Hugging Face's
                remote-VAE convention, docs/binary-tensors.md), under max_request_bytes and body_timeout_s
    validation  the endpoint's schema, strict for JSON; the query string's model (unknown names are a 422)
    model       `?model=` or the body's `model`: one model, named once or twice alike
    images      multipart uploads, or the JSON's base64 `images`, as encoded bytes in order (one kind per request)
    limits      counts and sizes against the server's settings, each error naming the setting that raises it
    format      the response format from `?format=` or the Accept header (406 before any work is done)

Nothing here knows a model's shapes: VAEPredictor.decode_request checks the Call against the model it is for.
"""

from __future__ import annotations

import asyncio
import functools
import math
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service import media, multipart
from service.errors import (
    BodyTimeout,
    ClientDisconnected,
    InvalidInput,
    InvalidPayload,
    LimitExceeded,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
    limit_hint,
)
from service.schemas import (
    Call,
    DecodeRequest,
    DecodeTensorQuery,
    EncodeRequest,
    EncodeTensorQuery,
    Format,
    ImageTensorQuery,
    InterpolateRequest,
    ManifoldRequest,
    ModelFormatQuery,
    ModelQuery,
    ReconstructRequest,
    ReconstructTensorQuery,
    SampleRequest,
    ScoreRequest,
    ScoreTensorQuery,
    TensorQuery,
)
from service.settings import Settings

T = TypeVar("T", bound=BaseModel)
Q = TypeVar("Q", bound=ModelQuery)
JSON = "application/json"
MULTIPART = "multipart/form-data"
OCTET_STREAM = "application/octet-stream"
TENSOR_TYPES = (OCTET_STREAM, "tensor/binary")  # a raw tensor body; diffusers' remote_decode sends tensor/binary
IMAGE_TYPES = ("image/png", "image/jpeg")  # a raw body that is one image file
MEDIA_TYPES = {
    "json": JSON,
    "png": "image/png",
    "gif": "image/gif",
    "jpeg": "image/jpeg",
    "tensor": f"{OCTET_STREAM} (or tensor/binary)",
}
# The endpoints that take a raw body, each with the query model that carries its options then.
TENSOR_QUERIES: dict[type[BaseModel], type[TensorQuery]] = {
    EncodeRequest: EncodeTensorQuery,
    DecodeRequest: DecodeTensorQuery,
    ReconstructRequest: ReconstructTensorQuery,
    ScoreRequest: ScoreTensorQuery,
}
# Wire dtypes (little-endian); bfloat16 arrives as its 16 bits and is widened to float32 here (numpy has no bfloat16).
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
}
REPEATABLE = frozenset({"shape"})  # query parameters that may be given more than once (a list, as `requests` sends)
# Per schema: the field capped by a setting, and what it counts.
LIMITS: dict[type[BaseModel], tuple[str, str, str]] = {
    SampleRequest: ("n", "max_sample_n", "images per call"),
    ScoreRequest: ("k", "max_score_k", "importance samples"),
    InterpolateRequest: ("steps", "max_interpolate_steps", "frames"),
    ManifoldRequest: ("steps", "max_manifold_steps", "per side"),
}


# -- the entry points, one per kind of endpoint ----------------------------------------------------------------------
async def images_call(
    request: Request, schema: type[T], settings: Settings, formats: tuple[Format, ...] = ("json",)
) -> Call[T]:
    """A JSON body or a multipart form whose `image` parts are files and whose other parts are `schema`'s fields,
    or a raw body (raw_call) where `schema` takes one; 415 for any other Content-Type. The query string takes
    `model`, and `format` when there is more than one format."""
    kind = media_type(request)
    if schema in TENSOR_QUERIES and (not kind or kind in TENSOR_TYPES or kind in IMAGE_TYPES):
        return await raw_call(request, schema, settings, formats)
    query = read_query(request, ModelFormatQuery if len(formats) > 1 else ModelQuery)
    fmt = negotiate(request, query, formats)
    if kind == MULTIPART:
        params, files = await read_form(request, schema, settings)
        names = [f"image {i} (upload)" for i in range(len(files))]
    elif kind == JSON or kind.endswith("+json"):
        params = validate(schema, await read_json_body(request, settings))
        encoded: list[str] = getattr(params, "images", None) or []
        files = [media.b64decode(text, f"images[{i}]") for i, text in enumerate(encoded)]
        names = [f"images[{i}]" for i in range(len(files))]
    else:
        raw = f", a raw tensor ({OCTET_STREAM}), one image file" if schema in TENSOR_QUERIES else ""
        raise UnsupportedMediaType(
            f"send {MULTIPART} (files in field 'image'){raw} or {JSON} (got {kind or 'no Content-Type'})"
        )
    pixels = getattr(params, "pixels", None) or []
    given = [
        what
        for what, items in (("multipart files" if kind == MULTIPART else "images", files), ("pixels", pixels))
        if items
    ]
    if len(given) > 1:
        raise InvalidInput(f"send images one way per request, not {' and '.join(given)}")
    count = len(files) + len(pixels)
    if count > settings.max_images_per_request:
        raise LimitExceeded(
            f"too many images: {count} in one request, at most {settings.max_images_per_request}",
            "max_images_per_request",
        )
    return finish(Call(params, fmt, files, names), query, settings)


async def json_call(
    request: Request, schema: type[T], settings: Settings, formats: tuple[Format, ...] = ("json",)
) -> Call[T]:
    """A JSON body validated against `schema`, or a raw tensor body (raw_call) where `schema` takes one; 415 for
    any other Content-Type. The query string as images_call's."""
    kind = media_type(request)
    if schema in TENSOR_QUERIES and (not kind or kind in TENSOR_TYPES):
        return await raw_call(request, schema, settings, formats)
    query = read_query(request, ModelFormatQuery if len(formats) > 1 else ModelQuery)
    fmt = negotiate(request, query, formats)
    if kind != JSON and not kind.endswith("+json"):
        raw = f" or a raw tensor ({OCTET_STREAM})" if schema in TENSOR_QUERIES else ""
        raise UnsupportedMediaType(f"send {JSON}{raw} (got {kind or 'no Content-Type'})")
    params = validate(schema, await read_json_body(request, settings))
    if isinstance(params, DecodeRequest) and len(params.latents) > settings.max_images_per_request:
        raise LimitExceeded(
            f"too many latents: {len(params.latents)}, at most {settings.max_images_per_request}",
            "max_images_per_request",
        )
    return finish(Call(params, fmt), query, settings)


async def raw_call(request: Request, schema: type[T], settings: Settings, formats: tuple[Format, ...]) -> Call[T]:
    """A raw body, Hugging Face's remote-VAE convention (docs/binary-tensors.md): a tensor whose `shape` and `dtype`
    are in the query string (Content-Type application/octet-stream, tensor/binary or none), or, where the endpoint
    takes images, one PNG or JPEG file (Content-Type image/png, image/jpeg, or none and no `shape`). The endpoint's
    options come from the query string too (schema's TensorQuery). A tensor in the wire's conventions becomes one in
    the service's: float images in [-1, 1] -> [0, 1], latents (N, latent_dim, 1, 1) -> (N, latent_dim), divided by
    `scaling_factor` and shifted by `shift_factor` (diffusers' latent scaling)."""
    query = read_query(request, TENSOR_QUERIES[schema])
    fmt = negotiate(request, query, formats, raw_default(query))
    kind = media_type(request)
    takes_images = schema is not DecodeRequest
    described = query.shape is not None or query.dtype is not None
    files: list[bytes] = []
    tensor = None
    if kind in IMAGE_TYPES or (takes_images and not kind and not described):
        if described:
            raise InvalidInput(f"shape and dtype describe a raw tensor, not an image file (Content-Type {kind})")
        files = [await read_body(request, settings)]
    else:
        if query.shape is None or query.dtype is None:
            missing = " and ".join(name for name in ("shape", "dtype") if getattr(query, name) is None)
            example = "shape=1,1,28,28&dtype=uint8" if takes_images else "shape=1,50&dtype=float32"
            raise InvalidInput(
                f"a raw tensor body needs `shape` and `dtype` in the query string (missing: {missing}; e.g. ?{example})"
            )
        count = query.shape[0] if query.shape else 0
        if count > settings.max_images_per_request:
            raise LimitExceeded(
                f"too many {'images' if takes_images else 'latents'}: {count} in one request, at most "
                f"{settings.max_images_per_request}",
                "max_images_per_request",
            )
        array = read_tensor(await read_body(request, settings), query.shape, query.dtype)
        tensor = wire_images(array) if takes_images else wire_latents(array, query)
    fields = {name: getattr(query, name) for name in shared_fields(schema, type(query))}
    if "latents" in schema.model_fields:
        fields["latents"] = []  # they are the tensor
    params = schema.model_construct(**fields)  # validated as the query string already
    return finish(Call(params, fmt, files, ["the body"] * len(files), tensor, query), None, settings)


@functools.cache
def shared_fields(schema: type[BaseModel], query: type[BaseModel]) -> tuple[str, ...]:
    """The fields a request schema takes from its raw body's query string."""
    return tuple(name for name in schema.model_fields if name in query.model_fields)


def read_tensor(body: bytes, shape: list[int], dtype: str) -> np.ndarray:
    """A raw body -> the array it holds (float32 for bfloat16); raises InvalidPayload when its length is not the
    shape's."""
    wire = WIRE_DTYPES[dtype]
    count = math.prod(shape)
    if len(body) != count * wire.itemsize:
        raise InvalidPayload(
            f"the body has {len(body)} bytes; shape {shape} of {dtype} takes {count * wire.itemsize} "
            f"({count} values of {wire.itemsize} byte{'s' if wire.itemsize > 1 else ''})"
        )
    array: np.ndarray = np.frombuffer(body, wire).reshape(shape)
    if dtype == "bfloat16":  # the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def wire_images(array: np.ndarray) -> np.ndarray:
    """Images as sent (uint8 in 0..255, or floats in [-1, 1] as diffusers' VAEs take them) -> uint8, or float32 in
    [0, 1] (the service's convention); raises InvalidInput for a float outside [-1, 1], NaN or infinity."""
    if array.dtype == np.uint8:
        return array
    x = array.astype(np.float32)  # a copy of our own
    if x.size and not (np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0):
        got = "NaN or infinity" if not np.isfinite(x).all() else f"values from {x.min():g} to {x.max():g}"
        raise InvalidInput(f"float images must hold finite values in [-1, 1] (or send uint8 pixels); got {got}")
    x += 1.0
    x *= 0.5  # exact: [-1, 1] -> [0, 1]
    return x


def wire_latents(array: np.ndarray, query: TensorQuery) -> np.ndarray:
    """Latents as sent, (N, latent_dim) or (N, latent_dim, 1, 1), scaled as diffusers' pipelines scale them ->
    float32 (N, latent_dim) for the model."""
    if array.dtype == np.uint8:
        raise InvalidInput("latents are floats: send float32, float16 or bfloat16 (got uint8)")
    z = array.astype(np.float32)
    if z.ndim == 4:
        if z.shape[2:] != (1, 1):
            raise InvalidInput(
                f"the tensor has shape {list(z.shape)}: latents are [N, latent_dim] or [N, latent_dim, 1, 1] "
                "(these VAEs code an image as one vector, not a spatial map)"
            )
        z = z.reshape(z.shape[:2])
    scaling = getattr(query, "scaling_factor", None)
    shift = getattr(query, "shift_factor", None)
    if scaling is not None:
        z /= np.float32(scaling)
    if shift is not None:
        z += np.float32(shift)
    return z


def query_call(request: Request, schema: type[Q], settings: Settings, formats: tuple[Format, ...]) -> Call[Q]:
    """A GET endpoint's query string, validated against `schema` (a ModelQuery)."""
    params = read_query(request, schema)
    return finish(Call(params, negotiate(request, params, formats)), None, settings)


def read_query(request: Request, schema: type[Q]) -> Q:
    """The query string validated against `schema`, whose extra="forbid" makes any other name a 422 naming it.
    Pydantic validates it directly: FastAPI's query-parameter models cost ~35-75 us a request (bench/stack.py)."""
    values: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name in REPEATABLE:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise InvalidInput(f"query parameter {name!r} is given twice")
        else:
            values[name] = value
    return validate(schema, values, "query")


def finish(call: Call[T], query: ModelQuery | None, settings: Settings) -> Call[T]:
    """The one model the request names, and the schema's capped field against its setting."""
    params = call.params
    named = getattr(params, "model", None)
    if query is not None and query.model is not None:
        if named is not None and named != query.model:
            raise InvalidInput(
                f"the query string names model {query.model!r} and the body names {named!r}; name one model, once"
            )
        params.model = query.model  # type: ignore[attr-defined]
    capped = LIMITS.get(type(params))
    if capped is not None:
        name, setting, what = capped
        value, limit = getattr(params, name), getattr(settings, setting)
        if value > limit:
            raise LimitExceeded(f"{name}={value} is over the limit of {limit} {what}", setting)
    return call


# -- bodies ---------------------------------------------------------------------------------------------------------
def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refusing more than `max_request_bytes` (by Content-Length first, then while reading) and
    a body still incomplete `body_timeout_s` after reading started (a client trickling bytes in would otherwise
    hold its connection and buffer for as long as it likes)."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body is {declared} bytes, over the limit of {limit} {limit_hint('max_request_bytes')}"
        )
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(
                        f"request body is over the limit of {limit} bytes {limit_hint('max_request_bytes')}"
                    )
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected while sending the body") from None
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {settings.body_timeout_s:g} s ({total} bytes "
            f"came) {limit_hint('body_timeout_s')}"
        ) from None
    return b"".join(chunks)


def validate(schema: type[T], data: bytes | dict[str, Any], where: str = "body") -> T:
    """JSON bytes (strict: `"seed": false` or `"k": "5"` is a 422) or form fields and query parameters (strings,
    coerced) -> schema."""
    try:
        if isinstance(data, bytes):
            return schema.model_validate_json(data, strict=True)
        return schema.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": (where, *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


async def read_json_body(request: Request, settings: Settings) -> bytes:
    """A JSON body, refused before parsing when it has more values than any valid request can: parsed, a number
    takes ~50 times its bytes, so a 16 MiB body of them would take ~1 GB. Commas count the values (at most two per
    value, with the arrays around them); base64 has none."""
    body = await read_body(request, settings)
    per_item: int = request.app.state.registry.max_item_values
    limit = 2 * per_item * settings.max_images_per_request + 1024
    if per_item and body.count(b",") > limit:
        raise InvalidInput(
            f"the JSON body holds more values than a request can use here (at most ~{limit // 2}) "
            f"{limit_hint('max_images_per_request')}"
        )
    return body


async def read_form(request: Request, schema: type[T], settings: Settings) -> tuple[T, list[bytes]]:
    """A multipart form -> (its fields validated against `schema`, the `image` files' bytes in order)."""
    body = await read_body(request, settings)
    limit = settings.max_images_per_request
    uploads: list[bytes] = []
    fields: dict[str, Any] = {}
    for part in multipart.parse(request.headers["content-type"], body, max_parts=limit + 100):
        if part.name == "image":  # a file part, or (curl -F 'image=<f', httpx with no filename) a plain one
            if len(uploads) == limit:
                raise LimitExceeded(f"too many images: at most {limit} per request", "max_images_per_request")
            uploads.append(part.data)
        elif part.filename is not None:
            raise InvalidInput(f"unexpected file field {part.name!r}: upload images as field 'image'")
        elif part.name in fields:
            raise InvalidInput(f"form field {part.name!r} is given twice")
        else:
            fields[part.name] = part.data.decode("utf-8", errors="replace")
    return validate(schema, fields), uploads


# -- the response format ---------------------------------------------------------------------------------------------
def raw_default(query: TensorQuery) -> Format:
    """What a raw body is answered with when the Accept header leaves it open (none, or */*): in kind, a tensor;
    an image with output_type=pil (as diffusers' remote_decode asks)."""
    if isinstance(query, ImageTensorQuery) and query.output_type == "pil":
        return "jpeg" if query.image_format == "jpg" else "png"
    return "tensor"


def negotiate(request: Request, query: ModelQuery, allowed: tuple[Format, ...], default: Format = "json") -> Format:
    """`?format=` if given, else the Accept header: json (application/json), png (image/png, image/*), jpeg
    (image/jpeg), gif (image/gif), tensor (application/octet-stream, tensor/binary); raises NotAcceptable. No
    Accept header, or */*, means `default`: JSON, or raw_default for a raw body."""
    fmt = query.format if isinstance(query, ModelFormatQuery) else None
    if fmt is not None:
        if fmt not in allowed:
            raise NotAcceptable(f"format {fmt!r} is not available here; choose one of {', '.join(allowed)}")
        return fmt
    accept = request.headers.get("accept")
    if not accept:
        return default
    ranked = []
    for i, part in enumerate(accept.split(",")):
        media_range, *options = (s.strip() for s in part.split(";"))
        q = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    q = float(option[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            ranked.append((-q, i, media_range.lower()))
    for _, _, media_range in sorted(ranked):
        if media_range == "*/*" and default in allowed:
            return default
        if media_range in (JSON, "*/*", "application/*"):
            return "json"
        if media_range in ("image/png", "image/*") and "png" in allowed:
            return "png"
        if media_range == "image/jpeg" and "jpeg" in allowed:
            return "jpeg"
        if media_range in ("image/gif", "image/*") and "gif" in allowed:
            return "gif"
        if media_range in TENSOR_TYPES and "tensor" in allowed:
            return "tensor"
    available = ", ".join(MEDIA_TYPES[f] for f in allowed)
    raise NotAcceptable(f"cannot produce {accept!r} here; available: {available}")
