"""Domain errors and the one place that maps them (and every other failure) to HTTP statuses and gRPC codes.

Every error response has the same body: `{"detail": "<human-readable message>", "code": "<machine-readable code>"}`,
except under /v2 (the Open Inference Protocol), whose body is `{"error": "<message>"}` and which answers 400 for
every request the server cannot use; its gRPC service maps the same statuses to gRPC codes (`grpc_code`).
Predictor and batcher raise the exceptions below; only this module knows their statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("vae_serve")


class ServiceError(Exception):
    """Base class: `status` and `code` choose the response; the message is the `detail`."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidPayload(ServiceError):
    """400: the request body or an uploaded image cannot be decoded (bad base64, not a PNG/JPEG, truncated)."""

    status, code = 400, "invalid_payload"


class Unauthorized(ServiceError):
    """401: an API key is configured and the request's is missing or wrong."""

    status, code = 401, "unauthorized"


class ModelNotFound(ServiceError):
    """404: the request names a model, or a version of one, that this server does not serve (the detail names
    those it does)."""

    status, code = 404, "model_not_found"


class AdminOff(ServiceError):
    """404: an admin call (reload, load, unload) while the admin API is off: it is on only when VAE_ADMIN_KEY is
    set."""

    status, code = 404, "not_found"


class InvalidModelFolder(ServiceError):
    """422: a model folder, or a version in it, that fails validation (no checkpoint, a bad card or versions.json,
    weights that miss their hash or do not fit the config, outputs that are not finite). Whatever served before
    still serves."""

    status, code = 422, "invalid_model"


class NotAcceptable(ServiceError):
    """406: the Accept header or `format` asks for a media type the endpoint cannot produce."""

    status, code = 406, "not_acceptable"


class BodyTimeout(ServiceError):
    """408: the request body did not arrive within `body_timeout_s` (a client trickling it in, or stalled)."""

    status, code = 408, "body_timeout"


class PayloadTooLarge(ServiceError):
    """413: the request body is over `max_request_bytes`."""

    status, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    """413: an uploaded image has more pixels than `max_image_pixels` (decompression-bomb guard)."""

    status, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    """415: the request's Content-Type is not one the endpoint reads."""

    status, code = 415, "unsupported_media_type"


class InvalidInput(ServiceError):
    """422: a well-formed request that does not fit the model or the limits (latent length, too many images,
    pixel-array shape, n / k / steps over their caps)."""

    status, code = 422, "invalid_input"


class UnsupportedForModel(ServiceError):
    """422: the operation is not defined for this model (e.g. likelihoods of a plain autoencoder)."""

    status, code = 422, "unsupported_for_model"


class ModelNotReady(ServiceError):
    """503: models are not loaded and warmed yet, or the server is shutting down."""

    status, code = 503, "not_ready"


class Overloaded(ServiceError):
    """503 with Retry-After: the model's queue is full."""

    status, code = 503, "overloaded"


class OutOfMemory(ServiceError):
    """507: the device ran out of memory even for a single image (or a single /v1/score request): larger batches
    are split and retried first, so this means the request itself does not fit."""

    status, code = 507, "out_of_memory"


class InferenceTimeout(ServiceError):
    """504: no result within `request_timeout_s`."""

    status, code = 504, "timeout"


class ClientDisconnected(ServiceError):
    """499 (logged only; nobody is left to read it): the client went away, so its queued work was withdrawn."""

    status, code = 499, "client_disconnected"


def limit_hint(setting: str) -> str:
    """How an operator raises a limit, for every error that enforces one: the setting's variable and flag."""
    return f"(the server's setting VAE_{setting.upper()} / --{setting.replace('_', '-')})"


class LimitExceeded(InvalidInput):
    """422: a request parameter over one of the server's limits; the message names the setting that raises it."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(f"{message} {limit_hint(setting)}")


class StartupError(Exception):
    """Start-up cannot complete (no checkpoints, a bad checkpoint, a missing default model, an unusable device).
    Not an HTTP error: the server stops with this one message."""


# Statuses raised by Starlette/FastAPI themselves, with our codes.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# -- the Open Inference Protocol (v2): its body, its statuses and its gRPC codes --------------------------------------
V2_PREFIX = "/v2"
# The protocol's "typically 400" for a request the server cannot use, where /v1 says 406, 415 or 422.
V2_STATUSES = {406: 400, 415: 400, 422: 400}
# gRPC's own mapping of HTTP statuses (grpc/doc/http-grpc-status-mapping.md, and the reverse for ours); else INTERNAL.
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    507: "RESOURCE_EXHAUSTED",
}


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def v2_status(status: int) -> int:
    return V2_STATUSES.get(status, status)


def grpc_code(status: int) -> str:
    """The name of the grpc.StatusCode for an error of HTTP status `status`."""
    return GRPC_CODES.get(v2_status(status), "INTERNAL")


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None, path: str = ""
) -> JSONResponse:
    """The error body for a request to `path`: `{"detail", "code"}`, or `{"error"}` with the v2 status under /v2."""
    if is_v2(path):
        return JSONResponse({"error": detail}, status_code=v2_status(status), headers=dict(headers or {}))
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=dict(headers or {}))


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def _summarise(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{_location(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _headers(request: Request, exc: ServiceError) -> dict[str, str]:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(request.app.state.settings.retry_after_s)}
    if isinstance(exc, BodyTimeout):
        return {"Connection": "close"}  # the rest of the body may still come: this connection is done
    return {}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.detail, _headers(request, exc), request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", _summarise(exc), path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers, request.url.path)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # The traceback is logged by the server (Starlette re-raises after this response is sent); the client sees
    # a generic message only.
    logger.error("unhandled %s in %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error", path=request.url.path)


def install_handlers(app: FastAPI) -> None:
    """Route every failure to the one JSON error shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
