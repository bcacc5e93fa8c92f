"""GET /v1/models and /v1/models/{name}: the served models, their versions and cards."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import RegistryDep
from service.openapi import ERRORS
from service.registry import ModelRegistry, ServedModel
from service.schemas import ModelInfo, ModelList, VersionInfo

router = APIRouter(prefix="/v1", tags=["models"])


def _info(registry: ModelRegistry, served: ServedModel) -> ModelInfo:
    state = registry.states[served.name]
    versions = []
    for version in state.versions.values():
        info = version.predictor.info()
        fields = {key: info[key] for key in VersionInfo.model_fields if key in info}
        versions.append(VersionInfo(**{**fields, "default": version.version == state.default}))
    return ModelInfo(
        default=served.name == registry.default,
        versions=versions,
        load_error=state.error,
        **served.predictor.info(),
    )


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(registry: RegistryDep) -> ModelList:
    """Every served model with its card (its default version's) and its versions' cards."""
    registry.check_ready()
    models = [_info(registry, served) for served in registry.models.values()]
    return ModelList(default=registry.default or "", models=models)


@router.get("/models/{name}", response_model=ModelInfo, responses=ERRORS)
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    """One model's card (`NAME`: its default version; `NAME@VERSION`: that one), with its versions and the reason
    its last load failed, if it did."""
    return _info(registry, registry.get(name))
