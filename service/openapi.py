"""OpenAPI fragments for the routes that read their bodies themselves (service.decoding): the request bodies they
take, the media types they answer, and the error table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from service.schemas import ErrorResponse

JSON = "application/json"
MULTIPART = "multipart/form-data"
OCTET_STREAM = "application/octet-stream"
_BINARY = {"type": "string", "format": "binary"}

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
        422: "invalid request (an unknown query parameter too), or one that does not fit the model or the limits",
        503: "not ready, or overloaded (with Retry-After)",
        504: "no result within request_timeout_s",
    }.items()
}


# The models that request bodies refer to (pydantic's $defs), hoisted into components/schemas by with_definitions:
# an operation's own schema may not carry $defs where its $refs point at components (ReDoc fails on them).
DEFINITIONS: dict[str, Any] = {}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a body model for openapi_extra, its nested models moved to DEFINITIONS."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    DEFINITIONS.update(schema.pop("$defs", {}))
    return schema


def with_definitions(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap app.openapi so every model a body schema refers to is in components/schemas."""

    def patched() -> dict[str, Any]:
        schema = openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in DEFINITIONS.items():
            components.setdefault(name, definition)
        return schema

    return patched


def query(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its query string itself (service.decoding.read_query): its parameters."""
    full = schema_of(schema)
    required = set(full.get("required", ()))
    parameters = []
    for name, prop in full.get("properties", {}).items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            parameter["description"] = prop["description"]
        parameters.append(parameter)
    return {"parameters": parameters}


def json_body(schema: type[BaseModel], query_schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself (to enforce the size limit first)."""
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema_of(schema)}}}, **query(query_schema)}


def images_body(schema: type[BaseModel], query_schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that takes JSON or multipart uploads (`image`, repeated) plus form fields."""
    form = schema_of(schema)
    props = {k: v for k, v in form.get("properties", {}).items() if k not in ("images", "pixels", "latents")}
    props["image"] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "PNG or JPEG files, one part per image",
    }
    multipart = {"type": "object", "properties": props, "required": ["image"]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {"schema": multipart, "encoding": {"image": {"contentType": "image/png, image/jpeg"}}},
                JSON: {"schema": form},
            },
        },
        **query(query_schema),
    }


def image_responses(model: type[BaseModel], *types: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering JSON (`model`) or, by negotiation, the given image (or tensor) types."""
    content: dict[str, Any] = {t: {"schema": _BINARY} for t in types}
    answer: dict[str, Any] = {"model": model, "content": content}
    if OCTET_STREAM in types:
        answer["headers"] = {
            "shape": {"description": "tensor answers: the shape, a JSON list", "schema": {"type": "string"}},
            "dtype": {"description": "tensor answers: float32 or uint8 (little-endian)", "schema": {"type": "string"}},
        }
    return {200: answer, **ERRORS}


def raw_body(extra: dict[str, Any], query_schema: type[BaseModel], images: bool = True) -> dict[str, Any]:
    """`extra` (images_body or json_body) plus the raw bodies of docs/binary-tensors.md: a tensor
    (application/octet-stream, or tensor/binary, with `shape` and `dtype`) and, where the route takes images, one
    PNG or JPEG file; and the raw body's query parameters (`query_schema`), which apply to raw bodies only."""
    content = extra["requestBody"]["content"]
    content[OCTET_STREAM] = {"schema": _BINARY}
    if images:
        content["image/png"] = content["image/jpeg"] = {"schema": _BINARY}
    present = {parameter["name"] for parameter in extra["parameters"]}
    for parameter in query(query_schema)["parameters"]:
        if parameter["name"] not in present:
            parameter["description"] = "raw bodies only: " + parameter.get("description", "")
            extra["parameters"].append(parameter)
    return extra
