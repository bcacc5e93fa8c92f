"""The Open Inference Protocol's REST API under /v2, on the HTTP port: health, metadata and inference, and the model
repository extension (index, load, unload: service.v2.repository), on only with the admin key, as /v1's admin API.

Errors are `{"error": "..."}` (service.errors chooses the statuses: 400 for any request the server cannot use). The
API key, when the server has one, is needed everywhere but /v2/health/* (service.security)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service import __version__
from service.decoding import read_body
from service.deps import RegistryDep, SettingsDep
from service.errors import ModelNotReady
from service.openapi import schema_of
from service.routes.admin import require_admin
from service.routing import LeanRoute
from service.settings import Settings
from service.v2 import catalog, codec, inference, repository
from service.v2.codec import HEADER, V2Error

router = APIRouter(prefix="/v2", tags=["v2"], route_class=LeanRoute)  # health and metadata
# Inference on its own router: the app matches it right after the probes (service/main.py), before /v1's verbs.
infer_router = APIRouter(prefix="/v2", tags=["v2"], route_class=LeanRoute)
repository_router = APIRouter(
    prefix="/v2/repository", tags=["v2 repository"], dependencies=[Depends(require_admin)]
)  # 404 for every call unless the settings hold an admin key
EXTENSIONS = ["binary_tensor_data", "parameters"]
V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in {
        400: "a request the model cannot use: its JSON, a tensor's name, datatype, shape or byte count, a parameter, "
        "a limit",
        401: "API key missing or wrong (only when the server has one)",
        404: "no such model (or version)",
        408: "the request body did not arrive within body_timeout_s",
        413: "body over max_request_bytes",
        503: "not ready, or overloaded (with Retry-After)",
        504: "no result within request_timeout_s",
    }.items()
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            codec.JSON: {"schema": schema_of(codec.InferenceRequest)},
            codec.BINARY: {"schema": {"type": "string", "format": "binary"}},
        },
        "description": f"JSON, or (with {HEADER}) a JSON header followed by the inputs' binary data",
    },
    "parameters": [
        {
            "name": HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "the JSON header's length in bytes: the binary tensor data extension (0: no JSON header, "
            "the body is one item of the model's input)",
        }
    ],
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": codec.InferenceResponse,
        "content": {codec.BINARY: {"schema": {"type": "string", "format": "binary"}}},
        "description": f"JSON, or (when an output is asked for as binary data) a JSON header of {HEADER} bytes "
        "followed by the binary outputs",
    },
    **V2_ERRORS,
}
READY: dict[int | str, dict[str, Any]] = {200: {"description": "ready"}, 503: {"description": "not ready"}}
REPOSITORY_ERRORS: dict[int | str, dict[str, Any]] = {
    **V2_ERRORS,
    400: {
        "model": V2Error,
        "description": "a body or parameter the call cannot use, or a model folder that fails "
        "validation (whatever served before still serves)",
    },
    401: {"model": V2Error, "description": "admin key (X-Admin-Key) missing or wrong; or the API key, when set"},
    404: {"model": V2Error, "description": "no such model; or the admin API is off (no VAE_ADMIN_KEY)"},
}
CHANGED: dict[int | str, dict[str, Any]] = {200: {"description": "done (an empty body)", "content": {}}}


def extensions(settings: Settings) -> list[str]:
    """The protocol extensions this server speaks: the model repository's only when the admin API is on."""
    return EXTENSIONS + (["model_repository"] if settings.admin_key is not None else [])


# Decorators apply bottom-up: the unversioned path, the common one, is matched first.
@infer_router.post(
    "/models/{model_name}/versions/{model_version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY
)
@infer_router.post("/models/{model_name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def model_infer(
    model_name: str, request: Request, settings: SettingsDep, registry: RegistryDep, model_version: str | None = None
) -> Response:
    """Run the model: JSON tensors, or binary ones (the binary tensor data extension), both ways."""
    catalog.lookup(registry, model_name, model_version)  # an unknown model or version: 404 before the body is read
    body = await codec.read(request, settings)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    decoded, result = await inference.answer(  # the version named, held: the body checked against it, then computed
        registry,
        model_name,
        model_version,
        lambda model: codec.parse(request, body, model, settings),
        settings,
        cancel_on=disconnected,
    )
    return codec.render(result, decoded)  # JSON, or JSON and binary outputs, naming the version that computed them


@router.get("", responses=V2_ERRORS)
async def server_metadata(settings: SettingsDep) -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": "vae-serve", "version": __version__, "extensions": extensions(settings)}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """The process is alive."""
    return {"live": True}


@router.get("/health/ready", responses=READY)
async def server_ready(registry: RegistryDep) -> JSONResponse:
    """Every model is loaded and warm (503 before that and while shutting down)."""
    return JSONResponse({"ready": registry.ready}, status_code=200 if registry.ready else 503)


@router.get("/models/{model_name}", responses=V2_ERRORS)
@router.get("/models/{model_name}/versions/{model_version}", responses=V2_ERRORS)
async def model_metadata(model_name: str, registry: RegistryDep, model_version: str | None = None) -> dict[str, Any]:
    """A model's inputs and outputs: names, datatypes, shapes (-1: any size)."""
    return catalog.resolve(registry, model_name, model_version).metadata()


@router.get("/models/{model_name}/ready", responses={**V2_ERRORS, **READY})
@router.get("/models/{model_name}/versions/{model_version}/ready", responses={**V2_ERRORS, **READY})
async def model_ready(model_name: str, registry: RegistryDep, model_version: str | None = None) -> JSONResponse:
    """Whether the model can take requests (503 before start-up has finished and while shutting down)."""
    try:
        model = catalog.resolve(registry, model_name, model_version)
    except ModelNotReady:
        return JSONResponse({"name": model_name, "ready": False}, status_code=503)
    return JSONResponse({"name": model.name, "ready": True})


# -- the model repository extension ---------------------------------------------------------------------------------
def repository_body(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a repository call's optional JSON body (repository.parse reads it, whatever its type)."""
    return {"requestBody": {"required": False, "content": {codec.JSON: {"schema": schema_of(schema)}}}}


@repository_router.post(
    "/index",
    response_model=list[repository.IndexModel],
    response_model_exclude_none=True,
    responses=REPOSITORY_ERRORS,
    openapi_extra=repository_body(repository.IndexRequest),
)
async def repository_index(
    request: Request, settings: SettingsDep, registry: RegistryDep
) -> list[repository.IndexModel]:
    """Every v2 model and version, serving (READY) or not (UNAVAILABLE, with the reason), and the model folders not
    loaded yet; `{"ready": true}`: the READY ones only."""
    body = repository.parse(repository.IndexRequest, await read_body(request, settings))
    return repository.index(registry, body.ready)


@repository_router.post(
    "/models/{model_name}/load",
    response_class=Response,
    responses={**CHANGED, **REPOSITORY_ERRORS},
    openapi_extra=repository_body(repository.ChangeRequest),
)
async def repository_load(model_name: str, request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Load a model (its NAME or a v2 name: all its v2 models and versions) from its folder, or reload it when
    served: new versions validated and warmed beside the serving ones, then swapped in without a dropped request."""
    body = repository.parse(repository.ChangeRequest, await read_body(request, settings))
    await repository.load(registry, model_name, dict(body.parameters or {}))
    return Response()


@repository_router.post(
    "/models/{model_name}/unload",
    response_class=Response,
    responses={**CHANGED, **REPOSITORY_ERRORS},
    openapi_extra=repository_body(repository.ChangeRequest),
)
async def repository_unload(
    model_name: str, request: Request, settings: SettingsDep, registry: RegistryDep
) -> Response:
    """Stop serving a model (its NAME or a v2 name: all its v2 models and versions): new requests get 404 at once,
    those in flight finish first."""
    body = repository.parse(repository.ChangeRequest, await read_body(request, settings))
    await repository.unload(registry, model_name, dict(body.parameters or {}))
    return Response()
