"""The Open Inference Protocol's model repository extension (Triton's; KServe and MLServer speak it too) over the
registry, protocol-neutral: the index of the models and versions there are, with their states, and load and unload.
REST (service.v2.rest: POST /v2/repository/index, /v2/repository/models/{name}/load and /unload) and gRPC
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) call it behind the admin key, as /v1's admin API.

Names. The index lists v2 models, the names inference takes: one row per served version and role (NAME-encoder,
NAME-decoder, and NAME-scorer for VAEs), READY. A model folder not serving (not loaded yet, unloaded, or failed to
load) is one UNAVAILABLE row, with the reason, under each of NAME-encoder and NAME-decoder, which every model has
(whether it has a scorer is known once it is loaded). Load and unload act on a whole model, all its roles and
versions (registry.load: a served model is reloaded, as Triton's load does): they take its NAME or any of its v2
names.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, StrictBool, ValidationError

from service.errors import InvalidInput
from service.registry import Change, ModelRegistry
from service.v2.catalog import ROLES, roles, summarise
from service.v2.codec import Parameters

UNLOAD_PARAMETERS = frozenset({"unload_dependents"})  # all of a model's v2 models unload together anyway
Body = TypeVar("Body", bound=BaseModel)


class IndexRequest(BaseModel):
    """The index request's body (optional: none is `{}`; unknown fields are ignored, as the protocol allows)."""

    ready: StrictBool = Field(False, description="only the models ready for inference")


class IndexModel(BaseModel):
    """One row of the index: a v2 model at one version."""

    name: str = Field(description="the v2 model (NAME-encoder, NAME-decoder, NAME-scorer)")
    version: str | None = Field(None, description="the version; absent for a model that is not serving")
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = Field(description="why it is UNAVAILABLE (or READY while its last reload failed); else empty")


class ChangeRequest(BaseModel):
    """A load or unload request's body (optional)."""

    parameters: Parameters | None = Field(None, description="unload: unload_dependents (a no-op); load: none")


def parse(schema: type[Body], body: bytes) -> Body:
    """A REST body as `schema`: JSON whatever its Content-Type says (tritonclient's says nothing of JSON), and none
    as `{}`; InvalidInput naming each problem."""
    try:
        return schema.model_validate_json(body or b"{}")
    except ValidationError as e:
        raise InvalidInput(summarise(e, "the body")) from None


def index(registry: ModelRegistry, ready: bool = False) -> list[IndexModel]:
    """Every v2 model of every model registry.index() knows, by model, then role, then version; only the READY
    ones when `ready`."""
    rows: list[IndexModel] = []
    for base, group in groupby(registry.index(), key=lambda entry: entry.name):  # sorted by name
        entries, served = list(group), registry.versions(base)
        for role in ROLES:
            for entry in entries:
                if entry.state == "READY" and role in roles(served[entry.version]):
                    rows.append(
                        IndexModel(name=f"{base}-{role}", version=entry.version, state="READY", reason=entry.reason)
                    )
                elif entry.state != "READY" and not ready and role != "scorer":
                    rows.append(IndexModel(name=f"{base}-{role}", state="UNAVAILABLE", reason=entry.reason))
    return rows


def model_of(registry: ModelRegistry, name: str) -> str:
    """The model a load or unload names: NAME itself when it is a model known, else the NAME of a v2 name
    (NAME-encoder, -decoder, -scorer). Any other name goes to the registry as it is, which answers 404 listing the
    model folders."""
    known = {entry.name for entry in registry.index()}
    base, _, role = name.rpartition("-")
    return base if name not in known and role in ROLES and base in known else name


def check_repository(name: str) -> None:
    """gRPC's repository_name: this server has one repository (models_dir), asked for by leaving it empty."""
    if name:
        raise InvalidInput(
            f"this server has one model repository, models_dir: leave repository_name empty, not {name!r}"
        )


async def load(registry: ModelRegistry, name: str, parameters: dict[str, Any]) -> Change:
    """Load the model `name` names, or reload it when served; the protocol's load parameters (`config` and `file:`
    overrides) are refused: a model loads from its folder in models_dir."""
    if parameters:
        raise InvalidInput(
            f"load takes no parameters ({', '.join(map(repr, sorted(parameters)))} given): a model loads from its "
            "folder in models_dir, never from a config or files sent with the request"
        )
    return await registry.load(model_of(registry, name))


async def unload(registry: ModelRegistry, name: str, parameters: dict[str, Any]) -> Change:
    """Unload the model `name` names: every one of its v2 models and versions (so unload_dependents changes nothing)."""
    unknown = sorted(set(parameters) - UNLOAD_PARAMETERS)
    if unknown:
        raise InvalidInput(f"unload takes no parameter {', '.join(map(repr, unknown))} (only unload_dependents)")
    if not isinstance(parameters.get("unload_dependents", False), bool):
        raise InvalidInput("parameter unload_dependents must be true or false")
    return await registry.unload(model_of(registry, name))
