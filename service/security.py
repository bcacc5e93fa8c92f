"""The optional API key: a pure-ASGI check in front of /v1 (no per-request dependency resolution), and the
OpenAPI security schemes that make /docs offer an "Authorize" button."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response

PROTECTED_PREFIX = "/v1/"
SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the server's API key"},
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the server's API key as a bearer token"},
}


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
    """401 (`{"detail", "code": "unauthorized"}`, `WWW-Authenticate: Bearer`) for /v1 requests without the key.
    /healthz, /readyz, /metrics, /docs and the web page stay open."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = presented_key(scope["headers"])
            if given is None or not hmac.compare_digest(given, self.key):
                detail = (
                    "this server needs an API key: send X-API-Key or Authorization: Bearer"
                    if given is None
                    else "wrong API key"
                )
                response = error_response(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def with_security_schemes(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap app.openapi so the schema declares the key on every /v1 operation."""

    def patched() -> dict[str, Any]:
        schema = openapi()
        if "APIKeyHeader" not in schema.get("components", {}).get("securitySchemes", {}):
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SCHEMES)
            for path, operations in schema.get("paths", {}).items():
                if path.startswith(PROTECTED_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{"APIKeyHeader": []}, {"HTTPBearer": []}]
        return schema

    return patched
