"""LeanRoute: the /v1 verbs' route class. Same declaration, same OpenAPI, less work per request.

A verb's parameters are the `Request` and the app-state dependencies of service/deps.py (`SettingsDep`,
`RegistryDep`): it reads and validates its own body (decoding.py) and returns a Response (so do `/healthz`, `/readyz`
and v2's infer, which also takes its model's name from the path). For such an endpoint,
FastAPI's request handler (`get_request_handler`) and `solve_dependencies` add nothing but time: a Response object
per dependency level, the query string, headers and cookies matched against empty parameter lists, telemetry
bookkeeping. Measured on `/v1/encode` at 64 clients (docs/benchmarks.md, section 0000): the two dependencies alone
cost 22 % of the requests per second, FastAPI's handler around an endpoint without them a further 8 %.

So `get_route_handler` (FastAPI's documented hook for custom route classes) returns, for those endpoints, a handler
that awaits each app-state getter with the request and then the endpoint (plain string path and query values are
read as FastAPI reads them). Anything else (another path or query parameter, a header or body parameter, any other
dependency, a dependency override set on the app, as tests do) goes through FastAPI's own handler, unchanged, and so
does every endpoint not annotated to return a Response.

One limit: dependencies given to `include_router` or to the app apply to a route through an "effective route" that
FastAPI builds privately, which a public route class cannot see. So main.py adds (`add_routes`) the routers with
LeanRoutes rather than including them, and `check_lean_inclusion` refuses an app with app-wide dependencies. A
router's own `dependencies=` are part of each route's dependant and simply send it to FastAPI's handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_typed_return_annotation
from fastapi.routing import APIRoute

from service.deps import STATE_GETTERS

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Getter = Callable[[Request], Awaitable[Any]]
OPTIONAL_STR: tuple[Any, ...] = (str | None, Optional[str])  # noqa: UP045 (either spelling an endpoint may use)
PLAIN_STR: tuple[Any, ...] = (str, *OPTIONAL_STR)


def lean_values(dependant: Dependant) -> list[tuple[str, Getter]] | None:
    """(parameter, getter) for each of the endpoint's parameters but the Request (if it takes one), when it can be
    read without validation: an app-state dependency (awaited), a `str` path parameter, an optional `str` query
    parameter (defaulting to None; the last value, as FastAPI takes it). None when FastAPI's handler has anything
    else to do."""
    if (
        dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
    ):
        return None
    values: list[tuple[str, Getter]] = []
    for sub in dependant.dependencies:
        if sub.call not in STATE_GETTERS or sub.name is None:
            return None
        values.append((sub.name, sub.call))
    for field in dependant.path_params:
        if field.field_info.annotation not in PLAIN_STR:
            return None
        values.append((field.name, path_value(field.alias)))
    for field in dependant.query_params:
        if field.field_info.annotation not in OPTIONAL_STR or field.field_info.default is not None:
            return None
        values.append((field.name, query_value(field.alias)))
    return values


def returns_response(endpoint: Callable[..., Any]) -> bool:
    """The endpoint is annotated to return a Response: FastAPI would pass it through untouched (anything else it
    validates against the response model and serialises)."""
    annotation = get_typed_return_annotation(endpoint)
    return isinstance(annotation, type) and issubclass(annotation, Response)


def path_value(alias: str) -> Getter:
    async def get(request: Request) -> Any:
        return request.path_params[alias]

    return get


def query_value(alias: str) -> Getter:
    async def get(request: Request) -> Any:
        return request.query_params.get(alias)

    return get


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        fastapi_handler = super().get_route_handler()
        getters = lean_values(self.dependant)
        if getters is None or not returns_response(self.endpoint):
            return fastapi_handler
        endpoint: Callable[..., Coroutine[Any, Any, Response]] = self.endpoint
        request_name = self.dependant.request_param_name

        async def handler(request: Request) -> Response:
            if getattr(request.app, "dependency_overrides", None):  # the app's: tests set them after routes exist
                return await fastapi_handler(request)
            values = {name: await get(request) for name, get in getters}
            if request_name is not None:
                values[request_name] = request
            return await endpoint(**values)

        return handler


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes as the app's own, matched by the app's router directly, first to last.

    `include_router` (FastAPI 0.165) adds a router as one object that matches a request against each route it holds
    twice (`matches`, then `handle`), in Python, and every request that is not the router's pays for that too:
    measured on 2 cores, /healthz served 1.98x and /v1/encode 1.10x the requests per second as the app's own routes
    (docs/benchmarks.md, section 0000). Each route already carries what its router gave it: the prefix, tags,
    responses, route class and the router's own `dependencies` (tested)."""
    app.router.routes.extend(router.routes)


def check_lean_inclusion(app: FastAPI) -> None:
    """Fail when the app is made, not in production, if app-wide dependencies would be skipped by the lean
    handlers (see the module's docstring; main.py includes the routers themselves without any)."""
    if app.router.dependencies:
        raise RuntimeError(
            "app-wide dependencies would not apply to the routes add_routes adds, nor to LeanRoute's handlers: "
            "see service/routing.py"
        )
