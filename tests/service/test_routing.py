"""LeanRoute (service/routing.py): the /v1 verbs skip FastAPI's request handler and nothing else changes; any route
it cannot answer alone, and any app with dependency overrides, goes through FastAPI's handler."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from service_helpers import assert_error, digit_like, files, png

from service.deps import RegistryDep, SettingsDep, get_settings
from service.main import create_app
from service.routes import health, vae
from service.routing import LeanRoute, add_routes, check_lean_inclusion, lean_values, returns_response
from service.settings import Settings
from service.v2 import rest as v2

pytestmark = pytest.mark.anyio


def test_every_model_verb_v2_infer_and_the_probes_take_the_lean_handler(settings_for: Any) -> None:
    create_app(settings_for())  # includes the routers: its check passes
    routes = [r for r in vae.router.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/v1/encode", "/v1/decode", "/v1/sample", "/v1/reconstruct", "/v1/score"}
    routes += [r for r in v2.infer_router.routes if isinstance(r, APIRoute) and r.path.endswith("/infer")]
    routes += [r for r in health.router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 11
    for route in routes:
        assert isinstance(route, LeanRoute) and lean_values(route.dependant) is not None, route.path
        assert returns_response(route.endpoint), route.path
    metadata = next(r for r in v2.router.routes if isinstance(r, APIRoute) and r.path == "/v2")
    assert not returns_response(metadata.endpoint)  # a dict: FastAPI's handler serialises it


async def tag(request: Request) -> str:
    return str(request.app.state.tag)


def make_app(value: str) -> tuple[FastAPI, APIRouter]:
    """A router of LeanRoutes: one endpoint the lean handler answers, two it must leave to FastAPI."""
    router = APIRouter(route_class=LeanRoute)

    @router.get("/lean")
    async def lean(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
        return PlainTextResponse(f"{settings.default_model} {registry}")

    @router.get("/query")
    async def with_query(request: Request, settings: SettingsDep, n: int = 1) -> Response:
        return PlainTextResponse(f"{settings.default_model} {n}")

    @router.get("/named/{name}")
    async def with_path(request: Request, name: str, registry: RegistryDep, version: str | None = None) -> Response:
        return PlainTextResponse(f"{name} {version} {registry}")

    @router.get("/plain")
    async def returns_a_dict(settings: SettingsDep) -> dict[str, str]:
        return {"model": settings.default_model}

    @router.get("/bare")
    async def bare() -> Response:
        return PlainTextResponse("bare")

    @router.get("/other")
    async def with_other_dependency(request: Request, value: Annotated[str, Depends(tag)]) -> Response:
        return PlainTextResponse(value)

    app = FastAPI()
    app.state.settings = Settings(default_model=value, grpc=False)
    app.state.registry = "registry"
    app.state.tag = "tagged"
    app.include_router(router)
    return app, router


def test_lean_values_take_only_request_and_app_state_dependencies() -> None:
    routes = {r.path: r for r in make_app("m")[1].routes if isinstance(r, APIRoute)}
    assert [name for name, _ in lean_values(routes["/lean"].dependant) or []] == ["settings", "registry"]
    assert [name for name, _ in lean_values(routes["/named/{name}"].dependant) or []] == ["registry", "name", "version"]
    assert lean_values(routes["/query"].dependant) is None  # an int query parameter: FastAPI validates it
    assert lean_values(routes["/other"].dependant) is None  # a dependency that is not an app-state getter


async def get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(path)


async def unrelated() -> None:
    return None


@pytest.mark.parametrize("through", ["lean", "fastapi"])
async def test_answers_are_the_same_through_either_handler(through: str) -> None:
    app, _ = make_app("m")
    if through == "fastapi":  # any override sends every request to FastAPI's own handler
        app.dependency_overrides[unrelated] = unrelated
    assert (await get(app, "/lean")).text == "m registry"
    assert (await get(app, "/query?n=3")).text == "m 3"
    assert (await get(app, "/query?n=x")).status_code == 422  # FastAPI's validation, where it has work to do
    assert (await get(app, "/other")).text == "tagged"
    assert (await get(app, "/named/x")).text == "x None registry"
    assert (await get(app, "/named/x?version=1&version=2")).text == "x 2 registry"  # the last value
    assert (await get(app, "/plain")).json() == {"model": "m"}  # not a Response: FastAPI serialises it
    assert (await get(app, "/bare")).text == "bare"


async def test_dependency_overrides_are_honoured() -> None:
    app, _ = make_app("m")
    app.dependency_overrides[get_settings] = lambda: Settings(default_model="overridden", grpc=False)
    assert (await get(app, "/lean")).text == "overridden registry"
    app.dependency_overrides.clear()
    assert (await get(app, "/lean")).text == "m registry"


def test_app_wide_dependencies_are_refused() -> None:
    async def guard() -> None:
        return None

    check_lean_inclusion(FastAPI())
    with pytest.raises(RuntimeError, match="app-wide dependencies"):
        check_lean_inclusion(FastAPI(dependencies=[Depends(guard)]))


async def test_errors_through_the_lean_handler_keep_their_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/encode?model=no-such-model", files=files(png(digit_like(0))))
    assert_error(response, 404, "model_not_found", "no-such-model")
    response = await client.post("/v1/encode?modle=tiny", files=files(png(digit_like(0))))
    assert_error(response, 422, "invalid_request", "modle")


def test_added_routers_are_the_apps_own_routes_and_keep_their_declarations(settings_for: Any) -> None:
    app = create_app(settings_for())
    own = {route.path: route for route in app.router.routes if isinstance(route, APIRoute)}
    assert {"/healthz", "/readyz", "/v1/encode", "/v1/sample", "/v2/models/{model_name}/infer"} <= set(own)
    assert own["/v1/encode"].tags == ["vae"] and isinstance(own["/v1/encode"], LeanRoute)
    paths = app.openapi()["paths"]
    assert paths["/v1/encode"]["post"]["tags"] == ["vae"] and "/healthz" in paths and "/v2" in paths


async def test_an_added_routers_own_dependencies_still_run() -> None:
    async def guard(request: Request) -> None:
        if request.headers.get("x-key") != "k":
            raise HTTPException(403, "no key")

    router = APIRouter(dependencies=[Depends(guard)], route_class=LeanRoute)

    @router.get("/guarded")
    async def guarded(request: Request, settings: SettingsDep) -> Response:
        return PlainTextResponse("in")

    app = FastAPI()
    app.state.settings = Settings(grpc=False)
    add_routes(app, router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/guarded")).status_code == 403  # the guard is not a state getter: FastAPI's handler
        assert (await client.get("/guarded", headers={"x-key": "k"})).text == "in"


def test_v2_inference_is_matched_before_the_v1_verbs_and_the_docs_keep_their_order(settings_for: Any) -> None:
    app = create_app(settings_for())
    paths = [getattr(r, "path", None) for r in app.router.routes]
    assert paths.index("/v2/models/{model_name}/infer") < paths.index("/v1/encode") < paths.index("/v2")
    assert [t["name"] for t in app.openapi()["tags"]][:2] == ["health", "vae"]  # Swagger UI's sections, v1 first
