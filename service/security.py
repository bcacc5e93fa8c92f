"""The optional API key: a pure-ASGI check in front of /v1 and /v2 (no per-request dependency resolution), and the
OpenAPI security schemes that make /docs offer an "Authorize" button. (The gRPC service checks the same key in its
own requests' metadata: service.v2.grpc_server.)"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response, is_v2

PROTECTED_PREFIX = "/v1/"
# The Open Inference Protocol's health endpoints stay open, as its clients and Kubernetes probes expect.
OPEN_V2_PREFIX = "/v2/health/"
SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the server's API key"},
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the server's API key as a bearer token"},
}


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or (is_v2(path) and not path.startswith(OPEN_V2_PREFIX))


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key from `X-API-Key`, else from `Authorization: Bearer <key>`."""
    bearer = None
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
    return bearer


class APIKeyMiddleware:
    """401 (`{"detail", "code": "unauthorized"}`, or `{"error"}` under /v2; `WWW-Authenticate: Bearer`) for /v1 and
    /v2 requests without the key. /healthz, /readyz, /v2/health/*, /metrics, /docs and the web page stay open."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            given = presented_key(scope["headers"])
            if given is None or not hmac.compare_digest(given, self.key):
                detail = (
                    "this server needs an API key: send X-API-Key or Authorization: Bearer"
                    if given is None
                    else "wrong API key"
                )
                response = error_response(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"}, scope["path"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def with_security_schemes(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap app.openapi so the schema declares the key on every protected operation."""

    def patched() -> dict[str, Any]:
        schema = openapi()
        if "APIKeyHeader" not in schema.get("components", {}).get("securitySchemes", {}):
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SCHEMES)
            for path, operations in schema.get("paths", {}).items():
                if is_protected(path):
                    for operation in operations.values():
                        operation["security"] = [{"APIKeyHeader": []}, {"HTTPBearer": []}]
        return schema

    return patched
