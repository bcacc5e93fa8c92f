"""GET /v1/models and /v1/models/{name}: the served models and their cards."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import RegistryDep
from service.openapi import ERRORS
from service.registry import ServedModel
from service.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _info(served: ServedModel, default: str | None) -> ModelInfo:
    return ModelInfo(default=served.name == default, **served.predictor.info())


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(registry: RegistryDep) -> ModelList:
    """Every served model with its card."""
    default = registry.get(None).name
    return ModelList(default=default, models=[_info(m, default) for m in registry.models.values()])


@router.get("/models/{name}", response_model=ModelInfo, responses=ERRORS)
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    """One model's card: architecture, input spec, latent size, metrics, weights sha256."""
    return _info(registry.get(name), registry.default)
