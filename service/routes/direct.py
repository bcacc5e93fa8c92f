"""DirectRoute: an APIRoute whose endpoint, when it takes only the Request, is called without FastAPI's per-request
dependency machinery.

The model verbs read and validate their bodies themselves (routes/payloads.py) and return a Response, so for them
FastAPI's request handler only resolves an empty set of dependencies and passes the Response through, which is
measurable on the hot path (bench/serving.py, docs/benchmarks.md). Anything else (query, path, header or body
parameters, dependencies of the route or of an including router) goes through FastAPI's own handler, unchanged.
The OpenAPI schema comes from the route's declaration either way.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi import routing as fastapi_routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute


def request_only(dependant: Dependant) -> bool:
    """The endpoint's one parameter is the Request, and nothing else needs resolving."""
    return dependant.request_param_name is not None and not (
        dependant.path_params or dependant.query_params or dependant.header_params or dependant.cookie_params
        or dependant.body_params or dependant.dependencies or dependant.websocket_param_name
        or dependant.http_connection_param_name or dependant.response_param_name
        or dependant.background_tasks_param_name or dependant.security_scopes_param_name
    )  # fmt: skip


class DirectRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # FastAPI builds the handler once per inclusion, with the including routers' dependencies in an
        # "effective" route (a private detail: without it, the route's own dependant is the whole story).
        context_var = getattr(fastapi_routing, "_effective_route_context_var", None)
        effective = context_var.get() if context_var is not None else None
        dependant = getattr(effective, "dependant", None) if effective is not None else None
        if request_only(dependant or self.dependant) and request_only(self.dependant):
            endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
            return endpoint
        return super().get_route_handler()
