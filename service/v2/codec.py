"""v2 request decoding and response rendering: tensors as JSON `data` or as raw bytes (the binary tensor data
extension), checked against the model's metadata; REST bodies in and out. (gRPC's messages carry the same tensors:
service.v2.grpc_server turns them into the same Inference and Result.)

A REST body is JSON, or, when the `Inference-Header-Content-Length` header is given, that many bytes of JSON followed
by each binary input's `binary_data_size` bytes, in the inputs' order: little-endian, row-major, no padding (with
the header at 0, the body is one item of the model's one input and nothing else). Every problem is an InvalidInput
(400 under /v2) that says what was expected and what came.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from service.decoding import read_body
from service.errors import InvalidInput, LimitExceeded, PayloadTooLarge, limit_hint
from service.settings import Settings
from service.v2.catalog import TensorSpec, V2Model, summarise

HEADER = "Inference-Header-Content-Length"
JSON = "application/json"
BINARY = "application/octet-stream"
# The protocol's datatypes and their little-endian numpy types (None: no fixed-size numpy type).
DATATYPES: dict[str, np.dtype[Any] | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": None,
    "BYTES": None,
}
OUTPUT_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}

# -- the REST bodies (for validation and the OpenAPI schema) --------------------------------------------------------
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[str, Parameter]
Shape = list[Annotated[int, Field(ge=0)]]


class RequestInput(BaseModel):
    name: str
    shape: Shape = Field(description="the whole batch's shape, e.g. [N, 1, 28, 28]")
    datatype: str = Field(description="UINT8 or FP32 for images, FP32 for latents", examples=["UINT8"])
    parameters: Parameters | None = Field(None, description="binary_data_size: its bytes follow the JSON header")
    data: list[Any] | None = Field(None, description="the values, row-major: flat or nested (or binary_data_size)")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(None, description="binary_data: true for raw bytes after the JSON header")


class InferenceRequest(BaseModel):
    """The Open Inference Protocol's inference request (unknown fields are ignored, as the protocol allows)."""

    id: str | None = Field(None, description="echoed in the response")
    parameters: Parameters | None = Field(
        None, description="the model's (encoder: sample, seed; scorer: k, seed, binarize) and binary_data_output"
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="default: every output")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class V2Error(BaseModel):
    """Every /v2 error has this body."""

    error: str

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "unknown model 'x-encoder'"}]})


# -- protocol-neutral: what the wire formats decode to -------------------------------------------------------------
@dataclass
class WireInput:
    """An input as a request carries it: raw little-endian bytes, or a (flat or nested) sequence of values."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | memoryview | None = None
    values: Any = None


@dataclass
class Inference:
    """A v2 inference request, decoded and checked against its model: the input as an array, the parameters, the
    outputs asked for (in order; empty: all) and which of them go back as binary data (REST)."""

    model: V2Model
    id: str | None
    parameters: dict[str, Any]
    tensor: np.ndarray
    requested: list[str] = field(default_factory=list)
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


@dataclass
class Result:
    """What the model answered: the outputs (whole batches, in order) and the response's parameters (the seed
    used, the scorer's k)."""

    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


def decode(
    model: V2Model,
    request_id: str | None,
    parameters: dict[str, Any],
    inputs: Sequence[WireInput],
    outputs: Sequence[tuple[str, dict[str, Any]]],
    settings: Settings,
) -> Inference:
    """A request's parts -> an Inference: every input checked against the model's metadata (name, datatype, shape,
    byte count, batch limit), every requested output known."""
    arrays: dict[str, np.ndarray] = {}
    for wire in inputs:
        if wire.name in arrays:
            raise InvalidInput(f"input {wire.name!r} is given twice")
        arrays[wire.name] = input_array(model, wire, settings)
    missing = [spec.name for spec in model.inputs if spec.name not in arrays]
    if missing:
        raise InvalidInput(f"model {model.name!r} needs input {', '.join(map(repr, missing))}")
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameter binary_data_output must be true or false, got {binary_default!r}")
    inference = Inference(model, request_id, parameters, arrays[model.inputs[0].name], binary_default=binary_default)
    for name, options in outputs:
        model.output(name)  # InvalidInput for an unknown name
        if name in inference.binary:
            raise InvalidInput(f"output {name!r} is asked for twice")
        unknown = sorted(set(options) - {"binary_data"})
        if unknown:
            raise InvalidInput(f"output {name!r} takes no parameter {', '.join(map(repr, unknown))} (only binary_data)")
        flag = options.get("binary_data", binary_default)
        if not isinstance(flag, bool):
            raise InvalidInput(f"output {name!r}: binary_data must be true or false, got {flag!r}")
        inference.requested.append(name)
        inference.binary[name] = flag
    return inference


def input_array(model: V2Model, wire: WireInput, settings: Settings) -> np.ndarray:
    """One input as a writable numpy array of its datatype and shape, after checking both against the model's
    metadata and the data against both."""
    spec = input_spec(model, wire.name)
    dtype = datatype_of(model, spec, wire.datatype)
    shape = check_shape(model, spec, wire.shape, settings)
    count = math.prod(shape)
    if wire.raw is not None:
        expected = count * dtype.itemsize
        if len(wire.raw) != expected:
            raise InvalidInput(
                f"input {wire.name!r}: shape {shape} of {wire.datatype} is {expected} bytes; got {len(wire.raw)} bytes"
            )
        return np.frombuffer(wire.raw, dtype).reshape(shape).copy()  # copied: writable, and the body can go
    return values_array(wire, dtype, shape, count)


def values_array(wire: WireInput, dtype: np.dtype[Any], shape: list[int], count: int) -> np.ndarray:
    """JSON `data` (or gRPC typed contents), flat or nested -> an array of `dtype` and `shape`."""
    try:
        values = np.asarray(wire.values)
    except (ValueError, TypeError, OverflowError):
        values = np.asarray(None)
    kind = values.dtype.kind
    if kind not in "biuf" or (kind == "b") != (dtype.kind == "b"):
        raise InvalidInput(f"input {wire.name!r}: data must be a flat or nested list of {wire.datatype} values")
    if values.size != count:
        raise InvalidInput(f"input {wire.name!r}: shape {shape} holds {count} values; data has {values.size}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if kind == "f" or (values.size and (values.min() < info.min or values.max() > info.max)):
            raise InvalidInput(f"input {wire.name!r}: {wire.datatype} data must be integers in {info.min}..{info.max}")
    with np.errstate(over="ignore"):  # a float past the datatype's range becomes inf, refused as non-finite later
        return values.astype(dtype).reshape(shape)


def input_spec(model: V2Model, name: str) -> TensorSpec:
    for spec in model.inputs:
        if spec.name == name:
            return spec
    raise InvalidInput(
        f"model {model.name!r} has no input {name!r}; its inputs: {', '.join(s.name for s in model.inputs)}"
    )


def datatype_of(model: V2Model, spec: TensorSpec, datatype: str) -> np.dtype[Any]:
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {spec.name!r}: unknown datatype {datatype!r}; the protocol's are {', '.join(DATATYPES)}"
        )
    dtype = DATATYPES[datatype]
    if datatype not in spec.datatypes or dtype is None:
        raise InvalidInput(
            f"input {spec.name!r} of model {model.name!r} takes {' or '.join(spec.datatypes)}; got {datatype}"
        )
    return dtype


def check_shape(model: V2Model, spec: TensorSpec, shape: Sequence[int], settings: Settings) -> list[int]:
    """The shape against the model's (-1: any size) and the batch against max_images_per_request."""
    given = list(shape)
    fits = len(given) == len(spec.shape) and all(d == s or s == -1 for d, s in zip(given, spec.shape, strict=True))
    if not fits or any(d < 0 for d in given):
        raise InvalidInput(
            f"input {spec.name!r} has shape {given}; model {model.name!r} takes {list(spec.shape)} (-1: any size)"
        )
    if given[0] == 0:
        raise InvalidInput(f"input {spec.name!r} is empty (shape {given}): send at least one item")
    if given[0] > settings.max_images_per_request:
        raise LimitExceeded(
            f"input {spec.name!r} holds {given[0]} items, over the limit of {settings.max_images_per_request} per "
            "request",
            "max_images_per_request",
        )
    return given


# -- REST in ----------------------------------------------------------------------------------------------------------
async def read(request: Request, settings: Settings) -> bytes:
    """A REST inference request's body, under max_request_bytes (also once decompressed: gzip and deflate, as
    tritonclient sends them) and body_timeout_s."""
    return inflate(request, await read_body(request, settings), settings)


def parse(request: Request, body: bytes, model: V2Model, settings: Settings) -> Inference:
    """A REST inference request's body for `model`: JSON, or a JSON header of `Inference-Header-Content-Length` bytes
    and the binary inputs after it."""
    header_length = request.headers.get(HEADER)
    header, binary = body, memoryview(b"")
    if header_length is not None:
        if not header_length.strip().isdigit():
            raise InvalidInput(f"{HEADER} must be a byte count; got {header_length!r}")
        n = int(header_length)
        if n > len(body):
            raise InvalidInput(f"{HEADER} is {n} bytes, longer than the whole body ({len(body)} bytes)")
        if n == 0:
            return raw_binary(model, body, settings)
        header, binary = body[:n], memoryview(body)[n:]
    check_values(header, model, settings)
    try:
        parsed = InferenceRequest.model_validate_json(header, strict=True)
    except ValidationError as e:
        raise InvalidInput(summarise(e, "the JSON header" if header_length is not None else "the body")) from None
    inputs: list[WireInput] = []
    offset = 0
    for tensor in parsed.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        wire = WireInput(tensor.name, tensor.datatype, tensor.shape)
        if size is None:
            if tensor.data is None:
                raise InvalidInput(f"input {tensor.name!r} has no data: send `data` or binary_data_size and the bytes")
            wire.values = tensor.data
        else:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or tensor.data is not None:
                raise InvalidInput(f"input {tensor.name!r}: binary_data_size must be a byte count, instead of `data`")
            if header_length is None:
                raise InvalidInput(f"input {tensor.name!r} has binary data, but the request has no {HEADER} header")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {tensor.name!r}: binary_data_size is {size} bytes, but only {len(binary) - offset} bytes "
                    "of binary data are left after the JSON header"
                )
            wire.raw = binary[offset : offset + size]
            offset += size
        inputs.append(wire)
    if offset != len(binary):
        raise InvalidInput(
            f"the inputs' binary_data_size add up to {offset} bytes, but {len(binary)} follow the JSON header"
        )
    outputs = [(o.name, dict(o.parameters or {})) for o in parsed.outputs or []]
    return decode(model, parsed.id, dict(parsed.parameters or {}), inputs, outputs, settings)


def raw_binary(model: V2Model, body: bytes, settings: Settings) -> Inference:
    """A body of tensor bytes alone (`Inference-Header-Content-Length: 0`, the extension's raw binary request): one
    item of the model's one input, its datatype told by the byte count; every output comes back as binary data."""
    spec = model.inputs[0]
    shape = [1, *spec.shape[1:]]
    sizes = {
        datatype: math.prod(shape) * dtype.itemsize for datatype in spec.datatypes if (dtype := DATATYPES[datatype])
    }
    for datatype, size in sizes.items():
        if len(body) == size:
            wire = WireInput(spec.name, datatype, shape, raw=body)
            return decode(model, None, {"binary_data_output": True}, [wire], [], settings)
    expected = " or ".join(f"{size} bytes ({datatype})" for datatype, size in sizes.items())
    raise InvalidInput(
        f"a body of tensor bytes alone ({HEADER}: 0) for model {model.name!r} is one {spec.name} item {shape}: "
        f"{expected}; got {len(body)} bytes"
    )


def inflate(request: Request, body: bytes, settings: Settings) -> bytes:
    """The body, decompressed when its Content-Encoding is gzip or deflate, refused past max_request_bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    limit = settings.max_request_bytes
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"the body is not valid {encoding} data ({e})") from None
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the decompressed body is over the limit of {limit} bytes {limit_hint('max_request_bytes')}"
        )
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated")
    return data


def check_values(header: bytes, model: V2Model, settings: Settings) -> None:
    """Refuse a JSON header with more values than a request can use, before parsing it (as service.decoding does for
    /v1: parsed, a number takes ~50 times its bytes)."""
    per_item = max(math.prod(spec.shape[1:]) for spec in model.inputs)
    limit = 2 * per_item * settings.max_images_per_request + 1024
    if len(header) > limit and header.count(b",") > limit:
        raise InvalidInput(
            f"the JSON holds more values than a request to {model.name!r} can use (at most ~{limit // 2}) "
            f"{limit_hint('max_images_per_request')}"
        )


# -- REST out ---------------------------------------------------------------------------------------------------------
def render(result: Result, inference: Inference) -> Response:
    """The inference response: JSON, or its JSON header followed by the binary outputs' bytes (with
    `Inference-Header-Content-Length`) when any output is asked for as binary data."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": OUTPUT_DATATYPES[array.dtype], "shape": list(array.shape)}
        if inference.binary.get(name, inference.binary_default):
            data = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1)  # float32s as their shortest decimals (orjson)
        entries.append(entry)
    answer: dict[str, Any] = {"model_name": inference.model.name, "model_version": inference.model.version}
    if inference.id is not None:
        answer["id"] = inference.id
    if result.parameters:
        answer["parameters"] = result.parameters
    answer["outputs"] = entries
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(header, media_type=JSON)
    return Response(b"".join([header, *chunks]), media_type=BINARY, headers={HEADER: str(len(header))})
