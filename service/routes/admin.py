"""The admin API: POST /v1/models/{name}/reload, /load and /unload, on only when VAE_ADMIN_KEY is set (then each call
sends it as `X-Admin-Key`); off, they answer 404. docs/models.md has the layout and a rollout recipe."""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Header

from service.deps import RegistryDep, SettingsDep
from service.errors import AdminOff, Unauthorized
from service.openapi import ERRORS
from service.registry import Change
from service.schemas import LifecycleResponse

KEY_HEADER = "X-Admin-Key"


async def require_admin(
    settings: SettingsDep,
    x_admin_key: Annotated[str | None, Header(description="the server's admin key (VAE_ADMIN_KEY)")] = None,
) -> None:
    """AdminOff (404) while no admin key is set; Unauthorized (401) without the right one."""
    if settings.admin_key is None:
        raise AdminOff("no such route: the admin API is off (it is on when the server has VAE_ADMIN_KEY set)")
    if x_admin_key is None:
        raise Unauthorized(f"this call needs the admin key: send {KEY_HEADER}")
    if not hmac.compare_digest(x_admin_key.encode(), settings.admin_key.get_secret_value().encode()):
        raise Unauthorized("wrong admin key")


router = APIRouter(prefix="/v1/models", tags=["admin"], dependencies=[Depends(require_admin)])


def _report(change: Change) -> LifecycleResponse:
    return LifecycleResponse(**asdict(change))


@router.post("/{name}/reload", response_model=LifecycleResponse, responses=ERRORS)
async def reload_model(name: str, registry: RegistryDep) -> LifecycleResponse:
    """Re-read a served model's folder: new versions are loaded, validated and warmed beside the old ones, removed
    ones drained; a folder that fails validation changes nothing (422)."""
    return _report(await registry.reload(name))


@router.post("/{name}/load", response_model=LifecycleResponse, responses=ERRORS)
async def load_model(name: str, registry: RegistryDep) -> LifecycleResponse:
    """Serve a model folder of models_dir (a served model is reloaded)."""
    return _report(await registry.load(name))


@router.post("/{name}/unload", response_model=LifecycleResponse, responses=ERRORS)
async def unload_model(name: str, registry: RegistryDep) -> LifecycleResponse:
    """Stop serving a model: new requests get 404 at once, queued and running ones finish, then its memory goes."""
    return _report(await registry.unload(name))
