"""The v2 models: every served model NAME is three models of the Open Inference Protocol, their tensors read from
the checkpoint itself (its input shape and latent size), never written down twice.

    NAME-encoder   images [-1, C, H, W] (UINT8 0..255 or FP32 in [0, 1]) -> mu, logvar [-1, latent_dim] (FP32), and
                   z (a sample from q(z|x)) with the parameter `sample: true` or when `z` is asked for; `seed`
    NAME-decoder   latents [-1, latent_dim] (FP32) -> images [-1, C, H, W] (FP32 in [0, 1], the decoder's mean) and
                   images_uint8 (UINT8, rounded as PNGs hold them)
    NAME-scorer    images -> elbo, recon, kl, elbo_bits_per_dim, log_likelihood, bits_per_dim, complexity_bits, and for
                   calibrated checkpoints ood_score, p_value, is_anomaly [-1] (FP32), as /v1/score;
                   `k`, `seed`, `binarize`. VAEs only: a plain autoencoder has no likelihood.

Each model's request parameters become the /v1 request schema of the same verb (EncodeRequest, ScoreRequest), so
defaults, ranges and limits are /v1's.

A v2 model's versions are the served model's (docs/models.md): `/v2/models/NAME-encoder/versions/2` is the registry's
`NAME@2`, no version is the model's default, and every answer's model_version is the version that computed it. A
version computes only while held (`acquire`, as /v1's answer does), so a reload neither drops nor crosses a v2 request.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from model import preprocess
from service.decoding import finish
from service.errors import InvalidInput, ModelNotFound
from service.predictor import Job
from service.registry import ModelRegistry, ServedModel
from service.schemas import Call, DecodeRequest, EncodeRequest, ScoreRequest
from service.settings import Settings

ROLES = ("encoder", "decoder", "scorer")
PLATFORM = "pytorch_safetensors"
# Request parameters of the protocol itself (the binary tensor data extension), taken by every model.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, the datatypes it takes (the first is the one its metadata names) and its shape,
    -1 for the batch."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


@dataclass(frozen=True)
class V2Model:
    """One v2 model at one version: a role (encoder, decoder, scorer) of one served model version (`served`, whose
    version every answer names), and the versions the model has in that role (its metadata lists them)."""

    name: str
    role: str
    served: ServedModel
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: frozenset[str]
    versions: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.served.version

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidInput(
            f"model {self.name!r} has no output {name!r}; its outputs: {', '.join(o.name for o in self.outputs)}"
        )

    # -- a request's parameters and input -> the predictor's Call ------------------------------------------------
    def call(
        self, parameters: dict[str, Any], tensor: np.ndarray, requested: Sequence[str], settings: Settings
    ) -> Call[Any]:
        """The /v1 schema of this role's verb, from the request's parameters (unknown ones are refused, as /v1 refuses
        unknown query parameters), with `tensor` as its input; the schema's limits checked (k against max_score_k)."""
        unknown = sorted(set(parameters) - self.parameters - PROTOCOL_PARAMETERS)
        if unknown:
            takes = ", ".join(sorted(self.parameters | PROTOCOL_PARAMETERS))
            raise InvalidInput(
                f"model {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; it takes: {takes}"
            )
        values = {k: v for k, v in parameters.items() if k in self.parameters} | {"model": self.served.name}
        params: BaseModel
        if self.role == "encoder":
            if "z" in requested:
                if values.setdefault("sample", True) is not True:
                    raise InvalidInput("output 'z' is a sample from q(z|x): it needs the parameter sample: true")
            params = validate(EncodeRequest, values)
        elif self.role == "decoder":
            params = DecodeRequest.model_construct(model=values["model"], latents=[], encoding="pixels")  # the tensor's
        else:
            params = validate(ScoreRequest, values)
        return finish(Call(params, tensor=tensor), None, settings)

    # -- the predictor's tensors -> this model's outputs ----------------------------------------------------------
    def response_parameters(self, job: Job, call: Call[Any]) -> dict[str, Any]:
        """What the answer depended on besides the input: the seed of a sample; the scorer's k, seed, binarisation."""
        if self.role == "scorer":
            return {"k": call.params.k, "seed": job.seed, "binarized": job.binarized}
        return {"seed": job.seed} if job.seed is not None else {}

    def arrays(self, tensors: dict[str, torch.Tensor], requested: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested outputs (all that were computed when none are named), whole batches, in order."""
        names = list(requested) or [spec.name for spec in self.outputs if spec.name != "z" or "z" in tensors]
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            if name == "images_uint8":
                arrays[name] = preprocess.to_uint8(tensors["image"]).numpy()
            else:
                arrays[name] = np.ascontiguousarray(tensors["image" if name == "images" else name].numpy())
        return arrays


def validate(schema: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Parameters -> schema, strictly (`"seed": "5"` or `"sample": 1` is refused); InvalidInput naming each problem."""
    try:
        return schema.model_validate(values, strict=True)
    except ValidationError as e:
        raise InvalidInput(summarise(e, "parameter")) from None


def summarise(error: ValidationError, where: str) -> str:
    """A pydantic error as one line: `<where> <field>: <problem>; ...` (the first five)."""
    parts = []
    for err in error.errors(include_url=False)[:5]:
        loc = ".".join(map(str, err["loc"]))
        parts.append(f"{where} is not valid JSON" if err["type"] == "json_invalid" else f"{where} {loc}: {err['msg']}")
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def roles(served: ServedModel) -> tuple[str, ...]:
    """The v2 models a served version is: a plain autoencoder has no likelihood, so no scorer."""
    return ROLES if served.predictor.is_vae else ROLES[:2]


def v2_model(served: ServedModel, role: str, versions: tuple[str, ...]) -> V2Model:
    """The v2 model of one role of one served version; `versions`: every version of the model in that role."""
    p = served.predictor
    inputs, outputs, parameters = specs(role, p.input_shape, p.latent_dim, p.calibration is not None)
    return V2Model(f"{served.name}-{role}", role, served, inputs, outputs, parameters, versions)


@functools.cache  # a handful of shapes per server, asked for twice a request
def specs(
    role: str, input_shape: tuple[int, int, int], latent_dim: int, calibrated: bool
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], frozenset[str]]:
    """A role's inputs, outputs and parameters for a model of these shapes."""
    c, h, w = input_shape
    images = TensorSpec("images", ("UINT8", "FP32"), (-1, c, h, w))
    latents = ("FP32",), (-1, latent_dim)
    if role == "encoder":
        return (images,), tuple(TensorSpec(n, *latents) for n in ("mu", "logvar", "z")), frozenset({"sample", "seed"})
    if role == "decoder":
        outputs = (TensorSpec("images", ("FP32",), images.shape), TensorSpec("images_uint8", ("UINT8",), images.shape))
        return (TensorSpec("latents", *latents),), outputs, frozenset()
    scores: tuple[str, ...] = ("elbo", "recon", "kl", "elbo_bits_per_dim", "log_likelihood", "bits_per_dim")
    scores += ("complexity_bits",)
    if calibrated:  # the calibrated OOD score (docs/anomaly.md); is_anomaly as 1.0 / 0.0
        scores += ("ood_score", "p_value", "is_anomaly")
    return (
        (images,),
        tuple(TensorSpec(n, ("FP32",), (-1,)) for n in scores),
        frozenset({"k", "seed", "binarize", "fpr"}),
    )


def role_versions(registry: ModelRegistry, base: str, role: str) -> tuple[str, ...]:
    """The versions of model `base` serving now that have `role`, oldest first."""
    return tuple(v for v, served in registry.versions(base).items() if role in roles(served))


def names(registry: ModelRegistry) -> list[str]:
    """Every v2 model served: a model's role counts when one of its versions has it."""
    return [f"{base}-{role}" for base in registry.models for role in ROLES if role_versions(registry, base, role)]


def lookup(registry: ModelRegistry, name: str, version: str | None) -> tuple[str, str, tuple[str, ...]]:
    """A v2 model name and version (none or "": the model's default version) -> the registry's `NAME@VERSION`, the
    role, and the model's versions in that role. ModelNotReady before start-up has finished; ModelNotFound for a
    name or version not served, listing the names, or the versions, that are."""
    registry.check_ready()
    base, _, role = name.rpartition("-")
    versions = role_versions(registry, base, role) if role in ROLES else ()
    if not versions:
        raise ModelNotFound(f"unknown model {name!r}; served models: {', '.join(names(registry))}")
    if not version:
        version = registry.get(base).version
        if version not in versions:  # a plain autoencoder's default version, with a VAE beside it
            raise ModelNotFound(
                f"model {name!r}: the default version of {base!r}, {version!r}, has no {role}; name one of its "
                f"versions: {', '.join(versions)}"
            )
    elif version not in versions:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its versions: {', '.join(versions)}")
    return f"{base}@{version}", role, versions


def resolve(registry: ModelRegistry, name: str, version: str | None = None) -> V2Model:
    """The v2 model `name` at `version` (none: its default version), to describe it: not held, so never submit work
    to it (`acquire` does). Raises as `lookup`."""
    key, role, versions = lookup(registry, name, version)
    return v2_model(registry.get(key), role, versions)


def acquire(registry: ModelRegistry, name: str, version: str | None = None) -> V2Model:
    """As `resolve`, its version held (ModelRegistry.acquire) until the caller calls `model.served.release`: no
    reload moves the request to another version, nor stops the batcher under it."""
    key, role, versions = lookup(registry, name, version)
    return v2_model(registry.acquire(key), role, versions)
